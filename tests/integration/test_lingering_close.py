"""Lingering close: when the relay closes a connection itself while the peer is still sending, it sends its
Close, shuts its write side and reads (discarding) until the peer's Close or EOF, within bounds, so the peer
reads the close code instead of failing its write with a reset."""

import os
import socket
import time

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CREATE, FIRST_MESSAGE_TIMEOUT, MiB, READ_LIMIT, connect, read_close
from wsrelay import frames
from wsrelay.frames import OP_BINARY, OP_CLOSE, OP_TEXT

pytestmark = pytest.mark.timeout(60)

LINGER_TIMEOUT = "gateway__openai_ws__lingering_close_timeout_seconds"
LINGER_MAX_BYTES = "gateway__openai_ws__lingering_close_max_bytes"


def stream_then_read_close(url, payload):
    """A client that writes a whole message whatever happens meanwhile, then reads: ``(write error, close)``."""
    client = connect(url)
    # A send buffer the size of a real client's over a real network (loopback's grows to hold the whole message,
    # which would hide the relay's behaviour).
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client.sock.settimeout(10)
    error = None
    try:
        client.sock.sendall(frames.build_frame(OP_BINARY, payload, mask=True))
    except OSError as exc:
        error = exc
    try:
        close = read_close(client, strict=True)
    except Exception as exc:  # what a client that lost the connection sees
        close = exc
    client.sock.close()
    return error, close


def test_clients_streaming_a_message_over_the_limit_finish_their_write_and_read_1009(fake, relay, tracer):
    _, upstream_url = fake()
    url = relay(upstream_url, **{READ_LIMIT: MiB})
    payload = os.urandom(2 * MiB)
    outcomes = [stream_then_read_close(url, payload) for _ in range(20)]
    failed = [(i, error, close) for i, (error, close) in enumerate(outcomes)
              if error is not None or not isinstance(close, tuple) or close[0] != frames.CLOSE_MESSAGE_TOO_BIG]
    assert failed == [], "%d of 20 clients did not read 1009: %s" % (len(failed), failed[:3])
    lingers = tracer.wait_for("lingering_close", count=20)
    assert lingers["side"] == "client" and lingers["outcome"] in ("close", "eof")
    assert all(f["discarded_bytes"] >= MiB for f in tracer.find("lingering_close"))
    _, text = relay.apps[0].metrics.render()
    counted = sum(sample.value for family in text_string_to_metric_families(text.decode())
                  for sample in family.samples if sample.name == "wsrelay_lingering_closes_total"
                  and sample.labels["side"] == "client")
    assert counted == 20


def test_lingering_ends_at_its_byte_bound(fake, relay, tracer):
    _, upstream_url = fake()
    url = relay(upstream_url, **{READ_LIMIT: 1024, LINGER_MAX_BYTES: 64 * 1024})
    client = connect(url)
    frame = frames.build_frame(OP_BINARY, os.urandom(4 * MiB), mask=True)
    try:
        client.sock.sendall(frame)
    except OSError:
        pass  # past the bound the relay stops reading: the rest of this write is refused
    linger = tracer.wait_for("lingering_close")
    assert linger["outcome"] == "max_bytes" and 64 * 1024 <= linger["discarded_bytes"] < 4 * MiB
    tracer.wait_for("relay_complete")


def test_lingering_ends_at_its_time_bound_when_the_client_keeps_sending(fake, relay, tracer):
    _, upstream_url = fake()
    url = relay(upstream_url, **{READ_LIMIT: 1024, LINGER_TIMEOUT: 0.5})
    client = connect(url)
    client.sock.sendall(frames.build_frame(OP_BINARY, b"x" * 2048, mask=True))
    assert read_close(client) == (frames.CLOSE_MESSAGE_TOO_BIG, "message of 2048 bytes is over the 1024-byte limit")
    started = time.monotonic()
    with gevent.Timeout(5, AssertionError("the relay never stopped lingering")):
        try:
            while True:  # a client that never stops: a Ping every 20 ms, never a Close
                client.send(frames.OP_PING, b"still here")
                gevent.sleep(0.02)
        except OSError:
            pass
    linger = tracer.wait_for("lingering_close")
    assert linger["outcome"] == "timeout" and 0.4 <= time.monotonic() - started < 3


def test_the_relays_own_close_after_a_timer_waits_for_the_clients_close(fake, relay, tracer):
    _, upstream_url = fake()
    client = connect(relay(upstream_url, **{FIRST_MESSAGE_TIMEOUT: 0.2}))
    assert read_close(client, strict=True) == (frames.CLOSE_POLICY_VIOLATION, "no request received")
    client.sock.sendall(frames.build_frame(OP_TEXT, CREATE, mask=True))  # too late: read and discarded
    client.close(1000)
    linger = tracer.wait_for("lingering_close")
    assert (linger["side"], linger["outcome"]) == ("client", "close")
    assert linger["discarded_bytes"] > len(CREATE)


def test_a_client_that_sent_its_close_is_not_lingered_on(fake, relay, tracer):
    _, upstream_url = fake()
    client = connect(relay(upstream_url))
    client.close(1000)
    fin, opcode, payload = client.read_frame()
    assert opcode == OP_CLOSE
    tracer.wait_for("relay_complete")
    assert tracer.find("lingering_close") == []


def test_an_upstream_still_sending_after_its_protocol_error_is_read_until_its_close(scripted, relay, tracer):
    upstream, url = scripted()
    client = connect(relay(url))
    up = upstream.next()
    try:
        client.send(OP_TEXT, CREATE)
        up.read_message()
        tail = frames.build_frame(OP_TEXT, b'{"type":"response.output_text.delta","delta":"' + b"x" * 60000 + b'"}')
        # A masked frame from a server is a protocol error; what follows is more of the upstream's stream.
        up.sock.sendall(frames.build_frame(OP_TEXT, b"{}", mask=True) + tail * 4)
        assert read_close(client)[0] == frames.CLOSE_INTERNAL_ERROR
        with gevent.Timeout(5):
            while True:
                fin, opcode, payload = up.read_frame()
                if opcode == OP_CLOSE:
                    break
        assert frames.parse_close(payload)[0] == frames.CLOSE_PROTOCOL_ERROR
        up.sock.sendall(tail + frames.build_close(frames.CLOSE_PROTOCOL_ERROR))
        linger = tracer.wait_for("lingering_close")
        assert (linger["side"], linger["outcome"]) == ("upstream", "close")
        assert linger["discarded_bytes"] > len(tail)  # (part of the first four may have been read with the bad frame)
    finally:
        up.done.set()
