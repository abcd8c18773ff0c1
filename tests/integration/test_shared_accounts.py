"""The account pool's state shared by relay instances through a real Redis: a cooldown or a disable learnt by
one instance keeps the others off the account, and a conversation keeps its account on every instance."""

import http.client
import json

import pytest

from tests.helpers import CREATE, connect, port_of, read_until_marker
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(30)

KEY = "relay-key"


@pytest.fixture
def pair(fake, relay, redis_url):
    """Two fake upstreams as accounts ``a`` and ``b``, and two relays with both accounts sharing the test's
    Redis: ``((fake_a, fake_b), (url_1, url_2))``."""

    def start(**settings):
        fakes, listed = [], []
        for name in "ab":
            app, url = fake(require_authorization="Bearer sk-" + name)
            fakes.append(app)
            listed.append({"name": name, "url": url, "api_key": "sk-" + name})
        settings.setdefault("limits__redis_url", redis_url)
        return fakes, [relay(listed[0]["url"], auth__keys=[KEY], upstream__accounts=listed, **settings)
                       for _ in range(2)]

    return start


def ws_turn(url, headers=()):
    client = connect(url, [("Authorization", "Bearer " + KEY)] + list(headers))
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    client.close(1000)


def accounts_page(url):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=5)
    conn.request("GET", "/accounts")
    page = json.loads(conn.getresponse().read())
    conn.close()
    return {entry["name"]: entry for entry in page["accounts"]}


@pytest.mark.parametrize("refusal, state", [((429, 30), "cooling_down"), ((401, None), "disabled")])
def test_an_account_cooled_down_or_disabled_through_one_instance_is_not_chosen_by_the_other(pair, refusal, state):
    (a, b), (one, other) = pair()
    a.refuse = refusal
    ws_turn(one)  # a refuses, the session fails over to b; a is out for every instance
    assert len(a.handshakes) == 1 and b.connections == 1
    a.refuse = None
    page = accounts_page(other)
    assert page["a"]["state"] == state and page["a"]["last_failure"] == str(refusal[0])
    for _ in range(4):  # the other instance's round robin would start with a
        ws_turn(other)
    assert len(a.handshakes) == 1 and b.connections == 5


def test_a_conversation_keeps_its_account_on_every_instance(pair, store):
    (a, b), (one, other) = pair()
    ws_turn(one)  # a: the first account in one's round robin
    conversation = [("session-id", "conversation-1")]
    ws_turn(one, conversation)  # b: the next one, and the conversation sticks there
    for _ in range(3):
        ws_turn(other, conversation)  # other's round robin would give a first
    assert [r["account"] for r in store.wait(5)] == ["a", "b", "b", "b", "b"]
    ws_turn(other)  # other's own round robin is untouched by the sticky choices
    assert store.wait(6)[-1]["account"] == "a"


def test_a_cooldown_is_local_only_while_redis_is_down(pair, redis_server, relay, tracer):
    (a, b), (one, other) = pair(limits__redis_timeout_seconds=0.2)
    redis_server.stop()
    a.refuse = (429, 30)
    ws_turn(one)  # the cooldown cannot be shared: the session still goes on, on b
    tracer.wait_for("limits_redis_unavailable")
    a.refuse = None
    assert accounts_page(one)["a"]["state"] == "cooling_down"
    ws_turn(other)  # other knows nothing of it and tries a, which answers now
    assert a.connections == 1


def test_a_quota_error_mid_session_on_one_instance_cools_the_account_down_for_the_other(pair):
    from tests.helpers import read_close

    (a, b), (one, other) = pair()
    a.mode = "quota-mid"
    client = connect(one, [("Authorization", "Bearer " + KEY)])  # the round robin starts with a
    client.send(OP_TEXT, CREATE)
    assert read_close(client)[0] == 1013
    assert accounts_page(other)["a"]["state"] == "cooling_down"
    a.mode = "normal"
    for _ in range(3):
        ws_turn(other)
    assert a.connections == 1  # only the session that hit the quota
