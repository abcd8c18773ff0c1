"""Downstream keepalive through a real relay: when Pings start, what postpones them, what a missing Pong means."""

import time

import gevent
import pytest

from tests.helpers import CREATE, INTERVAL, PING_TIMEOUT, connect, read_frames_until
from wsrelay.frames import OP_PING, OP_TEXT

pytestmark = pytest.mark.timeout(30)


def pings(seen):
    return [s for s in seen if s[0] == OP_PING]


def test_ping_starts_only_after_first_downstream_write(scripted, relay, tracer):
    upstream, url = scripted()
    client = connect(relay(url, **{INTERVAL: 0.2, PING_TIMEOUT: 0.1}))
    up = upstream.next()
    client.send(OP_TEXT, b'{"type":"session.update"}')
    assert up.read_message() == (OP_TEXT, b'{"type":"session.update"}')
    # Four intervals with nothing written downstream: no Ping may arrive.
    client.sock.settimeout(0.8)
    with pytest.raises(OSError):
        client.read_frame()
    client.sock.settimeout(10)
    assert tracer.find("downstream_ping_ok") == []
    started = time.monotonic()
    up.send(OP_TEXT, b'{"type":"response.created"}')
    seen = read_frames_until(client, lambda op, p: op == OP_PING)
    assert seen[0][:2] == (OP_TEXT, b'{"type":"response.created"}')
    assert seen[-1][2] - started >= 0.2 - 0.02
    fields = tracer.wait_for("downstream_ping_ok")
    assert fields["direction"] == "downstream_keepalive" and fields["wrote_downstream"] is True
    up.done.set()


def test_business_traffic_postpones_pings(scripted, relay):
    upstream, url = scripted()
    client = connect(relay(url, **{INTERVAL: 0.3, PING_TIMEOUT: 0.2}))
    up = upstream.next()
    client.send(OP_TEXT, CREATE)
    up.read_message()

    def stream():
        for i in range(12):  # one event every 0.1 s for 1.2 s: never a full interval of silence
            up.send(OP_TEXT, b'{"type":"response.output_text.delta","delta":"%d"}' % i)
            gevent.sleep(0.1)
        up.send(OP_TEXT, b'{"type":"response.output_text.delta","delta":"last"}')

    writer = gevent.spawn(stream)
    seen = read_frames_until(client, lambda op, p: b'"last"' in p)
    assert pings(seen) == [], "a Ping was sent while business frames were flowing"
    seen = read_frames_until(client, lambda op, p: op == OP_PING)  # silence now: the Ping comes
    writer.join()
    up.done.set()


def test_interval_zero_sends_no_pings(fake, relay, tracer):
    _, url = fake(silence=1.0)
    client = connect(relay(url, **{INTERVAL: 0}))
    client.send(OP_TEXT, CREATE)
    seen = read_frames_until(client, lambda op, p: b'"response.completed"' in p)
    assert pings(seen) == []
    assert tracer.find("downstream_ping_ok") == []


def test_pings_keep_a_long_silent_turn_until_its_terminal_event(fake, relay, tracer, store):
    _, url = fake(silence=1.5)
    client = connect(relay(url, **{INTERVAL: 0.3, PING_TIMEOUT: 0.2}))
    client.send(OP_TEXT, CREATE)
    seen = read_frames_until(client, lambda op, p: b'"response.completed"' in p)
    assert len(pings(seen)) >= 3
    assert len(tracer.find("downstream_ping_ok")) >= 3
    gaps = [b[2] - a[2] for a, b in zip(pings(seen), pings(seen)[1:])]
    assert all(g >= 0.3 - 0.05 for g in gaps), gaps
    record = store.wait(1)[0]
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is False


def test_client_that_stops_answering_pongs_is_gone_and_its_turn_is_drained(fake, relay, tracer, store):
    upstream, url = fake(silence=1.5)
    client = connect(relay(url, **{INTERVAL: 0.3, PING_TIMEOUT: 0.2}))
    client.send(OP_TEXT, CREATE)
    started = time.monotonic()
    # Keep reading (the socket stays open and drained) but never answer a Ping.
    reader = gevent.spawn(read_frames_until, client, lambda op, p: False, 10, False)
    failed = tracer.wait_for("downstream_ping_failed", timeout=5)
    assert failed["graceful"] is True and failed["direction"] == "downstream_keepalive"
    # Found gone within interval + timeout after the last business write (+ scheduling slack).
    assert time.monotonic() - started <= 0.3 + 0.2 + 0.3
    tracer.wait_for("drain_start")
    tracer.wait_for("drain_terminal", timeout=5)
    record = store.wait(1)[0]
    assert record["terminal_event"] == "response.completed"
    assert record["client_disconnected"] is True
    assert record["output_tokens"] == 30
    reader.kill()


def test_failed_ping_write_is_a_graceful_disconnect(fake, relay, tracer, store):
    _, url = fake(silence=1.0)
    client = connect(relay(url, **{INTERVAL: 0.2, PING_TIMEOUT: 0.1}))
    client.send(OP_TEXT, CREATE)
    read_frames_until(client, lambda op, p: b"delta" in p)
    client.sock.close()  # vanished without a close frame: the next read or Ping write fails
    first = tracer.wait_for("first_exit")
    assert first["graceful"] is True and first["side"] == "client"
    tracer.wait_for("drain_terminal", timeout=5)
    assert store.wait(1)[0]["client_disconnected"] is True
