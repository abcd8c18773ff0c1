"""The account pool end to end: several real fake upstreams behind one relay, on both transports."""

import http.client
import json
import time

import pytest

from tests.helpers import CREATE, connect, free_port, port_of, raw_request, read_until_marker, wait_until
from wsrelay import config as config_mod
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(30)

KEY = "relay-key"


@pytest.fixture
def accounts(fake, relay):
    """``accounts(*fake_options, weights=None, **relay_settings)``: one fake upstream per options dict, each an
    account (``a``, ``b``, ...) with its own key; returns ``(fakes, relay_url)``."""

    def start(*options, weights=None, extra=None, **settings):
        fakes, listed = [], []
        for index, opts in enumerate(options):
            name = "abcdefgh"[index]
            app, url = fake(require_authorization="Bearer sk-" + name, **opts)
            fakes.append(app)
            item = {"name": name, "url": url, "api_key": "sk-" + name}
            if weights:
                item["weight"] = weights[index]
            item.update((extra or {}).get(name, {}))
            listed.append(item)
        settings.setdefault("auth__keys", [KEY])
        return fakes, relay(fakes and listed[0]["url"], upstream__accounts=listed, **settings)

    return start


def ws_turn(url, headers=()):
    client = connect(url, [("Authorization", "Bearer " + KEY)] + list(headers))
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    return client


def post(url, body=None, path="/v1/responses", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=10)
    all_headers = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
    all_headers.update(headers or {})
    conn.request("POST" if path == "/v1/responses" else "GET", path,
                 json.dumps(body or {"model": "m", "input": "hi"}) if path == "/v1/responses" else None,
                 all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def get_json(url, path):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    return response.status, body


@pytest.mark.parametrize("refusal", [(429, 30), (503, None), (401, None), (500, None)])
def test_a_websocket_session_fails_over_and_the_client_never_sees_the_failure(accounts, store, tracer, refusal):
    (a, b), url = accounts({"refuse": refusal}, {})
    ws_turn(url).close()
    assert a.handshakes and b.connections == 1
    record = store.wait(1)[0]
    assert record["account"] == "b" and record["transport"] == "websocket"
    failed = tracer.find("account_dial")[0]
    assert failed["account"] == "a" and failed["failover"] is True
    state = {entry["name"]: entry for entry in get_json(url, "/accounts")[1]["accounts"]}
    expected = {429: "cooling_down", 401: "disabled"}.get(refusal[0], "usable")
    assert state["a"]["state"] == expected


def test_an_http_request_fails_over_including_an_unreachable_account(accounts, relay, store, fake):
    app, good = fake(require_authorization="Bearer sk-b")
    dead = "ws://127.0.0.1:%d/v1/responses" % free_port()
    url = relay(good, auth__keys=[KEY], upstream__accounts=[
        {"name": "a", "url": dead, "api_key": "sk-a"}, {"name": "b", "url": good, "api_key": "sk-b"}])
    response, body = post(url)
    assert response.status == 200 and json.loads(body)["object"] == "response"
    assert store.wait(1)[0]["account"] == "b"


def test_a_429_cools_the_account_down_for_its_retry_after_then_it_is_used_again(accounts, store):
    (a, b), url = accounts({"refuse": (429, 1)}, {})
    ws_turn(url).close()
    a.refuse = None
    for _ in range(2):
        ws_turn(url).close()
    assert a.connections == 0  # still cooling: every session went to b
    time.sleep(1.1)
    for _ in range(2):
        ws_turn(url).close()
    assert a.connections == 1 and b.connections == 4  # back in the round robin


def test_a_refused_credential_disables_the_account(accounts, tracer):
    (a, b), url = accounts({"refuse": (401, None)}, {})
    ws_turn(url).close()
    a.refuse = None
    for _ in range(4):
        ws_turn(url).close()
    assert a.connections == 0 and b.connections == 5
    assert len(tracer.find("account_disabled")) == 1


def test_sessions_spread_by_weight_and_a_conversation_sticks_to_its_account(accounts, store):
    (a, b), url = accounts({}, {}, weights=[3, 1])
    for _ in range(8):
        ws_turn(url).close()
    assert (a.connections, b.connections) == (6, 2)
    for _ in range(4):
        ws_turn(url, [("session-id", "conversation-1")]).close()
    records = store.wait(12)[-4:]
    assert len({r["account"] for r in records}) == 1


def test_a_conversation_moves_when_its_account_cools_down_and_the_new_choice_sticks(accounts, store):
    (a, b), url = accounts({}, {})
    conversation = [("session-id", "c-2")]
    ws_turn(url, conversation).close()
    first = store.wait(1)[0]["account"]
    stuck = a if first == "a" else b
    stuck.refuse = (429, 30)
    ws_turn(url, conversation).close()
    stuck.refuse = None
    ws_turn(url, conversation).close()
    assert [r["account"] for r in store.wait(3)] == [first] + [{"a": "b", "b": "a"}[first]] * 2


def test_the_prompt_cache_key_is_the_conversation_on_http(accounts, store):
    (a, b), url = accounts({}, {})
    for _ in range(4):
        post(url, {"model": "m", "input": "hi", "prompt_cache_key": "pck-1"})
    assert len({r["account"] for r in store.wait(4)}) == 1


def test_an_account_at_max_sessions_sends_the_next_session_elsewhere(accounts, store):
    (a, b), url = accounts({}, {}, extra={"a": {"max_sessions": 1}, "b": {"max_sessions": 1}})
    first = ws_turn(url)
    second = ws_turn(url)
    assert a.connections == 1 and b.connections == 1
    sock, status, headers, body = raw_request(url, [("Authorization", "Bearer " + KEY)])
    assert status == 503 and json.loads(body)["error"]["code"] == "no_upstream_account"
    first.close()
    second.close()


def test_no_usable_account_is_a_503_with_retry_after_and_readyz_says_so(accounts):
    (a, b), url = accounts({"refuse": (429, 20)}, {"refuse": (429, 40)})
    sock, status, headers, body = raw_request(url, [("Authorization", "Bearer " + KEY)])
    assert status == 429  # the last account's own answer, after failing over
    sock, status, headers, body = raw_request(url, [("Authorization", "Bearer " + KEY)])
    assert status == 503 and json.loads(body)["error"]["code"] == "no_upstream_account"
    assert 18 <= int(headers["retry-after"]) <= 20
    response, body = post(url)
    assert response.status == 503 and response.getheader("Retry-After")
    status, ready = get_json(url, "/readyz")
    assert status == 503 and ready["upstream_accounts_usable"] is False


def test_the_accounts_page_shows_states_and_never_a_credential(accounts, relay):
    (a, b), url = accounts({"refuse": (429, 30)}, {})
    ws_turn(url).close()
    wait_until(lambda: not relay.apps[-1].sessions, what="the session ended")
    status, page = get_json(url, "/accounts")
    assert status == 200 and page["ready"] is True
    by_name = {entry["name"]: entry for entry in page["accounts"]}
    assert by_name["a"]["state"] == "cooling_down" and by_name["a"]["until"] > time.time() + 25
    assert by_name["b"]["live_sessions"] == 0 and by_name["b"]["credential"] == "set"
    assert "sk-a" not in json.dumps(page) and "sk-b" not in json.dumps(page)


def test_metrics_count_dials_by_account_and_outcome(accounts, relay):
    (a, b), url = accounts({"refuse": (429, 30)}, {})
    ws_turn(url).close()
    text = relay.apps[-1].metrics.render()[1].decode()
    assert 'wsrelay_account_dials_total{account="a",outcome="rate_limited"} 1.0' in text
    assert 'wsrelay_account_dials_total{account="b",outcome="ok"} 1.0' in text
    assert 'wsrelay_account_failovers_total{account="a"} 1.0' in text
    assert 'wsrelay_account_state{account="a",state="cooling_down"} 1.0' in text


def test_a_reload_changes_the_accounts_without_dropping_live_sessions(accounts, relay, store):
    (a, b), url = accounts({}, {})
    live = ws_turn(url)  # on a
    app = relay.apps[-1]
    reloaded = config_mod.load(None, dict(app.config.values, **{"upstream.accounts": [
        {"name": "b", "url": app.config.values["upstream.accounts"][1]["url"], "api_key": "sk-b"}]}))
    app.reconfigure(reloaded)
    live.send(OP_TEXT, CREATE)  # the session on the removed account goes on
    read_until_marker(live, b'"response.completed"')
    for _ in range(3):
        ws_turn(url).close()
    assert a.connections == 1 and b.connections == 3
    assert [r["account"] for r in store.wait(5)][:2] == ["a", "a"]
    live.close()
    wait_until(lambda: app.pool.accounts["b"].live == 0, what="sessions released")


def test_accounts_need_relay_keys_and_a_credential_each():
    with pytest.raises(config_mod.ConfigError) as failure:
        config_mod.load(None, {"upstream.accounts": [{"name": "a", "api_key": "sk-secret-1"}, {"name": "a"}]})
    problems = "\n".join(failure.value.problems)
    assert "needs auth.keys" in problems and "used twice" in problems and "needs api_key" in problems
    assert "sk-secret-1" not in problems


def test_failover_between_separate_upstream_processes_with_a_served_relay(serve, tmp_path):
    """Every part its own process: two ``wsrelay fake-upstream`` (one answering 429 with Retry-After: 1) and
    ``wsrelay serve`` with the accounts' keys in its environment."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    ports = [free_port(), free_port()]
    fakes = [subprocess.Popen([sys.executable, "-m", "wsrelay", "fake-upstream", "--port", str(port)] + extra,
                              cwd=REPO, stderr=subprocess.DEVNULL)
             for port, extra in zip(ports, (["--refuse", "429", "--retry-after", "1"], []))]
    try:
        for port in ports:
            wait_until(lambda: _accepts(port), timeout=15, what="fake upstream on %d" % port)
        relay_port = free_port()
        path = tmp_path / "relay.yaml"
        path.write_text(json.dumps({
            "server": {"port": relay_port}, "auth": {"keys": [KEY]},
            "usage": {"sqlite_path": str(tmp_path / "usage.db")},
            "upstream": {"accounts": [
                {"name": "limited", "url": "ws://127.0.0.1:%d/v1/responses" % ports[0], "api_key_env": "KEY_A"},
                {"name": "healthy", "url": "ws://127.0.0.1:%d/v1/responses" % ports[1], "api_key_env": "KEY_B"}]}}))
        relay = serve("--config", str(path), env=dict(os.environ, KEY_A="sk-a", KEY_B="sk-b"))
        relay.wait_listening(relay_port)
        url = "ws://127.0.0.1:%d/v1/responses" % relay_port
        ws_turn(url).close()
        wait_until(lambda: "stage=usage_recorded" in relay.stderr(), what="the turn recorded")
        lines = relay.stderr()
        assert "account=limited outcome=rate_limited" in lines and "cooldown_s=1" in lines
        assert "account=healthy" in [line for line in relay.lines if "stage=usage_recorded" in line][0]
        response, body = post(url)  # HTTP while 'limited' cools down: it is not tried
        assert response.status == 200
        assert relay.stderr().count("account=limited outcome=rate_limited") == 1
        time.sleep(1.2)
        for _ in range(2):  # the cooldown is over: 'limited' is back in the round robin, and fails over again
            ws_turn(url).close()
        wait_until(lambda: relay.stderr().count("account=limited outcome=rate_limited") == 2, what="retry")
        assert "sk-a" not in relay.stderr() and "sk-b" not in relay.stderr()
    finally:
        for proc in fakes:
            proc.terminate()
            proc.wait(timeout=5)


def _accepts(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_max_sessions_holds_for_concurrent_handshakes(accounts):
    import gevent

    (a, b), url = accounts({}, {}, extra={"a": {"max_sessions": 1}, "b": {"max_sessions": 1}})
    results = gevent.joinall([gevent.spawn(raw_request, url, [("Authorization", "Bearer " + KEY)])
                              for _ in range(4)], timeout=10)
    statuses = sorted(g.value[1] for g in results)
    assert statuses == [101, 101, 503, 503]
    assert a.connections == 1 and b.connections == 1
    for g in results:
        g.value[0].close()
