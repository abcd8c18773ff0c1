"""Turn resume on the HTTP transport: a real relay in front of the fake upstream, clients over real sockets that
leave mid-stream and retry the way Codex does (same headers, same ``turn_id``, same input)."""

import http.client
import json
import socket

import pytest

from tests.helpers import port_of, stays_false, wait_until
from tests.integration.test_http_transport import KEY, UPSTREAM_KEY, read_stream
from wsrelay import usage
from wsrelay.fake_upstream import turn_events
from wsrelay.sse import encode_event

pytestmark = pytest.mark.timeout(30)

OTHER_KEY = "relay-key-2"
SESSION = "0199aaaa-0000-7000-8000-000000000001"
ITEMS = [{"type": "message", "id": "msg_%d" % i, "role": "user", "content": [{"type": "input_text", "text": str(i)}]}
         for i in range(3)]


@pytest.fixture
def resume_relay(fake, relay):
    """``resume_relay(fake_options, **settings)`` -> ``(fake_app, relay_port, relay_app)``: two relay keys."""

    def start(fake_options=None, **settings):
        app, url = fake(require_authorization="Bearer " + UPSTREAM_KEY, **(fake_options or {}))
        settings.setdefault("auth__keys", [KEY, OTHER_KEY])
        settings.setdefault("upstream__api_key", UPSTREAM_KEY)
        port = port_of(relay(url, **settings))
        return app, port, relay.apps[-1]

    return start


def body(turn="turn-1", items=ITEMS):
    metadata = json.dumps({"session_id": SESSION, "turn_id": turn, "request_kind": "turn"})
    return {"model": "gpt-test", "stream": True, "input": items, "store": False,
            "client_metadata": {"x-codex-turn-metadata": metadata, "turn_id": turn}}


def post(port, payload, key=KEY, session=SESSION):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + key, "Accept": "text/event-stream",
               "session-id": session, "thread-id": session,
               "x-codex-turn-metadata": payload["client_metadata"]["x-codex-turn-metadata"]}
    conn.request("POST", "/v1/responses", json.dumps(payload).encode(), headers)
    return conn, conn.getresponse()


def cut_after_first_events(port, payload, **options):
    """POST, read the first bytes of the stream, then leave without a clean end; returns those bytes."""
    conn, response = post(port, payload, **options)
    assert response.status == 200
    first = response.read1(65536)
    assert first.startswith(b"event: response.created")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return first


def response_id(raw):
    return json.loads(raw.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"]


def posts(app):
    return [r for r in app.http_requests if r[:2] == ("POST", "/v1/responses")]


def whole_turn(port, payload, **options):
    conn, response = post(port, payload, **options)
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events, _, raw = read_stream(response)
    conn.close()
    assert [e[0] for e in events][0] == "response.created" and events[-1][0] == "response.completed", raw
    return events, raw


def test_a_retry_while_the_upstream_streams_gets_the_whole_turn_from_its_start(resume_relay, store, tracer):
    app, port, relay_app = resume_relay({"silence": 1.5})
    first = cut_after_first_events(port, body())
    held = tracer.wait_for("resume_held")
    assert (held["transport"], held["turn_id"], held["upstream_done"]) == ("http", "turn-1", False)
    assert relay_app.resume.total_bytes == held["bytes"] >= len(first)
    events, raw = whole_turn(port, body())
    assert raw.startswith(first), "the retry's stream starts with what the cut attempt had"
    assert events[0][1]["response"]["id"] == response_id(first) == events[-1][1]["response"]["id"]
    hit = tracer.find("resume_hit")[0]
    assert hit["transport"] == "http" and hit["upstream_done"] is False
    assert hit["held_request_id"] == held["request_id"] != hit["request_id"]
    assert len(posts(app)) == 1, "the retry went upstream"
    record = store.wait(1)[0]
    assert record["resumed"] is True and record["client_disconnected"] is False
    assert (record["terminal_event"], record["total_tokens"], record["transport"]) == ("response.completed", 150,
                                                                                       "http")
    assert stays_false(lambda: len(store.records) > 1, 0.3)
    assert relay_app.resume.total_bytes == 0 and relay_app.resume.held == {}


def test_a_retry_after_the_upstream_finished_gets_the_held_turn_billed_once_then(resume_relay, store, tracer):
    app, port, relay_app = resume_relay({"silence": 0.3})
    first = cut_after_first_events(port, body())
    tracer.wait_for("http_request")  # the cut exchange has read its upstream to the end
    assert store.records == [], "a held turn's record waits for its retry or its expiry"
    events, raw = whole_turn(port, body())
    assert raw.startswith(first) and events[0][1]["response"]["id"] == response_id(first)
    assert tracer.find("resume_hit")[0]["upstream_done"] is True
    assert len(posts(app)) == 1
    record = store.wait(1)[0]
    assert record["resumed"] is True and not record["client_disconnected"] and record["total_tokens"] == 150
    assert stays_false(lambda: len(store.records) > 1, 0.3)
    line = tracer.find("usage_recorded")[0]
    assert line["resumed"] is True and line["request_id"] == tracer.find("resume_held")[0]["request_id"]


def test_retries_that_do_not_match_go_upstream_and_leave_the_held_turn(resume_relay, store, tracer):
    app, port, relay_app = resume_relay({"silence": 0.6})
    cut_after_first_events(port, body())
    tracer.wait_for("resume_held")
    whole_turn(port, body(), key=OTHER_KEY)  # another relay key: another conversation, nothing held there
    whole_turn(port, body(turn="turn-2"))
    whole_turn(port, body(items=ITEMS[:-1] + [dict(ITEMS[-1], id="msg_other")]))
    assert len(posts(app)) == 4
    assert [m["reason"] for m in tracer.find("resume_miss")] == ["other_turn", "input_changed"]
    assert all(m["transport"] == "http" for m in tracer.find("resume_miss"))
    assert len(store.wait(3)) == 3 and not any(r["resumed"] for r in store.records)
    # The held turn stayed: the real retry still gets it, and it is billed once, as resumed.
    events, _ = whole_turn(port, body(items=[{"type": "message", "id": "msg_x", "role": "developer"}] + ITEMS))
    assert len(posts(app)) == 4 and tracer.find("resume_hit")
    records = store.wait(4)
    assert [r["resumed"] for r in records] == [False, False, False, True]
    assert records[-1]["response_id"] == events[-1][1]["response"]["id"]


def test_a_retry_after_the_window_is_a_normal_request_and_the_memory_is_given_back(resume_relay, store, tracer):
    app, port, relay_app = resume_relay({"silence": 0.3}, resume__window_seconds=0.8)
    cut_after_first_events(port, body())
    held = tracer.wait_for("resume_held")
    assert held["bytes"] > 0 and relay_app.resume.total_bytes == held["bytes"]
    expired = tracer.wait_for("resume_expired", timeout=3)
    assert expired["transport"] == "http" and expired["upstream_done"] is True
    assert relay_app.resume.total_bytes == 0 and relay_app.resume.held == {}
    record = store.wait(1)[0]  # written at the expiry, as without resume
    assert record["client_disconnected"] and not record["resumed"] and record["total_tokens"] == 150
    whole_turn(port, body())
    assert len(posts(app)) == 2 and not tracer.find("resume_hit")
    assert [r["resumed"] for r in store.wait(2)] == [False, False]


def test_a_turn_held_past_its_window_while_the_upstream_streams_is_drained_and_billed(resume_relay, store, tracer):
    _, port, relay_app = resume_relay({"silence": 1.5}, resume__window_seconds=0.3)
    cut_after_first_events(port, body())
    tracer.wait_for("resume_expired", timeout=3)
    assert relay_app.resume.total_bytes == 0
    assert tracer.find("drain_started") and store.records == []
    record = store.wait(1, timeout=5)[0]
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"]
    assert not record["resumed"] and tracer.find("drain_terminal")


def test_a_resumed_client_that_leaves_again_has_the_turn_held_again(resume_relay, store, tracer):
    app, port, _ = resume_relay({"silence": 1.5})
    first = cut_after_first_events(port, body())
    tracer.wait_for("resume_held")
    again = cut_after_first_events(port, body())
    assert again.startswith(first[:20])
    assert tracer.wait_for("resume_held", count=2)["again"] is True
    events, _ = whole_turn(port, body())
    assert len(posts(app)) == 1 and len(tracer.find("resume_hit")) == 2
    record = store.wait(1)[0]
    assert record["resumed"] and not record["client_disconnected"]
    assert record["response_id"] == events[-1][1]["response"]["id"]
    assert stays_false(lambda: len(store.records) > 1, 0.3)


def test_a_held_turn_whose_upstream_breaks_off_is_billed_and_its_retry_goes_upstream(resume_relay, store, tracer):
    app, port, relay_app = resume_relay({"silence": 0.3, "mode": "drop-mid"})
    cut_after_first_events(port, body())
    tracer.wait_for("resume_held")
    record = store.wait(1)[0]
    assert record["terminal_event"] == usage.RELAY_UPSTREAM_LOST and record["client_disconnected"]
    assert relay_app.resume.total_bytes == 0
    app.mode = "normal"
    whole_turn(port, body())
    assert len(posts(app)) == 2
    assert tracer.find("resume_miss")[0]["reason"] == "upstream_gone"


def test_a_response_larger_than_the_buffer_is_not_held_but_drained(resume_relay, store, tracer):
    _, port, relay_app = resume_relay({"silence": 0.3}, resume__max_buffer_bytes=200)
    cut_after_first_events(port, body())
    record = store.wait(1)[0]
    assert record["client_disconnected"] and not record["resumed"] and record["total_tokens"] == 150
    assert not tracer.find("resume_held") and tracer.find("drain_terminal")
    assert relay_app.resume.held == {}


def test_no_turn_is_held_past_the_total_budget(resume_relay, store, tracer):
    _, port, relay_app = resume_relay({"silence": 0.3}, resume__max_total_bytes=100)
    cut_after_first_events(port, body())
    store.wait(1)
    assert not tracer.find("resume_held") and relay_app.resume.held == {}


def test_a_request_without_a_conversation_or_a_turn_id_is_drained_as_before(resume_relay, store, tracer):
    _, port, _ = resume_relay({"silence": 0.3})
    payload = body()
    del payload["client_metadata"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/responses", json.dumps(payload).encode(), {"Authorization": "Bearer " + KEY,
                                                                         "session-id": SESSION})
    conn.getresponse().read1(65536)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert store.wait(1)[0]["client_disconnected"] and not tracer.find("resume_held")


def test_stopping_the_relay_bills_a_held_turn_at_once(resume_relay, store, tracer):
    _, port, relay_app = resume_relay({"silence": 0.2})
    cut_after_first_events(port, body())
    tracer.wait_for("http_request")
    assert store.records == []
    relay_app.shutdown()
    record = store.wait(1)[0]
    assert record["total_tokens"] == 150 and record["client_disconnected"] and not record["resumed"]
    assert relay_app.resume.held == {} and tracer.find("resume_expired")


def test_resume_off_holds_nothing(resume_relay, store, tracer):
    app, port, _ = resume_relay({"silence": 0.3}, resume__enabled=False)
    cut_after_first_events(port, body())
    store.wait(1)
    whole_turn(port, body())
    assert len(posts(app)) == 2 and not tracer.find("resume_held") and not tracer.find("resume_miss")


def test_held_turns_are_counted_and_their_bytes_are_a_gauge(resume_relay, store, tracer):
    _, port, relay_app = resume_relay({"silence": 1.0})
    cut_after_first_events(port, body())
    tracer.wait_for("resume_held")
    wait_until(lambda: relay_app.resume.total_bytes > 0)
    metrics = relay_app.metrics.render()[1].decode()
    assert 'wsrelay_resume_turns_total{outcome="held",transport="http"} 1.0' in metrics
    assert "wsrelay_resume_held_bytes %s" % float(relay_app.resume.total_bytes) in metrics
    whole_turn(port, body())
    metrics = relay_app.metrics.render()[1].decode()
    assert 'wsrelay_resume_turns_total{outcome="hit",transport="http"} 1.0' in metrics


def test_a_resumed_client_gets_keepalives_while_the_upstream_is_silent(resume_relay, store, tracer):
    _, port, _ = resume_relay({"silence": 1.2}, gateway__openai_http__sse_keepalive_interval_seconds=0.2)
    cut_after_first_events(port, body())
    tracer.wait_for("resume_held")
    events, raw = whole_turn(port, body())
    comments = raw.count(b": keepalive\n\n")
    assert comments >= 3, raw
    at = raw.find(b": keepalive")
    while at >= 0:  # between events, never inside one
        assert raw[:at].endswith(b"\n\n")
        at = raw.find(b": keepalive", at + 1)
    assert tracer.find("http_request")[-1]["keepalives"] == comments
    assert store.wait(1)[0]["resumed"]


def test_a_held_response_that_outgrows_the_buffer_is_billed_at_once_and_not_resumed(resume_relay, store, tracer):
    head, _ = turn_events({"model": "gpt-test"})
    head_bytes = sum(len(encode_event(event)) for event in head)
    app, port, relay_app = resume_relay({"silence": 0.5}, resume__max_buffer_bytes=head_bytes + 10,
                                        resume__window_seconds=1.5)
    cut_after_first_events(port, body())
    assert tracer.wait_for("resume_held")["bytes"] == head_bytes
    record = store.wait(1)[0]  # the upstream's end did not fit: drained and billed as without resume
    assert record["client_disconnected"] and not record["resumed"] and record["total_tokens"] == 150
    assert relay_app.resume.total_bytes == 0
    whole_turn(port, body())
    assert tracer.find("resume_miss")[0]["reason"] == "buffer_overflowed" and len(posts(app)) == 2
    tracer.wait_for("resume_expired", timeout=3)
    assert relay_app.resume.held == {}


def test_a_resumed_turn_gets_what_follows_its_error_event(resume_relay, store, tracer):
    _, port, _ = resume_relay({"silence": 0.8, "mode": "error"})
    cut_after_first_events(port, body())
    tracer.wait_for("resume_held")
    conn, response = post(port, body())
    events, _, _ = read_stream(response)
    conn.close()
    assert [e[0] for e in events][-2:] == ["error", "response.failed"]
    record = store.wait(1)[0]
    assert (record["terminal_event"], record["resumed"]) == ("response.failed", True)
    assert stays_false(lambda: len(store.records) > 1, 0.3)
