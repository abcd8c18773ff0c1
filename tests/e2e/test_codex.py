"""The real Codex CLI through wsrelay, on both of its transports.

Each test runs one ``codex exec`` (see ``tests/codex.py``) against a relay on 127.0.0.1 that holds a relay key
(``auth.keys``) and its own upstream credential, in front of the fake upstream; one test puts a private nginx with
a short ``proxy_read_timeout`` in between.  Codex runs with no retries, so a stream the relay or nginx cuts fails
the run instead of being retried.

- HTTP/SSE, Codex's default for a custom provider: a turn with a silent gap of more than twice nginx's read
  timeout completes, kept open by the relay's ``: keepalive`` comments; and a gap longer than Codex's own idle
  watchdog completes, kept open by the relay's keepalive events (comments do not reset that watchdog).
- ``supports_websockets = true`` with an upstream that refuses WebSocket: Codex's handshake is refused and it
  falls back to HTTP/SSE through the relay.
- ``supports_websockets = true`` with a WebSocket upstream: the turn goes over WebSocket.
- A wrong relay key: Codex's request is refused with 401, the upstream sees nothing.
- Two accounts, the first out of quota mid-turn: the relay closes Codex's connection with 1013 instead of
  passing the error on, and Codex — with its default retries, here only — resends the turn on a new connection,
  which lands on the other account.  (Measured: Codex reconnects some 0.2 s after the close, its first backoff;
  with ``stream_max_retries = 0`` it falls back to HTTP at once instead, and the relay's HTTP transport then gives
  the request to the other account as well.)
- HTTP/SSE, its connection to the relay cut mid-turn (a fault proxy resets it once): Codex, with its default
  retries, sends the same ``POST`` again (same ``session-id``, ``turn_id`` and input; measured some 0.2 s after
  the cut, ``Reconnecting... 1/5``); the relay answers it with the held turn, so the upstream sees one request and
  the turn is billed once, as resumed.
- WebSocket, cut the same way while the upstream is silent mid-turn: Codex retries the turn on a new connection,
  the relay hands it the held turn (the response from its start, then the rest), the upstream runs the turn once
  and the new connection goes on on the held upstream.
"""

import gevent

import time

import pytest

from tests.codex import run_codex
from tests.faultproxy import FaultProxy
from tests.e2e.nginx import NGINX_MISSING_MESSAGE, NginxProxy, nginx_binary
from tests.helpers import APP_KEEPALIVE_INTERVAL, HEAD_EVENTS, first_exit, port_of, wait_until
from wsrelay.sserelay import STAGE_APP, STAGE_SSE_OK

pytestmark = pytest.mark.timeout(60)

RELAY_KEY = "sk-relay-codex-test"
UPSTREAM_KEY = "sk-upstream-codex-test"
HTTP = "gateway__openai_http__"
SSE_KEEPALIVE_INTERVAL = HTTP + "sse_keepalive_interval_seconds"
TURN_TOKENS = 150  # the fake upstream's usage of a turn (a prewarm's is 0)

PROXY_READ_TIMEOUT = 5.0
SILENCE = 12.0          # mid-turn, more than twice nginx's read timeout
WATCHDOG_MS = 4000      # Codex's stream_idle_timeout_ms in the app keepalive test
WATCHDOG_SILENCE = 8.0  # twice that watchdog


def start_relay(relay, upstream_url, **settings):
    """A relay with a relay key and its own upstream credential; returns its ``ws://`` URL."""
    return relay(upstream_url, auth__keys=[RELAY_KEY], upstream__api_key=UPSTREAM_KEY, **settings)


def base_url(ws_url):
    """``ws://host:port/v1/responses`` -> ``http://host:port/v1``."""
    return "http" + ws_url[len("ws"):-len("/responses")]


def upstream_fake(fake, **options):
    """The fake upstream, answering only the relay's upstream credential."""
    return fake(require_authorization="Bearer " + UPSTREAM_KEY, **options)


def assert_upstream_saw_only_its_credential(app):
    seen = [headers for _, _, headers in app.http_requests] + app.handshakes
    assert seen, "the upstream saw no request"
    assert all(headers.get("authorization") == "Bearer " + UPSTREAM_KEY for headers in seen), seen
    assert not any(RELAY_KEY in value for headers in seen for value in headers.values())


def responses_posts(app):
    return [r for r in app.http_requests if r[:2] == ("POST", "/v1/responses")]


def turn_records(store):
    """The usage records of real turns (a prewarm's has no tokens), once there is one."""
    wait_until(lambda: any(r["total_tokens"] for r in store.records), timeout=5.0, what="a turn's usage record")
    return [r for r in store.records if r["total_tokens"]]


def assert_one_completed_turn(store, transport):
    records = turn_records(store)
    assert len(records) == 1, store.records
    record = records[0]
    assert record["transport"] == transport, record
    assert record["terminal_event"] == "response.completed" and record["total_tokens"] == TURN_TOKENS, record
    assert record["client_disconnected"] is False, record
    assert all(r["transport"] == transport for r in store.records), store.records
    return record


def test_codex_over_http_completes_a_silent_turn_behind_nginx_kept_open_by_sse_comments(
        fake, relay, store, tracer, tmp_path):
    if nginx_binary() is None:
        pytest.fail(NGINX_MISSING_MESSAGE, pytrace=False)
    app, upstream_url = upstream_fake(fake, silence=SILENCE)
    # Only the SSE comments may keep nginx's read timer from expiring: no keepalive events.
    url = start_relay(relay, upstream_url, **{SSE_KEEPALIVE_INTERVAL: 1, APP_KEEPALIVE_INTERVAL: 0})
    with NginxProxy(port_of(url), read_timeout=PROXY_READ_TIMEOUT) as proxy:
        run = run_codex(tmp_path, proxy.http_url("/v1"), RELAY_KEY)
        run.assert_completed()
        assert "upstream timed out" not in proxy.error_log()
    assert run.elapsed >= SILENCE, run.describe()
    assert len(store.wait(1)) == 1, store.records  # HTTP has no prewarm: the turn alone
    assert_one_completed_turn(store, "http")
    assert len(responses_posts(app)) == 1 and app.handshakes == [], (app.http_requests, app.handshakes)
    assert responses_posts(app)[0][2]["accept"] == "text/event-stream"
    assert_upstream_saw_only_its_credential(app)
    assert len(tracer.find(STAGE_SSE_OK)) >= SILENCE - 3 and not tracer.find(STAGE_APP), tracer.stages()


def test_codex_over_http_outlasts_its_idle_watchdog_with_keepalive_events(fake, relay, store, tracer, tmp_path):
    app, upstream_url = upstream_fake(fake, silence=WATCHDOG_SILENCE)
    url = start_relay(relay, upstream_url, **{SSE_KEEPALIVE_INTERVAL: 1, APP_KEEPALIVE_INTERVAL: 1})
    run = run_codex(tmp_path, base_url(url), RELAY_KEY, stream_idle_timeout_ms=WATCHDOG_MS)
    run.assert_completed()
    assert run.elapsed >= WATCHDOG_SILENCE, run.describe()
    assert_one_completed_turn(store, "http")
    assert len(responses_posts(app)) == 1, app.http_requests
    assert len(tracer.find(STAGE_APP)) >= WATCHDOG_SILENCE - 3, tracer.stages()


def test_codex_with_websockets_falls_back_to_http_when_the_upstream_refuses_websocket(
        fake, relay, store, tracer, tmp_path):
    app, upstream_url = upstream_fake(fake, refuse_websocket=426)
    url = start_relay(relay, upstream_url)
    run = run_codex(tmp_path, base_url(url), RELAY_KEY, supports_websockets=True, stream_max_retries=5)
    run.assert_completed()
    # Codex asked for WebSocket; the relay's dial was refused with 426 and so was Codex's handshake, which makes
    # Codex fall back at once (a 502 would cost it its 5 reconnects first); then came HTTP.
    refused = tracer.find("dial_failed")
    assert [fields["status"] for fields in refused] == [426], tracer.events
    tracer.wait_for("http_request")  # traced once the exchange has ended, maybe just after Codex exited
    stages = tracer.stages()
    requests = tracer.find("http_request")
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [("POST", "/v1/responses", 200)], requests
    assert stages.index("http_request") > max(i for i, stage in enumerate(stages) if stage == "dial_failed")
    assert app.handshakes and app.connections == 0
    assert all(h.get("openai-beta", "").startswith("responses_websockets=") for h in app.handshakes)
    assert len(responses_posts(app)) == 1, app.http_requests
    assert_one_completed_turn(store, "http")
    assert_upstream_saw_only_its_credential(app)


def test_codex_with_websockets_completes_a_turn_over_websocket_through_the_relay(fake, relay, store, tmp_path):
    app, upstream_url = upstream_fake(fake)
    url = start_relay(relay, upstream_url)
    run = run_codex(tmp_path, base_url(url), RELAY_KEY, supports_websockets=True)
    run.assert_completed()
    assert_one_completed_turn(store, "websocket")
    assert app.connections >= 1 and app.http_requests == [], app.http_requests
    assert_upstream_saw_only_its_credential(app)


def test_codex_with_a_wrong_relay_key_is_refused_over_http_and_the_upstream_sees_nothing(
        fake, relay, store, tracer, tmp_path):
    app, upstream_url = upstream_fake(fake)
    url = start_relay(relay, upstream_url)
    run = run_codex(tmp_path, base_url(url), "sk-not-a-relay-key")
    # Codex prints the status and the message of OpenAI's error body.
    assert run.rc not in (0, None) and "401 Unauthorized: invalid relay key" in run.stderr, run.describe()
    tracer.wait_for("http_request")
    assert [(r["method"], r["status"]) for r in tracer.find("http_request")] == [("POST", 401)]
    assert app.http_requests == [] and app.handshakes == [] and store.records == []


def test_codex_with_websockets_resends_a_turn_cut_by_a_quota_error_on_another_account(
        fake, relay, store, tracer, tmp_path):
    quota, quota_url = fake(mode="quota-mid", require_authorization="Bearer sk-upstream-a")
    healthy, healthy_url = fake(require_authorization="Bearer sk-upstream-b")
    # Two accounts of equal weight: the first choice is the first listed, a.
    url = relay(quota_url, auth__keys=[RELAY_KEY], upstream__accounts=[
        {"name": "a", "url": quota_url, "api_key": "sk-upstream-a"},
        {"name": "b", "url": healthy_url, "api_key": "sk-upstream-b"}])
    times = {}
    tracer.listeners.append(lambda stage, fields: times.setdefault((stage, fields.get("account")), time.monotonic()))
    # Codex's own defaults for a provider's retries.
    run = run_codex(tmp_path, base_url(url), RELAY_KEY, supports_websockets=True, stream_max_retries=5,
                    request_max_retries=4)
    run.assert_completed()
    exhausted = tracer.wait_for("account_quota_exhausted")
    assert (exhausted["account"], exhausted["code"]) == ("a", "rate_limit_exceeded")
    first = first_exit(tracer)
    assert (first["cause"], first["close_code"]) == ("account_quota_exhausted", 1013), first
    # One connection to each account, both WebSocket; the retry carries the same conversation headers.
    assert len(quota.handshakes) == 1 and len(healthy.handshakes) == 1
    assert quota.http_requests == [] and healthy.http_requests == []
    assert healthy.handshakes[0]["session-id"] == quota.handshakes[0]["session-id"]
    reconnect = times[("dial_ok", "b")] - times[("account_quota_exhausted", "a")]
    assert 0 < reconnect < 5, reconnect
    wait_until(lambda: quota.closes, what="account a's upstream getting the relay's close")
    assert quota.closes == [(1000, "account quota exhausted")]
    # Each account's usage under its name: a the prewarm and the cut turn, b the turn Codex resent.
    wait_until(lambda: any(r["account"] == "b" for r in store.records), what="the turn on b recorded")
    by_account = {name: [(r["terminal_event"], r["total_tokens"], r["client_disconnected"], r["transport"])
                         for r in store.records if r["account"] == name] for name in ("a", "b")}
    assert by_account == {"a": [("response.completed", 0, False, "websocket"), ("error", 0, False, "websocket")],
                          "b": [("response.completed", TURN_TOKENS, False, "websocket")]}, store.records


def test_codex_over_http_gets_its_cut_turn_back_from_the_relay_and_the_upstream_runs_it_once(
        fake, relay, store, tracer, tmp_path):
    app, upstream_url = upstream_fake(fake, silence=3.0)
    url = start_relay(relay, upstream_url)
    proxy = FaultProxy(port_of(url))

    def cut_once():
        wait_until(lambda: responses_posts(app), timeout=30, what="Codex's request upstream")
        gevent.sleep(0.5)  # the turn's first events have reached Codex; the upstream is silent
        proxy.cut()

    cutter = gevent.spawn(cut_once)
    try:
        # Codex's own defaults for a provider's retries.
        run = run_codex(tmp_path, "http://127.0.0.1:%d/v1" % proxy.port, RELAY_KEY, stream_max_retries=5,
                        request_max_retries=4)
    finally:
        cutter.kill()
        proxy.close()
    run.assert_completed()
    assert "Reconnecting... 1/5" in run.stderr, run.describe()
    held, hit = tracer.wait_for("resume_held"), tracer.wait_for("resume_hit")
    assert held["transport"] == hit["transport"] == "http" and held["turn_id"] == hit["turn_id"]
    assert len(responses_posts(app)) == 1, app.http_requests
    record = turn_records(store)[0]
    assert len(store.records) == 1, store.records
    assert (record["resumed"], record["client_disconnected"], record["total_tokens"]) == (True, False, TURN_TOKENS)
    assert not tracer.find("resume_miss"), tracer.find("resume_miss")


def test_codex_with_websockets_gets_a_turn_cut_mid_stream_back_from_the_relay_on_its_retry(
        fake, relay, store, tracer, tmp_path):
    app, upstream_url = upstream_fake(fake, silence=4.0)
    url = start_relay(relay, upstream_url)
    relay_app = relay.apps[-1]
    proxy = FaultProxy(port_of(url))
    times = {}
    tracer.listeners.append(lambda stage, fields: times.setdefault(stage, []).append(time.monotonic()))

    def cut_once():
        tracer.wait_for("turn_start", count=2, timeout=40)  # Codex's prewarm, then the turn
        [session] = relay_app.sessions
        # The prewarm's two events and the turn's first ones have reached Codex: the upstream is silent now.
        wait_until(lambda: session.up.walker.data_frames >= 2 + HEAD_EVENTS, what="the turn's first events")
        times["cut"] = [time.monotonic()]
        proxy.cut()

    cutter = gevent.spawn(cut_once)
    try:
        run = run_codex(tmp_path, "http://127.0.0.1:%d/v1" % proxy.port, RELAY_KEY, supports_websockets=True,
                        stream_max_retries=5, request_max_retries=4)  # Codex's own defaults
    finally:
        proxy.close()
        cutter.kill()
    run.assert_completed()
    assert "cut" in times, "the cut never happened"
    held, hit = tracer.wait_for("resume_held"), tracer.wait_for("resume_hit")
    assert held["cause"] in ("client_reset", "client_eof") and hit["session"] == held["session"]
    # The upstream ran the turn once: the prewarm and one real request, both on the first connection.
    turns = [(number, r) for number, r in app.requests if r.get("generate") is not False]
    assert [number for number, _ in turns] == [1], app.requests
    assert len(app.requests) == 2 and app.http_requests == []
    # Codex's retry: a new connection with the conversation's headers (its own upstream went unused).
    assert len(app.handshakes) == 2 and app.handshakes[1]["session-id"] == app.handshakes[0]["session-id"]
    records = turn_records(store)
    assert len(records) == 1, store.records
    record = records[0]
    assert (record["resumed"], record["client_disconnected"], record["total_tokens"]) == (True, False, TURN_TOKENS)
    assert record["terminal_event"] == "response.completed"
    assert not tracer.find("resume_miss") and not tracer.find("drain_start")
    wait_until(lambda: not relay_app.resume.held and relay_app.resume.total_bytes == 0)
    reconnect = times["resume_hit"][0] - times["cut"][0]
    assert 0 < reconnect < 5, reconnect
