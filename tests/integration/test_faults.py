"""Faults around a live relay: an upstream process that dies, upstream closes, a client that vanishes without a
FIN or stops reading, oversized and missing requests, malformed handshakes, and a usage database that stops
accepting writes.  Each test checks what the client sees, the trace stage the relay reports and the usage rows.
"""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import gevent
import pytest

from tests.helpers import (DRAIN_TIMEOUT, FAKE_USAGE, FAST, FIRST_MESSAGE_TIMEOUT, HEAD_EVENTS, INTERVAL, MiB,
                           PING_TIMEOUT, READ_LIMIT, REPO, WRITE_TIMEOUT, connect, first_exit, free_port, port_of,
                           read_close, read_events, read_response, send_create, tokens, ws_key)
from tests.faultproxy import FaultProxy
from wsrelay import config as config_mod
from wsrelay import frames, server
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import OP_BINARY, OP_CLOSE, OP_TEXT, build_frame
from wsrelay.store import UsageStore

pytestmark = pytest.mark.timeout(90)


# -- helpers -----------------------------------------------------------------------------------------------

def upstream_close(up, timeout=5.0):
    """The close frame the upstream gets next (answered, as a server would); no data message may come first."""
    try:
        with gevent.Timeout(timeout, AssertionError("the upstream got no close frame within %ss" % timeout)):
            message = up.read_message()
    except ConnectionClosed as closed:
        return closed.code, closed.reason
    raise AssertionError("the upstream got a data message instead of a close: %r" % (message,))


def rss_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def read_to_eof(sock, timeout=10.0):
    """Everything the peer still sends until it closes the connection; fails if it never does."""
    data = bytearray()
    with gevent.Timeout(timeout, AssertionError("the connection was not closed within %ss" % timeout)):
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


@pytest.fixture
def processes():
    """Subprocesses a test starts; killed (by their own handle) at teardown if still running."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def start_fake_upstream_process(processes, *args):
    """``python -m wsrelay fake-upstream`` on a free port; returns ``(proc, url)`` once it listens."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wsrelay", "fake-upstream", "--port", str(port)] + list(args),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes.append(proc)
    with gevent.Timeout(15, AssertionError("the fake upstream process did not start listening")):
        line = proc.stderr.readline()
    assert b"listening" in line, line
    return proc, "ws://127.0.0.1:%d/v1/responses" % port


# -- the upstream ends the turn ----------------------------------------------------------------------------

def test_upstream_process_killed_mid_turn_closes_the_client_with_1011_and_records_the_turn_as_upstream_lost(
        processes, relay, tracer, store):
    proc, url = start_fake_upstream_process(processes, "--silence", "5")
    client = connect(relay(url))
    send_create(client)
    head = read_events(client, count=HEAD_EVENTS)
    assert head[-1]["type"] == "response.output_text.delta"
    killed_at = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    code, reason = read_close(client, strict=True)
    assert code == frames.CLOSE_INTERNAL_ERROR and reason
    assert time.monotonic() - killed_at < 2.0, "the client learnt of the lost upstream too late"
    first = first_exit(tracer)
    assert first["side"] == "upstream" and first["cause"] in ("upstream_eof", "upstream_reset"), first
    assert first["graceful"] is False and first["turn_in_flight"] is True
    client.close(code)
    tracer.wait_for("relay_complete")
    assert tracer.find("drain_start") == []
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "wsrelay.upstream_lost"
    assert record["client_disconnected"] is False and record["model"] == "gpt-test"


@pytest.mark.parametrize("code, reason", [(1011, "upstream overloaded"), (4003, "policy: quota exhausted")])
def test_upstream_close_mid_turn_reaches_the_client_with_its_code_and_reason(scripted, relay, tracer, store,
                                                                            code, reason):
    upstream, url = scripted()
    client = connect(relay(url))
    up = upstream.next()
    try:
        send_create(client)
        assert up.read_message()[0] == OP_TEXT
        up.send_json({"type": "response.created", "response": {"id": "resp_closed"}})
        read_events(client, count=1)
        up.close(code, reason)
        assert read_close(client, strict=True) == (code, reason)
        first = first_exit(tracer)
        assert (first["side"], first["cause"], first["close_code"]) == ("upstream", "upstream_close", code)
        client.close(code, reason)  # the client's reply completes the closing handshake upstream
        with gevent.Timeout(5):
            assert up.read_frame()[1] == OP_CLOSE
        tracer.wait_for("relay_complete")
        assert len(store.records) == 1
        record = store.records[0]
        assert record["terminal_event"] == "wsrelay.upstream_lost" and record["client_disconnected"] is False
    finally:
        up.done.set()


# -- the client leaves without saying so -------------------------------------------------------------------

def test_half_open_client_is_found_gone_by_the_keepalive_and_its_turn_is_drained(fake, relay, tracer, store):
    _, url = fake(silence=2.0)
    proxy = FaultProxy(port_of(relay(url, **{INTERVAL: 0.3, PING_TIMEOUT: 0.2})))
    try:
        client = connect(proxy.url())
        send_create(client)
        read_events(client, count=HEAD_EVENTS)
        last_write = time.monotonic()
        proxy.freeze()  # the client's machine is gone: no FIN, no RST, no Pong
        failed = tracer.wait_for("downstream_ping_failed", timeout=3)
        found_gone = time.monotonic() - last_write
        assert found_gone <= 0.3 + 0.2 + 0.4, "found gone after %.2fs" % found_gone
        assert failed["graceful"] is True and failed["direction"] == "downstream_keepalive"
        assert "pong" in failed["error"]
        first = first_exit(tracer)
        assert (first["side"], first["cause"], first["turn_in_flight"]) == ("client", "downstream_ping_failed", True)
        tracer.wait_for("drain_start")
        tracer.wait_for("drain_terminal", timeout=5)
        tracer.wait_for("relay_complete")
        assert len(store.records) == 1
        record = store.records[0]
        assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is True
        assert tokens(record) == FAKE_USAGE
    finally:
        proxy.close()


def test_client_connection_reset_mid_turn_is_drained_and_billed(fake, relay, tracer, store):
    _, url = fake(silence=0.5)
    proxy = FaultProxy(port_of(relay(url)))
    try:
        client = connect(proxy.url())
        send_create(client)
        read_events(client, count=HEAD_EVENTS)
        proxy.cut()  # a middlebox drops the connection: RST, no close frame, no FIN
        first = first_exit(tracer)
        assert (first["side"], first["cause"], first["graceful"]) == ("client", "client_reset", True)
        assert first["turn_in_flight"] is True
        tracer.wait_for("drain_start")
        tracer.wait_for("drain_terminal", timeout=5)
        tracer.wait_for("relay_complete")
        assert len(store.records) == 1
        record = store.records[0]
        assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is True
        assert tokens(record) == FAKE_USAGE
    finally:
        proxy.close()


def stream_deltas(up, total, delta_bytes=64 * 1024):
    """Stream ``total`` bytes of text deltas frame by frame (one reused frame, no buffering), then the terminal
    event; returns the bytes written."""
    text = "x" * (delta_bytes - 120)
    frame = build_frame(OP_TEXT, json.dumps({"type": "response.output_text.delta", "item_id": "msg_big",
                                             "output_index": 0, "content_index": 0, "delta": text}).encode())
    sent = 0
    while sent < total:
        up.sock.sendall(frame)
        sent += len(frame)
    up.send_json({"type": "response.completed", "response": {
        "id": "resp_big", "model": "gpt-big", "status": "completed",
        "usage": {"input_tokens": 7, "output_tokens": 12800, "total_tokens": 12807}}})
    return sent


def test_client_that_stops_reading_is_cut_off_by_the_write_timeout_and_the_turn_drained_in_bounded_memory(
        scripted, relay, tracer, store):
    total = 50 * MiB
    upstream, url = scripted()
    client = connect(relay(url, **{WRITE_TIMEOUT: 0.5, DRAIN_TIMEOUT: 60}))
    up = upstream.next()
    try:
        rss_before = rss_bytes()
        send_create(client)  # ... and never read again until the relay has given up on this client
        assert up.read_message()[0] == OP_TEXT
        writer = gevent.spawn(stream_deltas, up, total)
        first = first_exit(tracer, timeout=10)
        assert (first["side"], first["cause"], first["graceful"]) == ("client", "client_write_failed", True)
        assert first["turn_in_flight"] is True and first["wrote_downstream"] is True
        tracer.wait_for("drain_start")
        assert writer.get(timeout=60) >= total
        tracer.wait_for("drain_terminal", timeout=30)
        assert upstream_close(up)[0] == frames.CLOSE_GOING_AWAY
        complete = tracer.wait_for("relay_complete")
        growth = rss_bytes() - rss_before
        assert growth < 20 * MiB, "RSS grew by %.1f MiB while 50 MiB went through" % (growth / MiB)
        assert complete["bytes_to_client"] < total
        record = store.wait(1)[0]
        assert len(store.records) == 1
        assert (record["response_id"], record["terminal_event"]) == ("resp_big", "response.completed")
        assert record["client_disconnected"] is True and record["total_tokens"] == 12807
        # What the client still finds in its socket: the start of the stream, cut short, then the end.
        received = read_to_eof(client.sock)
        # (bytes_to_client counts whole writes; the write that timed out may have put part of a frame out too)
        assert complete["bytes_to_client"] <= len(received) < total
        assert received[0] == 0x80 | OP_TEXT
    finally:
        up.done.set()


# -- requests the relay refuses ----------------------------------------------------------------------------

def test_client_message_over_the_read_limit_gets_1009_and_the_upstream_a_clean_close(scripted, relay, tracer,
                                                                                   store):
    upstream, url = scripted()
    client = connect(relay(url, **{READ_LIMIT: 4096}))
    up = upstream.next()
    try:
        frame = build_frame(OP_BINARY, os.urandom(8192), mask=True)
        client.sock.sendall(frame[:100])  # the header says it all
        code, reason = read_close(client, strict=True)
        assert code == frames.CLOSE_MESSAGE_TOO_BIG and reason
        up_code, _ = upstream_close(up)
        assert frames.is_valid_close_code(up_code)
        assert up_code not in (frames.CLOSE_PROTOCOL_ERROR, frames.CLOSE_MESSAGE_TOO_BIG), up_code
        first = first_exit(tracer)
        assert (first["side"], first["cause"], first["close_code"]) == ("client", "client_message_too_big", 1009)
        complete = tracer.wait_for("relay_complete")
        assert complete["bytes_to_upstream"] < 100
        assert store.records == []
    finally:
        up.done.set()


def test_client_without_a_response_create_in_time_gets_1008_and_the_upstream_a_close(scripted, relay, tracer,
                                                                                   store):
    upstream, url = scripted()
    client = connect(relay(url, **{FIRST_MESSAGE_TIMEOUT: 0.3}))
    connected = time.monotonic()
    up = upstream.next()
    try:
        client.send(OP_TEXT, b'{"type":"session.update","session":{}}')  # not a request: the clock runs on
        assert up.read_message() == (OP_TEXT, b'{"type":"session.update","session":{}}')
        code, reason = read_close(client, timeout=3, strict=True)
        waited = time.monotonic() - connected
        assert code == frames.CLOSE_POLICY_VIOLATION and reason
        assert 0.25 <= waited < 1.5, waited
        up_code, _ = upstream_close(up)
        assert frames.is_valid_close_code(up_code)
        first = first_exit(tracer)
        assert (first["side"], first["cause"]) == ("client", "client_first_message_timeout")
        assert first["turn_in_flight"] is False
        tracer.wait_for("relay_complete")
        assert tracer.find("turn_start") == []
        assert store.records == []
    finally:
        up.done.set()


def _upgrade(hostport, path="/v1/responses", version="HTTP/1.1", omit=(), extra=(), **replace):
    headers = {"Host": hostport, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": ws_key()}
    headers.update({k.replace("_", "-"): v for k, v in replace.items()})
    lines = ["GET %s %s" % (path, version)] + ["%s: %s" % (k, v) for k, v in headers.items() if k not in omit]
    lines += ["%s: %s" % h for h in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def plain_get(hostport):
    return ("GET /v1/responses HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % hostport).encode()


MALFORMED = [
    # id, request bytes for a host:port, status, a response header that must be there
    ("missing_key", lambda hp: _upgrade(hp, omit=("Sec-WebSocket-Key",)), 400, None),
    ("invalid_key", lambda hp: _upgrade(hp, Sec_WebSocket_Key="not*base64*at*all!!"), 400, None),
    ("wrong_version", lambda hp: _upgrade(hp, Sec_WebSocket_Version="8"), 426, ("sec-websocket-version", "13")),
    ("http_1_0", lambda hp: _upgrade(hp, version="HTTP/1.0"), 400, None),
    ("plain_get", plain_get, 426, ("upgrade", "websocket")),
    ("header_line_70_kb", lambda hp: _upgrade(hp, extra=[("X-Big", "a" * 70 * 1024)]), 431, None),
    ("150_headers", lambda hp: _upgrade(hp, extra=[("X-Filler-%d" % i, "v") for i in range(150)]), 431, None),
    ("request_line_over_8_kb", lambda hp: _upgrade(hp, path="/v1/responses?pad=" + "a" * 9000), 414, None),
    ("garbage_request_line", lambda hp: b"\x16\x03\x01 not http at all\r\n\r\n", 400, None),
    ("unknown_path_upgrade", lambda hp: _upgrade(hp, path="/v1/chat/completions"), 404, None),
]


@pytest.mark.parametrize("build, status, header", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_handshake_gets_its_http_status_with_a_json_body_and_no_upstream_dial(
        fake, relay, tracer, store, build, status, header):
    app, url = fake()
    relay_url = relay(url)
    hostport = relay_url[len("ws://"):].partition("/")[0]
    sock = socket.create_connection(("127.0.0.1", port_of(relay_url)), timeout=5)
    try:
        try:
            sock.sendall(build(hostport))
        except OSError:
            pass  # the relay may answer (and close) before it read everything
        got, headers, body = read_response(sock)
        assert got == status, (got, headers, body[:200])
        error = json.loads(body)["error"]
        assert error["message"] and error["code"] and error["type"]
        assert headers.get("content-type") == "application/json"
        if header is not None:
            assert headers.get(header[0]) == header[1], headers
        read_to_eof(sock, timeout=5)  # and the relay closes the connection: never a hang
    finally:
        sock.close()
    assert app.handshakes == []
    assert tracer.find("dial_ok") == [] and tracer.find("relay_start") == []
    refused = [f["status"] for f in tracer.find("handshake_refused")]
    # A plain GET is no handshake; every refused upgrade (or unparsable request) leaves one trace line.
    assert refused == ([] if build is plain_get else [status]), tracer.events
    assert store.records == []


# -- the usage database fails mid-run ----------------------------------------------------------------------

@pytest.fixture
def relay_with_store(tracer):
    """``relay_with_store(upstream_url, store)``: a relay writing to ``store``; returns its ws:// URL."""
    servers = []

    def start(upstream_url, usage_store):
        overrides = dict(FAST, **{"upstream.url": upstream_url})
        srv = server.make_server(config_mod.load(None, overrides), tracer, usage_store, listener=("127.0.0.1", 0))
        srv.start()
        servers.append(srv)
        return "ws://127.0.0.1:%d/v1/responses" % srv.server_port

    yield start
    for srv in servers:
        srv.stop(timeout=1)


def db_response_ids(db_path):
    conn = sqlite3.connect(db_path, timeout=5)
    try:
        return [row[0] for row in conn.execute("SELECT response_id FROM usage ORDER BY started_at")]
    finally:
        conn.close()


def fallback_response_ids(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line)["response_id"] for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def test_usage_database_locked_mid_run_loses_no_record_and_imports_each_once_on_recovery(
        fake, relay_with_store, tracer, tmp_path):
    db_path = str(tmp_path / "usage.db")
    usage_store = UsageStore(db_path, retry_interval=0.2, busy_timeout=0.2, trace=tracer)
    usage_store.start()
    try:
        _, url = fake()
        client = connect(relay_with_store(url, usage_store))

        def turn():
            started = time.monotonic()
            send_create(client)
            events = read_events(client, until="response.completed")
            return events[-1]["response"]["id"], time.monotonic() - started

        response_ids = [turn()[0] for _ in range(2)]
        assert usage_store.flush(5)
        assert db_response_ids(db_path) == response_ids

        locker = sqlite3.connect(db_path, timeout=5, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # the database now refuses every write, whoever the user is
        try:
            for _ in range(3):
                response_id, took = turn()
                assert took < 1.0, "a turn took %.2fs while the database was locked" % took
                response_ids.append(response_id)
            failed = tracer.wait_for("usage_store_failed", timeout=5)
            assert "locked" in failed["message"], failed
            assert usage_store.flush(5)  # durable in the fallback file
            assert fallback_response_ids(usage_store.fallback_path) == response_ids[2:]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        recovered = tracer.wait_for("usage_store_recovered", timeout=5)
        assert recovered["count"] == 3
        ids = db_response_ids(db_path)
        assert sorted(ids) == sorted(response_ids) and len(ids) == 5
        assert fallback_response_ids(usage_store.fallback_path) == []
        assert len(tracer.find("usage_recorded")) == 5
        client.close(1000)
        read_close(client, strict=True)
        tracer.wait_for("relay_complete")
    finally:
        usage_store.close(timeout=5)
    assert sorted(db_response_ids(db_path)) == sorted(response_ids)
