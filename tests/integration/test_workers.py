"""``wsrelay serve --workers 2`` as real processes: gunicorn's arbiter over two relay workers on one socket.

Sessions are told apart by the worker that served them through the ``worker=<pid>`` field of its trace lines.
"""

import http.client
import json
import os
import signal
import socket
import struct
import tempfile

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (CREATE, connect, free_port, raw_request, read_close, read_until_marker, tls_connect,
                           wait_until)
from wsrelay.frames import OP_TEXT
from wsrelay.store import UsageStore
from wsrelay.trace import parse_line

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workers(tmp_path, serve):
    """``start(upstream_url, extra_yaml, env=None)`` runs ``wsrelay serve --workers 2`` and waits until both
    workers listen; returns ``(served, url, db)``."""

    def start(upstream_url, extra="", env=None, count=2, wait=True):
        port = free_port()
        db = str(tmp_path / "usage.db")
        start.config = tmp_path / "wsrelay.yaml"
        start.config.write_text(
            "usage: {sqlite_path: %s}\nserver.shutdown_grace_seconds: 5\n"
            "gateway:\n  openai_ws:\n    upstream_drain_timeout_seconds: 5\n    close_timeout_seconds: 1\n%s"
            % (json.dumps(db), extra))
        served = serve("--config", start.config, "--port", port, "--upstream", upstream_url, "--workers", count,
                       env=env)
        if wait:
            wait_until(lambda: arbiter_lines(served, "server_listening"), timeout=20, what="workers listening")
        return served, "ws://127.0.0.1:%d/v1/responses" % port, db

    return start


def lines(served, stage):
    return [fields for fields in map(parse_line, list(served.lines)) if fields.get("stage") == stage]


def arbiter_lines(served, stage):
    return [fields for fields in lines(served, stage) if "worker" not in fields or "status" in fields]


def worker_pids(served, stage="server_listening"):
    return {int(fields["worker"]) for fields in lines(served, stage) if "worker" in fields}


def live_workers(served):
    exited = worker_pids(served, "worker_exited")
    return worker_pids(served) - exited


def http_base(url):
    return url[len("ws://"):].split("/")[0]


def samples(text):
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape_each_worker(url, pids):
    """``{pid: samples}``: /metrics as each worker answers it (a kept-alive connection is served by one worker,
    which /healthz?detail=1 names)."""
    seen = {}
    for _ in range(200):
        conn = http.client.HTTPConnection(http_base(url), timeout=5)
        conn.request("GET", "/healthz?detail=1")
        pid = json.loads(conn.getresponse().read())["pid"]
        conn.request("GET", "/metrics")
        seen[pid] = samples(conn.getresponse().read().decode())
        conn.close()
        if set(seen) >= set(pids):
            return seen
    raise AssertionError("no scrape reached every worker: %s of %s" % (sorted(seen), sorted(pids)))


def start_turns(url, count, served=None):
    """``count`` WebSocket turns in flight (each read up to its first delta), started together.  With ``served``,
    more (four at a time, 48 at most) until both workers hold some: the kernel hands each connection to whichever
    worker accepts first, so a few may all land in one."""

    def one():
        client = connect(url)
        client.send(OP_TEXT, CREATE)
        read_until_marker(client, b"delta", timeout=10)
        return client

    clients = []
    while True:
        jobs = [gevent.spawn(one) for _ in range(count)]
        gevent.joinall(jobs, raise_error=True)
        clients += [job.value for job in jobs]
        if served is None:
            return clients
        wait_until(lambda: len(lines(served, "relay_start")) == len(clients), what="every session traced")
        if len(session_workers(served)) == 2 or len(clients) >= 48:
            return clients
        count = 4


def session_workers(served):
    """The workers that started sessions."""
    return {int(fields["worker"]) for fields in lines(served, "relay_start")}


def start_streams(url, count):
    """``count`` HTTP transport turns (event streams), each read up to its first events."""
    streams = []
    for _ in range(count):
        conn = http.client.HTTPConnection(http_base(url), timeout=10)
        conn.request("POST", "/v1/responses", json.dumps({"model": "gpt-test", "input": "hi", "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and b"response.created" in response.read1(65536)
        streams.append((conn, response))
    return streams


def test_sessions_spread_over_both_workers_and_sigterm_loses_no_usage_record(fake, workers):
    _, up_url = fake(silence=4)
    served, url, db = workers(up_url, "server.shutdown_grace_seconds: 0.5\n")
    clients = start_turns(url, 12, served)  # every turn in flight: the upstream is silent for 4 s
    streams = start_streams(url, 4)  # and turns on the HTTP transport
    served_by = {fields["session"]: int(fields["worker"]) for fields in lines(served, "relay_start")}
    assert len(set(served_by.values())) == 2, "all %d sessions went to one worker" % len(clients)
    turns = len(clients) + len(streams)
    served.proc.send_signal(signal.SIGTERM)
    for client in clients:  # past the grace each client gets 1001 and its turn is drained
        assert read_close(client, timeout=10) == (1001, "server shutting down")
    for conn, response in streams:  # each stream is cut (its chunked body unfinished), and its turn drained
        with pytest.raises(http.client.IncompleteRead):
            while response.read1(65536):
                pass
        conn.close()
    assert served.proc.wait(timeout=30) == 0
    rows = UsageStore(db).query()
    assert len(rows) == turns and len({r["record_id"] for r in rows}) == turns
    assert {r["session_id"] for r in rows if r["transport"] == "websocket"} == set(served_by)
    assert sum(r["transport"] == "http" for r in rows) == 4
    assert all(r["terminal_event"] == "response.completed" for r in rows)
    recorded = lines(served, "usage_recorded")
    assert len(recorded) == turns and {int(f["worker"]) for f in recorded} == set(served_by.values())
    assert not lines(served, "usage_records_unsaved")
    assert arbiter_lines(served, "server_stopped")[-1]["status"] == "0"


def test_metrics_from_either_worker_show_the_sum_over_all_workers(fake, workers):
    _, up_url = fake(silence=1.5)
    served, url, db = workers(up_url)
    clients = start_turns(url, 8, served)  # live sessions on both workers
    pids = live_workers(served)
    assert session_workers(served) == pids
    n = len(clients)

    def every_worker_shows(name, labels, value):
        views = scrape_each_worker(url, pids)
        return all(view.get((name, labels)) == value for view in views.values())

    # Live values are written by each worker every second: wait for them.
    wait_until(lambda: every_worker_shows("wsrelay_sessions", (), n), timeout=10, what="n sessions in each view")
    assert every_worker_shows("wsrelay_handshakes_total", (("status", "101"),), n)
    assert every_worker_shows("wsrelay_upstream_dial_seconds_count", (), n)
    for client in clients:
        read_until_marker(client, b'"response.completed"')
        client.close(1000)
        read_close(client)
    wait_until(lambda: len(UsageStore(db).query()) == n, timeout=10, what="a record per turn")
    assert every_worker_shows("wsrelay_turns_total", (("terminal_event", "response.completed"),), n)
    assert every_worker_shows("wsrelay_usage_tokens_total", (("kind", "input_tokens"), ("model", "gpt-test")), 120 * n)
    wait_until(lambda: every_worker_shows("wsrelay_sessions", (), 0), timeout=10, what="0 sessions in each view")
    views = scrape_each_worker(url, pids)
    relayed = {view[("wsrelay_relayed_bytes_total", (("direction", "client_to_upstream"),))]
               for view in views.values()}
    assert relayed == {n * (len(CREATE) + 6 + 8)}  # each request frame, and each client's close frame (1000)
    assert served.terminate(timeout=20) == 0


def test_a_worker_killed_with_sigkill_is_replaced_and_serving_goes_on(fake, workers):
    _, up_url = fake()
    served, url, db = workers(up_url)
    first = live_workers(served)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(live_workers(served)) == 2 and victim not in live_workers(served), timeout=15,
               what="a new worker in place of %d" % victim)
    assert lines(served, "worker_exited")[0]["worker"] == str(victim)
    replaced = live_workers(served)
    for _ in range(6):
        client = connect(url)
        client.send(OP_TEXT, CREATE)
        read_until_marker(client, b'"response.completed"')
        client.close(1000)
        read_close(client)
    wait_until(lambda: len(UsageStore(db).query()) == 6, timeout=10, what="6 records")
    served_by = {int(f["worker"]) for f in lines(served, "relay_start")}
    assert served_by <= replaced
    views = scrape_each_worker(url, replaced)  # the dead worker's live gauges are gone from every view
    assert all(view[("wsrelay_sessions", ())] == 0 for view in views.values())
    assert served.terminate(timeout=20) == 0


def test_sighup_starts_workers_with_the_new_configuration_and_a_live_turn_ends_normally(fake, workers):
    _, up_url = fake(silence=1.5)
    env = dict(os.environ, WSRELAY_TEST_UPSTREAM="sk-upstream")
    keys = "auth: {keys: [%s]}\nupstream: {api_key_env: WSRELAY_TEST_UPSTREAM}\n"
    served, url, db = workers(up_url, keys % "key-one", env=env)
    config = workers.config
    old = live_workers(served)
    client = connect(url, [("Authorization", "Bearer key-one")])
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b"delta")
    config.write_text(config.read_text().replace("key-one", "key-two"))
    served.proc.send_signal(signal.SIGHUP)
    read_until_marker(client, b'"response.completed"')  # the old worker lets the turn end, then closes 1001
    assert read_close(client) == (1001, "server shutting down")
    wait_until(lambda: lines(served, "config_reloaded"), timeout=20, what="config_reloaded")
    new = live_workers(served)
    assert len(new) == 2 and not new & old
    assert raw_request(url, [("Authorization", "Bearer key-one")])[1] == 401
    assert raw_request(url, [("Authorization", "Bearer key-two")])[1] == 101
    config.write_text("[unclosed")
    served.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: lines(served, "config_reload_failed"), timeout=10, what="config_reload_failed")
    assert live_workers(served) == new  # an invalid file restarts nothing
    assert raw_request(url, [("Authorization", "Bearer key-two")])[1] == 101
    assert served.terminate(timeout=20) == 0
    assert [r["terminal_event"] for r in UsageStore(db).query()] == ["response.completed"]


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket standing in for systemd's, with the sender's credentials on each
    datagram; yields (path, receive) where receive() returns (sender pid, message)."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)

    def receive(timeout=5.0):
        sock.settimeout(timeout)
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", value[:12])[0]
        return pid, data.decode()

    yield path, receive
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_the_arbiter_alone_notifies_systemd_ready_once_workers_listen_watchdog_and_stopping(fake, workers,
                                                                                         notify_socket):
    path, receive = notify_socket
    _, up_url = fake()
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    served, url, db = workers(up_url, env=env, wait=False)
    sender, ready = receive(timeout=20)
    assert sender == served.proc.pid
    assert ready.startswith("READY=1\nSTATUS=2 workers, 0 live sessions, accepting"), ready
    assert raw_request(url)[1] == 101  # served at once
    watchdogs = 0
    while watchdogs < 2:
        sender, message = receive()
        assert sender == served.proc.pid  # NotifyAccess=main: a worker's message would be dropped
        watchdogs += "WATCHDOG=1" in message
    served.proc.send_signal(signal.SIGTERM)
    while True:
        sender, message = receive()
        assert sender == served.proc.pid
        if message.startswith("STOPPING=1"):
            break
        assert "READY=1" not in message
    assert served.proc.wait(timeout=20) == 0


def test_int_stops_every_worker_without_grace_and_still_bills_the_turns(fake, workers):
    _, up_url = fake(silence=1.5)
    served, url, db = workers(up_url, "server.shutdown_grace_seconds: 60\n")
    clients = start_turns(url, 4)
    served.proc.send_signal(signal.SIGINT)
    for client in clients:
        assert read_close(client, timeout=10) == (1001, "server shutting down")
    assert served.proc.wait(timeout=20) == 0
    rows = UsageStore(db).query()
    assert len(rows) == 4 and all(r["terminal_event"] == "response.completed" for r in rows)


def test_workers_serve_wss_and_the_metrics_listener_serves_only_the_ops_routes_in_plain_http(fake, workers,
                                                                                            certificate):
    cert, key = certificate
    _, up_url = fake()
    ops_port = free_port()
    served, url, db = workers(up_url, "server.metrics_listen: 127.0.0.1:%d\nserver.tls_cert: %s\n"
                              "server.tls_key: %s\n" % (ops_port, json.dumps(cert), json.dumps(key)))
    for _ in range(4):
        client = tls_connect(url.replace("ws://", "wss://"), cert)
        client.send(OP_TEXT, CREATE)
        read_until_marker(client, b'"response.completed"')
        client.close(1000)
        read_close(client)
    conn = http.client.HTTPConnection("127.0.0.1", ops_port, timeout=5)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and b"wsrelay_sessions" in response.read()
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 404
    conn.close()
    assert served.terminate(timeout=20) == 0
    assert len(UsageStore(db).query()) == 4


def test_a_certificate_that_cannot_be_loaded_is_refused_before_any_worker_starts(fake, workers, tmp_path):
    _, up_url = fake()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    served, url, db = workers(up_url, "server.tls_cert: %s\nserver.tls_key: %s\n" % (bad, bad), wait=False)
    assert served.proc.wait(timeout=20) == 1
    served.reader.join(timeout=2)
    assert "wsrelay: cannot load server.tls_cert and server.tls_key" in served.stderr()
    assert not worker_pids(served)
