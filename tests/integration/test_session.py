"""The Session on its own, over socket pairs: no server, no handshake, just its frames and its exits."""

import json
import socket

import gevent
import pytest

from tests.helpers import FAST, connect, read_events, send_create, stays_false, wait_until
from wsrelay import config as config_mod
from wsrelay.fake_upstream import FrameSocket
from wsrelay.frames import OP_PING, OP_TEXT
from wsrelay.exits import Exit
from wsrelay.session import Session

pytestmark = pytest.mark.timeout(30)


def make_session(tracer, store, ping_supported=True, **settings):
    overrides = dict(FAST)
    overrides.update(settings)
    cfg = config_mod.load(None, overrides)
    client_end, relay_down = socket.socketpair()
    relay_up, upstream_end = socket.socketpair()
    session = Session(relay_down, relay_up, cfg, tracer, store, key_id="k1", ping_supported=ping_supported)
    client = FrameSocket(client_end, client=True)
    upstream = FrameSocket(upstream_end)
    return session, client, upstream


def test_ping_unsupported_is_traced_once_and_the_relay_carries_on(tracer, store):
    session, client, upstream = make_session(
        tracer, store, ping_supported=False,
        **{"gateway.openai_ws.passthrough_downstream_ping_interval_seconds": 0.1,
           "gateway.openai_ws.passthrough_downstream_ping_timeout_seconds": 0.05})
    runner = gevent.spawn(session.run)
    client.send(OP_TEXT, json.dumps({"type": "response.create", "model": "m"}).encode())
    assert upstream.read_message()[0] == OP_TEXT
    upstream.send_json({"type": "response.created", "response": {"id": "resp_1"}})
    assert client.read_frame()[1] == OP_TEXT
    tracer.wait_for("downstream_ping_unsupported")
    # Several intervals: still no second trace line (and no Ping, checked below).
    assert stays_false(lambda: len(tracer.find("downstream_ping_unsupported")) > 1, 0.35)
    upstream.send_json({"type": "response.completed", "response": {"id": "resp_1", "usage": {
        "input_tokens": 5, "output_tokens": 7, "total_tokens": 12}}})
    fin, opcode, payload = client.read_frame()
    assert opcode == OP_TEXT and b"response.completed" in payload  # no Ping came before it
    assert len(tracer.find("downstream_ping_unsupported")) == 1
    unsupported = tracer.find("downstream_ping_unsupported")[0]
    assert unsupported["direction"] == "downstream_keepalive" and unsupported["wrote_downstream"] is True
    assert store.wait(1)[0]["total_tokens"] == 12
    client.close(1000, "done")
    exit_ = runner.get(timeout=5)
    assert (exit_.stage, exit_.side, exit_.graceful) == ("client_close", "client", True)


def test_first_exit_is_a_value_naming_side_direction_and_grace(tracer, store):
    session, client, upstream = make_session(tracer, store)
    runner = gevent.spawn(session.run)
    upstream.send(OP_PING, b"x")
    assert client.read_frame()[1:] == (OP_PING, b"x")
    upstream.sock.close()
    exit_ = runner.get(timeout=5)
    assert exit_.stage == "upstream_eof"
    assert exit_.side == "upstream" and exit_.direction == "upstream_to_client" and exit_.graceful is False
    first = tracer.find("first_exit")[0]
    assert first["cause"] == "upstream_eof" and first["wrote_downstream"] is False
    complete = tracer.find("relay_complete")[0]
    assert complete["cause"] == "upstream_eof"


def test_a_ping_failing_after_the_session_ended_is_not_reported(tracer, store):
    session, client, upstream = make_session(tracer, store)
    client.sock.close()
    exit_ = session.report(Exit("client_eof", "client_to_upstream", "client", True))
    assert session.keepalive_failed("ping write failed") is None
    assert tracer.find("downstream_ping_failed") == []
    assert session.exit is exit_


def test_finished_sessions_and_exchanges_are_freed_without_the_cyclic_collector(fake, relay, store):
    """Sessions end faster than full collections come under churn: one left in a reference cycle would grow the
    heap for good (the soak's RSS check), so nothing of a finished session or HTTP exchange may wait for gc."""
    import gc
    import http.client
    import json as json_mod

    from tests.helpers import port_of
    from wsrelay.exchange import Exchange
    from wsrelay.session import Session

    _, url = fake(silence=0.2)
    relay_url = relay(url, resume__window_seconds=0.3)  # the dropped turn with a conversation is held that long
    app = relay.apps[-1]

    def alive():
        return sorted(type(o).__name__ for o in gc.get_objects() if isinstance(o, (Session, Exchange)))

    gc.collect()
    before = alive()  # what other tests' servers may still hold
    gc.disable()
    try:
        for drop, headers in ((False, []), (True, []), (False, [("session-id", "s-1")]),
                              (True, [("session-id", "s-2")])):
            client = connect(relay_url, headers)
            send_create(client)
            if drop:
                read_events(client, count=2)
                client.sock.close()
            else:
                read_events(client, until="response.completed")
                client.close()
        for headers in ({}, {"session-id": "s-3"}):
            conn = http.client.HTTPConnection("127.0.0.1", port_of(relay_url), timeout=5)
            conn.request("POST", "/v1/responses", json_mod.dumps({"model": "m", "input": "hi", "stream": True}),
                         headers)
            conn.getresponse().read()
            conn.close()
        store.wait(6)
        wait_until(lambda: not app.sessions and not app.http.live and not app.resume.held, what="everything ended")
        gevent.sleep(0.3)
        assert len(alive()) <= len(before), (before, alive())
    finally:
        gc.enable()
