"""Pipelined responses: a client may send the next ``response.create`` before the previous response's terminal
event.  Each response is billed once with its own tokens, and a client that leaves while any of them is in flight
is drained until the last one ends."""

import gevent
import pytest

from tests.helpers import connect, read_close, read_events, send_create
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(30)


def created(response_id):
    return {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}}


def delta(response_id, text):
    return {"type": "response.output_text.delta", "response_id": response_id, "delta": text}


def completed(response_id, input_tokens, output_tokens):
    return {"type": "response.completed", "response": {
        "id": response_id, "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                                     "total_tokens": input_tokens + output_tokens}}}


def billed(record):
    return record["model"], record["input_tokens"], record["output_tokens"], record["client_disconnected"]


def open_two_responses(scripted, relay):
    upstream, url = scripted()
    client = connect(relay(url))
    up = upstream.next()
    send_create(client, model="model-a")
    send_create(client, model="model-b")
    assert up.read_message()[0] == OP_TEXT and up.read_message()[0] == OP_TEXT
    up.send_json(created("resp_a"))
    up.send_json(created("resp_b"))
    return client, up


def test_two_pipelined_responses_with_interleaved_events_are_each_billed_with_their_own_tokens(
        scripted, relay, tracer, store):
    client, up = open_two_responses(scripted, relay)
    try:
        assert [t["responses_in_flight"] for t in tracer.find("turn_start")] == [1, 2]
        up.send_json(delta("resp_a", "a1"))
        up.send_json(delta("resp_b", "b1"))
        up.send_json(completed("resp_b", 7, 3))   # the later request ends first
        up.send_json(delta("resp_a", "a2"))
        up.send_json(completed("resp_a", 50, 20))
        events = read_events(client, count=7)
        assert [e["type"] for e in events][-1] == "response.completed"
        records = {r["response_id"]: r for r in store.wait(2)}
        assert billed(records["resp_a"]) == ("model-a", 50, 20, False)
        assert billed(records["resp_b"]) == ("model-b", 7, 3, False)
        client.close(1000)
        assert read_close(client) == (1000, "")
        tracer.wait_for("relay_complete")
        assert len(store.records) == 2
    finally:
        up.done.set()


def test_client_leaving_after_the_first_of_two_pipelined_responses_is_drained_until_the_second_ends(
        scripted, relay, tracer, store):
    client, up = open_two_responses(scripted, relay)
    try:
        up.send_json(completed("resp_a", 50, 20))
        read_events(client, until="response.completed")
        assert billed(store.wait(1)[0]) == ("model-a", 50, 20, False)
        client.close(4000, "user left")
        assert read_close(client) == (4000, "user left")
        drain = tracer.wait_for("drain_start")
        assert drain["wrote_downstream"] is True
        up.send_json(delta("resp_b", "b1"))
        up.send_json(completed("resp_b", 7, 3))
        tracer.wait_for("drain_terminal")
        records = {r["response_id"]: r for r in store.wait(2)}
        assert billed(records["resp_b"]) == ("model-b", 7, 3, True)
        with pytest.raises(ConnectionClosed) as closed, gevent.Timeout(5):
            up.read_message()  # the client's close reaches the upstream only after the last terminal event
        assert (closed.value.code, closed.value.reason) == (4000, "user left")
        tracer.wait_for("relay_complete")
        assert len(store.records) == 2
    finally:
        up.done.set()
