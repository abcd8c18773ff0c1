"""Turn resume on the WebSocket transport, with raw clients: a client cut mid-turn retries the way Codex does (a new
connection, the same session-id, the same turn_id, the full input, no previous_response_id) and gets the held
response instead of a second run upstream; every other retry is a new session."""

import json
import socket
import struct

import pytest

from tests.helpers import HEAD_EVENTS, connect, read_events, stays_false, wait_until
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(30)

KEY, OTHER_KEY = "sk-relay-resume-a", "sk-relay-resume-b"
TURN_TOKENS = 150
ITEMS = [{"type": "message", "id": "msg_%d" % i, "role": "user",
          "content": [{"type": "input_text", "text": "question %d" % i}]} for i in range(3)]
SILENCE = 1.0  # the fake upstream's pause mid-turn, where the cut lands


def start(fake, relay, silence=SILENCE, **settings):
    """The fake upstream (silent mid-turn) and a relay with two relay keys; ``(upstream app, url, relay app)``."""
    app, upstream_url = fake(silence=silence)
    settings.setdefault("resume__window_seconds", 10)
    url = relay(upstream_url, auth__keys=[KEY, OTHER_KEY], upstream__api_key="sk-upstream", **settings)
    return app, url, relay.apps[-1]


def client(url, key=KEY, session="s-1"):
    return connect(url, [("Authorization", "Bearer " + key), ("session-id", session)])


def create(peer, turn="t-1", items=ITEMS[-1:], previous=None):
    """A Codex-shaped response.create: its turn_id in client_metadata."""
    body = {"type": "response.create", "model": "gpt-test", "input": list(items), "client_metadata": {
        "x-codex-turn-metadata": json.dumps({"turn_id": turn, "request_kind": "turn"})}}
    if previous:
        body["previous_response_id"] = previous
    peer.send(OP_TEXT, json.dumps(body).encode())


def reset(peer):
    """End the connection with a TCP reset, no close frame (a network cut)."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.close()


def cut_mid_turn(url, tracer, **who):
    """A client sends the turn's request (the new item only), reads the response's first events, and is cut
    during the upstream's silence; returns those events once the relay holds the turn."""
    first = client(url, **who)
    create(first)
    head = read_events(first, count=HEAD_EVENTS)
    reset(first)
    tracer.wait_for("resume_held")
    return head


def requests_by_connection(app):
    return [number for number, _ in app.requests]


def scrape(relay_app):
    """The relay's metrics as ``{"name{labels}": value}``."""
    _, body = relay_app.metrics.render()
    lines = [line.rpartition(" ") for line in body.decode().splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, _, value in lines}


def turn_records(store, count):
    wait_until(lambda: len([r for r in store.records if r["total_tokens"]]) >= count, what="%d records" % count)
    return [r for r in store.records if r["total_tokens"]]


def test_a_retry_of_a_cut_turn_gets_the_held_response_and_the_upstream_runs_it_once(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay)
    head = cut_mid_turn(url, tracer)
    held = tracer.find("resume_held")[0]
    assert held["turn_id"] == "t-1" and held["bytes"] > 0 and relay_app.resume.total_bytes > 0
    retry = client(url)
    create(retry, items=ITEMS)  # the full input, of which the cut request's is the end
    events = read_events(retry, until="response.completed")
    assert events[:HEAD_EVENTS] == head, "the retry gets the response from its start"
    assert [e["type"] for e in events[HEAD_EVENTS:]] == ["response.output_item.done", "response.completed"]
    assert requests_by_connection(app) == [1], app.requests
    hit = tracer.wait_for("resume_hit")
    assert hit["session"] == held["session"] and hit["replayed_bytes"] > 0
    [record] = turn_records(store, 1)
    assert (record["resumed"], record["client_disconnected"], record["total_tokens"]) == (True, False, TURN_TOKENS)
    assert relay_app.resume.total_bytes == 0 and not relay_app.resume.held
    # One session, counted once on its account, though two connections' greenlets carry it (each connection
    # counts against the connection limits while it lasts).
    assert relay_app.pool.accounts["default"].live == 1 and len(relay_app.sessions) == 1
    # The retry's client goes on on the held upstream: its previous_response_id is known there.
    create(retry, turn="t-2", items=[dict(ITEMS[0], id="msg_next")], previous=events[-1]["response"]["id"])
    read_events(retry, until="response.completed")
    assert requests_by_connection(app) == [1, 1], app.requests
    assert app.connections == 2 and (1000, "not used") in app.closes  # the retry's own upstream went unused
    records = turn_records(store, 2)
    assert [r["resumed"] for r in records] == [True, False]
    assert len(store.records) == 2
    assert not tracer.find("resume_miss")
    metrics = scrape(relay_app)
    assert metrics['wsrelay_resume_turns_total{outcome="held",transport="websocket"}'] == 1
    assert metrics['wsrelay_resume_turns_total{outcome="hit",transport="websocket"}'] == 1
    assert metrics["wsrelay_resume_held_bytes"] == 0 and metrics["wsrelay_resume_held_turns"] == 0


@pytest.mark.parametrize("retry, reason", [
    ({"key": OTHER_KEY}, None),
    ({"turn": "t-other"}, "other_turn"),
    ({"items": ITEMS[:1] + [dict(ITEMS[2], content=[{"type": "input_text", "text": "changed"}])]}, "input_changed"),
], ids=["other_key", "other_turn", "changed_input"])
def test_a_retry_that_is_not_the_held_turn_goes_upstream_as_a_new_request(fake, relay, store, tracer, retry, reason):
    app, url, relay_app = start(fake, relay)
    cut_mid_turn(url, tracer)
    other = client(url, key=retry.get("key", KEY))
    create(other, turn=retry.get("turn", "t-1"), items=retry.get("items", ITEMS))
    events = read_events(other, until="response.completed")
    assert events[0]["type"] == "response.created"
    assert requests_by_connection(app) == [1, 2], app.requests
    assert not tracer.find("resume_hit")
    if reason is None:  # another key's conversation: nothing was looked at, the held turn waits on
        assert not tracer.find("resume_miss") and relay_app.resume.held
    else:
        assert tracer.wait_for("resume_miss")["reason"] == reason
        assert tracer.wait_for("resume_released")["reason"] == "retry_missed"
        wait_until(lambda: not relay_app.resume.held and relay_app.resume.total_bytes == 0)
        # Released, the cut turn is drained and billed as without resume, once.
        records = turn_records(store, 2)
        assert sorted((r["resumed"], r["client_disconnected"]) for r in records) == [(False, False), (False, True)]


def test_a_retry_after_the_window_is_a_new_session_and_the_held_memory_is_freed(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay, silence=2.0, resume__window_seconds=0.5)
    cut_mid_turn(url, tracer)
    held = scrape(relay_app)
    assert held["wsrelay_resume_held_bytes"] == relay_app.resume.total_bytes > 0
    assert held["wsrelay_resume_held_turns"] == 1 and held["wsrelay_resume_copy_bytes"] == 0
    expired = tracer.wait_for("resume_expired")
    assert expired["turn_in_flight"] is True
    assert relay_app.resume.total_bytes == 0 and not relay_app.resume.held
    assert scrape(relay_app)["wsrelay_resume_held_bytes"] == 0
    # The hold over, the turn is drained to its terminal event and billed as the client's leaving was.
    [cut] = turn_records(store, 1)
    assert (cut["resumed"], cut["client_disconnected"]) == (False, True)
    wait_until(lambda: (1001, "client disconnected") in app.closes, what="the held upstream closed")
    late = client(url)
    create(late, items=ITEMS)
    read_events(late, until="response.completed")
    assert requests_by_connection(app) == [1, 2]
    assert not tracer.find("resume_miss") and not tracer.find("resume_hit")


def test_a_response_over_the_buffer_limit_is_not_held(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay, resume__max_buffer_bytes=300)
    first = client(url)
    create(first)
    read_events(first, count=HEAD_EVENTS)
    reset(first)
    skipped = tracer.wait_for("resume_skipped")
    assert (skipped["reason"], skipped["cause"]) == ("buffer_overflowed", "client_reset")
    skips = 'wsrelay_resume_turns_total{outcome="skipped_buffer_overflowed",transport="websocket"}'
    assert scrape(relay_app)[skips] == 1
    assert not relay_app.resume.held
    retry = client(url)
    create(retry, items=ITEMS)
    read_events(retry, until="response.completed")
    assert requests_by_connection(app) == [1, 2]


def test_sessions_without_a_conversation_or_with_resume_off_keep_no_copy(fake, relay, tracer):
    app, url, relay_app = start(fake, relay, silence=0.5)
    anonymous = connect(url, [("Authorization", "Bearer " + KEY)])
    create(anonymous)
    read_events(anonymous, count=HEAD_EVENTS)
    [session] = relay_app.sessions
    assert session.resume is None and scrape(relay_app)["wsrelay_resume_copy_bytes"] == 0
    reset(anonymous)
    tracer.wait_for("drain_terminal")
    assert not tracer.find("resume_held") and not tracer.find("resume_skipped")
    _, url_off, relay_off = start(fake, relay, silence=0.5, resume__enabled=False)
    named = client(url_off)
    create(named)
    read_events(named, count=HEAD_EVENTS)
    [session] = relay_off.sessions
    assert session.resume is None
    # With resume on, a named conversation's turn in flight is copied.
    _, url_on, relay_on = start(fake, relay, silence=0.5)
    named = client(url_on)
    create(named)
    read_events(named, count=HEAD_EVENTS)
    [session] = relay_on.sessions
    assert session.resume.copy and scrape(relay_on)["wsrelay_resume_copy_bytes"] == session.resume.size > 0
    read_events(named, until="response.completed")
    assert session.resume.copy is None and session.resume.request is None  # dropped at the turn's end


def test_a_clean_close_mid_turn_is_not_held(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay)
    first = client(url)
    create(first)
    read_events(first, count=HEAD_EVENTS)
    first.close(1000, "bye")
    skipped = tracer.wait_for("resume_skipped")
    assert skipped["reason"] == "client_close"
    assert stays_false(lambda: relay_app.resume.held, 0.2)


def test_server_shutdown_ends_a_hold_and_writes_its_record(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay, silence=0.3)
    cut_mid_turn(url, tracer)
    # The response ends during the hold: its record waits for the turn's fate.
    wait_until(lambda: not list(relay_app.sessions)[0].ledger.in_flight, what="the held response's end")
    assert not [r for r in store.records if r["total_tokens"]]
    relay_app.shutdown()
    assert tracer.wait_for("resume_released")["reason"] == "server_shutdown"
    [record] = turn_records(store, 1)
    assert (record["resumed"], record["client_disconnected"]) == (False, True)
    wait_until(lambda: not relay_app.resume.held and not relay_app.sessions)


def test_a_retry_cut_again_is_resumed_again_from_the_response_start(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay, silence=1.5)
    head = cut_mid_turn(url, tracer)
    second = client(url)
    create(second, items=ITEMS)
    assert read_events(second, count=HEAD_EVENTS) == head
    tracer.wait_for("resume_hit")
    reset(second)
    tracer.wait_for("resume_held", count=2)
    third = client(url)
    create(third, items=ITEMS)
    events = read_events(third, until="response.completed")
    assert events[:HEAD_EVENTS] == head
    assert requests_by_connection(app) == [1]
    [record] = turn_records(store, 1)
    assert record["resumed"] is True and len(store.records) == 1


def test_a_response_that_ended_while_held_is_resumed_whole(fake, relay, store, tracer):
    app, url, relay_app = start(fake, relay, silence=0.3)
    head = cut_mid_turn(url, tracer)
    wait_until(lambda: not list(relay_app.sessions)[0].ledger.in_flight, what="the held response's end")
    assert not store.records  # kept back until the turn's fate is known
    retry = client(url)
    create(retry, items=ITEMS)
    events = read_events(retry, until="response.completed")
    assert events[:HEAD_EVENTS] == head and len(events) == HEAD_EVENTS + 2
    assert tracer.wait_for("resume_hit")["turn_in_flight"] is False
    [record] = turn_records(store, 1)
    assert (record["resumed"], record["client_disconnected"]) == (True, False)
    assert requests_by_connection(app) == [1]


def test_a_retry_after_the_held_upstream_died_runs_upstream_again(fake, relay, store, tracer):
    app, upstream_url = fake(mode="drop-mid", silence=0.3)
    url = relay(upstream_url, auth__keys=[KEY], upstream__api_key="sk-upstream", resume__window_seconds=10)
    relay_app = relay.apps[-1]
    cut_mid_turn(url, tracer)
    assert tracer.wait_for("resume_released")["reason"] == "upstream_gone"
    assert relay_app.resume.total_bytes == 0  # an empty entry stays, to tell the retry why it missed
    retry = client(url)
    create(retry, items=ITEMS)
    read_events(retry, count=HEAD_EVENTS)
    assert tracer.wait_for("resume_miss")["reason"] == "upstream_gone"
    assert requests_by_connection(app) == [1, 2] and not relay_app.resume.held
    lost = [r for r in store.records if r["terminal_event"] == "wsrelay.upstream_lost"]
    assert len(lost) == 1 and lost[0]["resumed"] is False


def test_client_messages_that_start_no_turn_are_not_kept(fake, relay, tracer):
    app, upstream_url = fake(mode="echo")
    url = relay(upstream_url, auth__keys=[KEY], upstream__api_key="sk-upstream")
    peer = client(url)
    for _ in range(5):
        peer.send(OP_TEXT, b'{"type": "response.cancel", "padding": "%s"}' % (b"x" * 1000))
        peer.read_message()
    [session] = relay.apps[-1].sessions
    assert session.resume.size < 1100  # the last message at most, until the next one comes
