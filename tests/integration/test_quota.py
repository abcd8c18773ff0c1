"""Quota hit mid-session, over real sockets: two fake upstreams as two accounts of the relay's pool.

Account ``a`` runs out of quota in the middle of every turn (an ``error`` event, status 429); account ``b`` is
healthy.  The client of a session on ``a`` gets close 1013 instead of the error, ``a`` cools down and the next
session lands on ``b``.  With no other account usable, the error reaches the client unchanged.
"""

import json
import time
import urllib.request

import pytest

from tests.helpers import (HEAD_EVENTS, connect, first_exit, read_events, read_frames_until, send_create, stays_false,
                           wait_until)
from wsrelay import frames
from wsrelay.frames import OP_CLOSE, OP_TEXT

pytestmark = pytest.mark.timeout(30)

RELAY_KEY = "sk-relay-quota-test"
AUTH = [("Authorization", "Bearer " + RELAY_KEY)]
SESSION = [("session-id", "conversation-1")]


def account(name, url):
    return {"name": name, "url": url, "api_key": "sk-upstream-" + name}


def pool_relay(relay, *accounts, **settings):
    """A relay with a relay key and ``accounts`` (``(name, url)``); returns ``(ws url, RelayApp)``."""
    url = relay(accounts[0][1], auth__keys=[RELAY_KEY], upstream__accounts=[account(*a) for a in accounts],
                **settings)
    return url, relay.apps[-1]


def accounts_status(relay_url):
    base = "http://" + relay_url[len("ws://"):].split("/")[0]
    with urllib.request.urlopen(base + "/accounts", timeout=5) as response:
        return {a["name"]: a for a in json.loads(response.read())["accounts"]}


def records_of(store, name):
    return [r for r in store.records if r["account"] == name]


def test_a_quota_error_mid_turn_closes_the_client_with_1013_and_the_next_session_lands_on_another_account(
        fake, relay, tracer, store):
    a, a_url = fake(mode="quota-mid")
    b, b_url = fake()
    url, app = pool_relay(relay, ("a", a_url), ("b", b_url))
    client = connect(url, AUTH + SESSION)
    assert len(a.handshakes) == 1 and b.handshakes == []  # the first choice of two equal weights is the first
    send_create(client)
    seen = read_frames_until(client, lambda opcode, payload: opcode == OP_CLOSE)
    events = [json.loads(payload) for opcode, payload, _ in seen if opcode == OP_TEXT]
    assert len(events) == HEAD_EVENTS and events[-1]["type"] == "response.output_text.delta", events
    assert frames.parse_close(seen[-1][1]) == (1013, "try again later")
    assert not any(b'"error"' in payload for _, payload, _ in seen)  # the error event never reached the client
    exhausted = tracer.wait_for("account_quota_exhausted")
    assert (exhausted["account"], exhausted["code"], exhausted["status"]) == ("a", "rate_limit_exceeded", 429)
    assert exhausted["cooldown_s"] == 60.0  # the event has no Retry-After: upstream.default_cooldown_seconds
    first = first_exit(tracer)
    assert (first["cause"], first["side"], first["close_code"], first["graceful"]) == (
        "account_quota_exhausted", "client", 1013, True)
    wait_until(lambda: a.closes, what="account a's upstream getting the relay's close")
    assert a.closes == [(1000, "account quota exhausted")]  # the upstream is closed normally

    tracer.wait_for("relay_complete")
    [record] = records_of(store, "a")
    assert record["terminal_event"] == "error" and record["client_disconnected"] is False, record
    assert record["model"] == "gpt-test" and record["response_id"].startswith("resp_"), record
    status = accounts_status(url)
    assert status["a"]["state"] == "cooling_down" and status["a"]["last_failure"] == "rate_limit_exceeded"
    assert status["b"]["state"] == "usable"
    assert app.pool.accounts["a"].cooldown_until > time.monotonic() + 50

    # The client comes back (the same conversation, stuck to a): a is cooling down, so it gets b.
    again = connect(url, AUTH + SESSION)
    assert len(a.handshakes) == 1 and len(b.handshakes) == 1
    send_create(again)
    assert read_events(again, until="response.completed")[-1]["type"] == "response.completed"
    wait_until(lambda: records_of(store, "b"), what="the turn on b recorded")
    [done] = records_of(store, "b")
    assert done["terminal_event"] == "response.completed" and done["total_tokens"] == 150, done
    assert len(records_of(store, "a")) == 1
    again.close(1000, "done")


def test_with_no_other_account_the_quota_error_reaches_the_client_unchanged_and_the_session_goes_on(
        fake, relay, tracer, store):
    a, a_url = fake(mode="quota-mid")
    url, _ = pool_relay(relay, ("a", a_url))
    client = connect(url, AUTH)
    for turn in (1, 2):
        send_create(client)
        events = read_events(client, until="error")
        assert len(events) == HEAD_EVENTS + 1
        error = events[-1]
        assert error == {"type": "error", "status": 429, "error": {
            "type": "requests", "code": "rate_limit_exceeded",
            "message": "fake upstream: rate limit reached for requests"}}
        assert stays_false(lambda: tracer.find("first_exit"), 0.2), tracer.stages()
    assert tracer.find("account_quota_exhausted") == []
    client.close(1000, "done")
    tracer.wait_for("relay_complete")
    assert [r["terminal_event"] for r in store.records] == ["error", "error"]


def test_when_the_other_account_is_not_usable_now_the_quota_error_is_forwarded(fake, relay, tracer, store):
    a, a_url = fake(mode="quota-mid")
    b, b_url = fake()
    url, app = pool_relay(relay, ("a", a_url), ("b", b_url))
    client = connect(url, AUTH)
    assert len(a.handshakes) == 1
    app.pool.cool_down(app.pool.accounts["b"], time.monotonic(), 60)
    send_create(client)
    assert read_events(client, until="error")[-1]["error"]["code"] == "rate_limit_exceeded"
    assert stays_false(lambda: tracer.find("first_exit"), 0.2), tracer.stages()
    assert accounts_status(url)["a"]["state"] == "usable"
    client.close(1000, "done")


def test_the_events_retry_after_sets_the_cooldown_and_other_errors_pass(scripted, fake, relay, tracer, store):
    a, a_url = scripted()
    b, b_url = fake()
    url, app = pool_relay(relay, ("a", a_url), ("b", b_url))
    client = connect(url, AUTH)
    upstream = a.next()
    send_create(client)
    upstream.read_message()
    upstream.send_json({"type": "response.created", "response": {"id": "resp_q"}})
    # Not a quota error: forwarded as it is, and the session goes on.
    bad = {"type": "error", "status": 400, "error": {"type": "invalid_request_error", "code": "bad_input"}}
    upstream.send_json(bad)
    assert read_events(client, count=2)[-1] == bad
    send_create(client)
    upstream.read_message()
    quota = {"type": "error", "error": {"type": "insufficient_quota", "code": "insufficient_quota"},
             "headers": {"Retry-After": "7"}}
    upstream.send_json(quota)
    assert frames.parse_close(read_frames_until(client, lambda op, _: op == OP_CLOSE)[-1][1]) == (
        1013, "try again later")
    exhausted = tracer.wait_for("account_quota_exhausted")
    assert (exhausted["code"], exhausted["cooldown_s"], exhausted["status"]) == ("insufficient_quota", 7.0, None)
    assert 5 < app.pool.accounts["a"].cooldown_until - time.monotonic() <= 7
    upstream.done.set()
    tracer.wait_for("relay_complete")
    assert [(r["terminal_event"], r["account"]) for r in store.records] == [("error", "a"), ("error", "a")]
