"""A client that leaves mid-turn does not lose the turn's usage: the relay answers the client at once, keeps
reading the upstream until the terminal event (bounded), and only then closes the upstream with the client's code.
Also: how upstream failures end a turn, and one usage record per turn across a multi-turn connection."""

import json
import time

import gevent
import pytest

from tests.helpers import (DRAIN_TIMEOUT, FAKE_USAGE, HEAD_EVENTS, connect, exit_fields, read_close, read_events,
                           send_create, tokens, wait_until)
from wsrelay import frames
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT

pytestmark = pytest.mark.timeout(60)


def assert_order(tracer, *stages):
    seen = tracer.stages()
    positions = [seen.index(stage) for stage in stages]
    assert positions == sorted(positions), "expected %s in this order; saw %s" % (stages, seen)


# -- the client leaves mid-turn ----------------------------------------------------------------------------

def test_client_close_mid_turn_is_answered_at_once_and_reaches_upstream_after_the_terminal_event(
        fake, relay, tracer, store):
    app, url = fake(silence=1.0)
    client = connect(relay(url))
    send_create(client)
    head = read_events(client, count=HEAD_EVENTS)
    assert head[-1]["type"] == "response.output_text.delta"
    closed_at = time.monotonic()
    client.close(4000, "user left")
    assert read_close(client) == (4000, "user left")
    replied_at = time.monotonic()
    assert replied_at - closed_at < 0.3, "the client waited %.2fs for its close reply" % (replied_at - closed_at)
    assert app.closes == [], "the close went upstream before the turn's terminal event"
    drain = tracer.wait_for("drain_start")
    assert drain["graceful"] is True and drain["wrote_downstream"] is True
    tracer.wait_for("drain_terminal", timeout=5)
    terminal_at = time.monotonic()
    assert terminal_at - replied_at > 0.5, "the terminal event came %.2fs after the close reply" % (
        terminal_at - replied_at)
    wait_until(lambda: app.closes, what="the upstream receiving the client's close")
    assert app.closes == [(4000, "user left")]
    assert_order(tracer, "first_exit", "drain_start", "usage_recorded", "drain_terminal", "relay_complete")
    assert exit_fields(tracer) == ("client", "client_close", True, True)
    first = tracer.find("first_exit")[0]
    assert first["close_code"] == 4000 and first["turn_in_flight"] is True
    tracer.wait_for("relay_complete")
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "response.completed"
    assert record["client_disconnected"] is True
    assert tokens(record) == FAKE_USAGE
    assert record["model"] == "gpt-test" and record["response_id"].startswith("resp_")


def test_client_vanishing_mid_turn_is_drained_and_the_upstream_gets_1001(fake, relay, tracer, store):
    app, url = fake(silence=0.5)
    client = connect(relay(url))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)  # nothing is left unread, so the close is a FIN, not a reset
    client.sock.close()
    assert exit_fields(tracer) == ("client", "client_eof", True, True)
    tracer.wait_for("drain_start")
    tracer.wait_for("drain_terminal", timeout=5)
    assert tracer.find("drain_timeout") == []
    wait_until(lambda: app.closes, what="the upstream receiving a close")
    assert [code for code, _ in app.closes] == [frames.CLOSE_GOING_AWAY]
    tracer.wait_for("relay_complete")
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is True
    assert tokens(record) == FAKE_USAGE


def test_drain_gives_up_after_the_drain_timeout_and_records_the_turn_as_timed_out(fake, relay, tracer, store):
    _, url = fake(silence=3.0)
    client = connect(relay(url, **{DRAIN_TIMEOUT: 0.5}))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)
    client.close(4000, "user left")
    assert read_close(client) == (4000, "user left")
    started = tracer.wait_for("drain_start")
    assert started["timeout_s"] == 0.5
    gave_up_at = time.monotonic()
    timeout = tracer.wait_for("drain_timeout", timeout=3)
    waited = time.monotonic() - gave_up_at
    assert 0.4 <= timeout["waited_ms"] / 1000.0 < 1.0, timeout
    assert waited < 1.0
    assert timeout["graceful"] is True and timeout["wrote_downstream"] is True
    assert tracer.find("drain_terminal") == []
    tracer.wait_for("relay_complete", timeout=5)
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "wsrelay.drain_timeout"
    assert record["client_disconnected"] is True
    assert record["output_tokens"] == 0 and record["model"] == "gpt-test"
    assert record["response_id"].startswith("resp_"), "response.created told the id of the response lost"


def test_client_close_between_turns_is_forwarded_at_once(fake, relay, tracer, store):
    app, url = fake()
    client = connect(relay(url))
    send_create(client)
    read_events(client, until="response.completed")
    assert store.wait(1)[0]["client_disconnected"] is False
    closed_at = time.monotonic()
    client.close(4003, "done for today")
    assert read_close(client) == (4003, "done for today")
    wait_until(lambda: app.closes, timeout=2, what="the upstream receiving the client's close")
    assert time.monotonic() - closed_at < 0.5
    assert app.closes == [(4003, "done for today")]
    assert exit_fields(tracer) == ("client", "client_close", True, True)
    assert tracer.find("first_exit")[0]["turn_in_flight"] is False
    tracer.wait_for("relay_complete")
    assert tracer.find("drain_start") == []
    assert len(store.records) == 1


def test_client_close_before_anything_was_written_downstream_is_traced_as_such(fake, relay, tracer, store):
    app, url = fake()
    client = connect(relay(url))
    client.close(1000)
    assert read_close(client) == (1000, "")
    assert exit_fields(tracer) == ("client", "client_close", True, False)
    wait_until(lambda: app.closes, timeout=2, what="the upstream receiving the client's close")
    assert app.closes == [(1000, "")]
    complete = tracer.wait_for("relay_complete")
    assert complete["wrote_downstream"] is False
    assert store.records == []


def test_client_vanishing_while_sending_its_request_leaves_no_turn_to_drain(scripted, relay, tracer, store):
    """Half a response.create never reaches the upstream whole, so no turn exists there: nothing to drain (the
    upstream connection is let go at once) and nothing to bill."""
    upstream, url = scripted()
    client = connect(relay(url))
    up = upstream.next()
    try:
        request = json.dumps({"type": "response.create", "model": "gpt-test",
                              "input": [{"role": "user", "content": "y" * 4000}]}).encode()
        frame = frames.build_frame(OP_TEXT, request, mask=True)
        client.sock.sendall(frame[:1000])
        received = b""
        with gevent.Timeout(5):
            while len(received) < 1000:
                received += up.sock.recv(1000 - len(received))
        assert received == frame[:1000]  # the relay has passed on the start of the request
        started = time.monotonic()
        client.sock.close()
        assert exit_fields(tracer)[:2] == ("client", "client_eof")
        with gevent.Timeout(5, AssertionError("the upstream connection was never closed")):
            assert up.sock.recv(65536) == b""  # mid-frame, so no close frame can follow: just the end of the stream
        assert time.monotonic() - started < 2.0, "the upstream was held %.1fs" % (time.monotonic() - started)
        tracer.wait_for("relay_complete")
        assert tracer.find("drain_start") == [], "drained a turn whose request never reached the upstream"
        assert store.records == []
    finally:
        up.done.set()


# -- the upstream ends the turn ----------------------------------------------------------------------------

def test_upstream_close_mid_turn_reaches_the_client_and_the_turn_is_recorded_as_upstream_lost(
        fake, relay, tracer, store):
    _, url = fake(mode="close-mid", silence=0.2)
    client = connect(relay(url))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)
    with gevent.Timeout(5):
        fin, opcode, payload = client.read_frame()
    assert opcode == OP_CLOSE
    assert frames.parse_close(payload) == (frames.CLOSE_INTERNAL_ERROR, "fake upstream failure")
    client.send(OP_CLOSE, payload)
    assert exit_fields(tracer) == ("upstream", "upstream_close", True, True)
    assert tracer.find("first_exit")[0]["close_code"] == frames.CLOSE_INTERNAL_ERROR
    tracer.wait_for("relay_complete")
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "wsrelay.upstream_lost"
    assert record["client_disconnected"] is False
    assert record["output_tokens"] == 0 and record["model"] == "gpt-test"
    assert tracer.find("drain_start") == []


def test_upstream_reset_mid_turn_closes_the_client_with_1011_and_the_turn_is_recorded_as_upstream_lost(
        fake, relay, tracer, store):
    _, url = fake(mode="drop-mid", silence=0.2)
    client = connect(relay(url))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)
    code, reason = read_close(client)
    assert code == frames.CLOSE_INTERNAL_ERROR and reason
    side, cause, graceful, wrote = exit_fields(tracer)
    assert (side, graceful, wrote) == ("upstream", False, True)
    assert cause == "upstream_reset"
    client.close(code)
    tracer.wait_for("relay_complete")
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "wsrelay.upstream_lost"
    assert record["client_disconnected"] is False


def test_upstream_closing_during_the_drain_records_the_turn_as_upstream_lost(fake, relay, tracer, store):
    _, url = fake(mode="close-mid", silence=0.5)
    client = connect(relay(url))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)
    client.close(4000, "user left")
    assert read_close(client) == (4000, "user left")
    assert exit_fields(tracer) == ("client", "client_close", True, True)
    lost = tracer.wait_for("drain_upstream_lost", timeout=5)
    assert lost["graceful"] is False
    tracer.wait_for("relay_complete", timeout=10)
    assert tracer.find("drain_terminal") == [] and tracer.find("drain_timeout") == []
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "wsrelay.upstream_lost"
    assert record["client_disconnected"] is True


def test_error_then_response_failed_is_one_failed_turn(fake, relay, tracer, store):
    _, url = fake(mode="error")
    client = connect(relay(url))
    send_create(client)
    events = read_events(client, until="response.failed")
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    store.wait(1)
    client.close(1000)
    assert read_close(client) != "eof"
    tracer.wait_for("relay_complete")
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "response.failed"
    assert record["response_id"] == events[-1]["response"]["id"]
    assert tokens(record) == FAKE_USAGE
    assert record["client_disconnected"] is False


def test_error_turn_drained_after_the_client_left_is_still_one_record(fake, relay, tracer, store):
    app, url = fake(mode="error", silence=0.5)
    client = connect(relay(url))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)
    client.close(4000, "user left")
    assert read_close(client) == (4000, "user left")
    tracer.wait_for("drain_terminal", timeout=5)
    tracer.wait_for("relay_complete", timeout=5)
    assert len(store.records) == 1
    record = store.records[0]
    assert record["terminal_event"] == "response.failed"
    assert record["client_disconnected"] is True


# -- several turns on one connection -----------------------------------------------------------------------

def test_prewarm_and_two_turns_on_one_connection_are_three_records_in_order(fake, relay, tracer, store):
    _, url = fake()
    client = connect(relay(url))
    response_ids = []
    send_create(client, generate=False)
    events = read_events(client, until="response.completed")
    response_ids.append(events[-1]["response"]["id"])
    for turn in range(2):
        send_create(client, previous_response_id=response_ids[-1])
        events = read_events(client, until="response.completed")
        assert events[0]["type"] == "response.created"
        response_ids.append(events[-1]["response"]["id"])
    store.wait(3)
    client.close(1000)
    assert read_close(client) != "eof"
    tracer.wait_for("relay_complete")
    records = store.records
    assert [r["response_id"] for r in records] == response_ids
    assert len(set(response_ids)) == 3
    assert [r["terminal_event"] for r in records] == ["response.completed"] * 3
    assert tokens(records[0]) == dict.fromkeys(FAKE_USAGE, 0)
    assert [tokens(r) for r in records[1:]] == [FAKE_USAGE, FAKE_USAGE]
    assert all(r["client_disconnected"] is False for r in records)
    assert len({r["session_id"] for r in records}) == 1
    assert records[0]["started_at"] <= records[1]["started_at"] <= records[2]["started_at"]
    assert len(tracer.find("turn_start")) == 3


def test_fragmented_create_starts_a_turn_that_is_billed_once(fake, relay, tracer, store):
    _, url = fake()
    client = connect(relay(url))
    request = json.dumps({"type": "response.create", "model": "gpt-test",
                          "input": [{"role": "user", "content": "z" * 600}]}).encode()
    client.send(OP_TEXT, request[:300], fin=False)
    client.send(OP_CONTINUATION, request[300:], fin=True)
    read_events(client, until="response.completed")
    record = store.wait(1)[0]
    assert record["terminal_event"] == "response.completed" and tokens(record) == FAKE_USAGE
    client.close(1000)
    assert read_close(client) != "eof"
    tracer.wait_for("relay_complete")
    assert len(store.records) == 1


def test_upstream_ping_during_drain_is_answered_for_the_departed_client(scripted, relay, tracer, store):
    upstream, url = scripted()
    client = connect(relay(url))
    up = upstream.next()
    send_create(client)
    assert up.read_message()[0] == OP_TEXT
    up.send_json({"type": "response.created", "response": {"id": "resp_drain"}})
    read_events(client, count=1)
    client.close(4000, "user left")
    assert read_close(client) == (4000, "user left")
    tracer.wait_for("drain_start")
    up.send(OP_PING, b"still there?")
    with gevent.Timeout(5):
        fin, opcode, payload = up.read_frame()
    assert (opcode, payload) == (OP_PONG, b"still there?")
    up.send_json({"type": "response.completed",
                  "response": {"id": "resp_drain", "usage": {"input_tokens": 5, "output_tokens": 2,
                                                             "total_tokens": 7}}})
    tracer.wait_for("drain_terminal")
    try:
        with gevent.Timeout(5):
            up.read_message()
    except ConnectionClosed as closed:
        assert (closed.code, closed.reason) == (4000, "user left")
    else:
        raise AssertionError("the upstream got no close after the drain")
    record = store.wait(1)[0]
    assert record["response_id"] == "resp_drain" and record["total_tokens"] == 7
    assert record["client_disconnected"] is True
    up.done.set()


def test_terminal_event_split_into_fragments_and_small_writes_is_billed_once(scripted, relay, tracer, store):
    upstream, url = scripted()
    client = connect(relay(url))
    up = upstream.next()
    try:
        send_create(client)
        assert up.read_message()[0] == OP_TEXT
        completed = json.dumps({"type": "response.completed", "response": {
            "id": "resp_split", "model": "gpt-split", "output": [{"type": "message", "content": "w" * 300}],
            "usage": {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}}}).encode()
        wire = (frames.build_frame(OP_TEXT, completed[:50], fin=False)
                + frames.build_frame(OP_PING, b"mid-message")
                + frames.build_frame(OP_CONTINUATION, completed[50:200], fin=False)
                + frames.build_frame(OP_CONTINUATION, completed[200:], fin=True))
        for start in range(0, len(wire), 7):
            up.sock.sendall(wire[start:start + 7])
        fin, opcode, payload = client.read_frame()
        assert (opcode, payload) == (OP_TEXT, completed[:50])
        assert client.read_frame()[1:] == (OP_PING, b"mid-message")
        assert client.read_frame()[1:] == (OP_CONTINUATION, completed[50:200])
        assert client.read_frame() == (True, OP_CONTINUATION, completed[200:])
        record = store.wait(1)[0]
        assert (record["response_id"], record["model"], record["terminal_event"]) == \
            ("resp_split", "gpt-split", "response.completed")
        assert (record["input_tokens"], record["output_tokens"], record["total_tokens"]) == (11, 4, 15)
        client.close(1000)
        assert up.read_frame()[1] == OP_CLOSE
        up.close(1000)
        tracer.wait_for("relay_complete")
        assert len(store.records) == 1
    finally:
        up.done.set()


def test_client_connection_is_closed_at_once_while_its_turn_drains(fake, relay, tracer, store):
    app, url = fake(silence=2.0)
    client = connect(relay(url))
    send_create(client)
    read_events(client, count=HEAD_EVENTS)
    client.close(4000, "user left")
    assert read_close(client) == (4000, "user left")
    started = time.monotonic()
    client.sock.settimeout(1.0)
    assert client.sock.recv(100) == b"", "the relay must end the client's TCP connection after the close"
    assert time.monotonic() - started < 1.0
    assert tracer.find("drain_terminal") == [], "the drain is still running: the connection did not wait for it"
    tracer.wait_for("drain_terminal", timeout=5)
    assert store.wait(1)[0]["client_disconnected"] is True
