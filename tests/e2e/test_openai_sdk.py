"""The official ``openai`` Python SDK as the client, through a relay with relay keys, in front of the fake upstream.

Each test builds a real ``openai.OpenAI`` client whose ``base_url`` is the relay's ``http://…/v1`` and whose API
key is a relay key; the relay must swap it for the upstream credential (the fake upstream refuses anything else)
and record the turn's usage once.  ``responses.create`` (JSON and ``stream=True``) and ``models.list`` go over the
HTTP transport; ``responses.connect()`` is the SDK's WebSocket mode.

The SDK runs in the test's own process: its HTTP client and its WebSocket client use blocking sockets and threads,
which the suite's gevent patching turns into greenlets, so while the SDK waits the relay and the fake upstream
(greenlets of the same hub) run.  A client that blocked the hub would hang the test, not pass it.  Clients use
``max_retries=0`` and a short timeout, so a failure is an exception at once rather than a retried or hung call.
"""

import time

import gevent
import openai
import pytest

from tests.helpers import APP_KEEPALIVE_INTERVAL, FAKE_USAGE, port_of, stays_false, tokens
from wsrelay import auth

pytestmark = pytest.mark.timeout(30)

UPSTREAM_KEY = "sk-upstream-secret"
RELAY_KEY = "rk-relay-key-0123456789"
MODEL = "gpt-sdk-test"
FAKE_MODEL = "gpt-fake"  # the one model the fake upstream lists
TEXT = "word0 word1 word2 "  # what the fake upstream's three deltas say
TURN = ["response.created", "response.in_progress", "response.output_item.added"] \
    + ["response.output_text.delta"] * 3 + ["response.output_item.done", "response.completed"]
TIMEOUT = 5.0


@pytest.fixture
def keyed_relay(fake, relay):
    """``keyed_relay(timeout=TIMEOUT, fake_options={}, **settings)``: a relay with one relay key in front of a fake
    upstream that takes only the upstream credential; returns ``(fake app, make_client)`` where
    ``make_client(api_key=RELAY_KEY)`` is an SDK client of that relay."""
    clients = []

    def start(timeout=TIMEOUT, fake_options=None, **settings):
        app, upstream_url = fake(require_authorization="Bearer " + UPSTREAM_KEY, **(fake_options or {}))
        port = port_of(relay(upstream_url, auth__keys=[RELAY_KEY], upstream__api_key=UPSTREAM_KEY, **settings))

        def make_client(api_key=RELAY_KEY):
            # websocket_base_url: SDK 2.x dials wss:// for any base_url unless it is given.
            client = openai.OpenAI(api_key=api_key, base_url="http://127.0.0.1:%d/v1" % port,
                                   websocket_base_url="ws://127.0.0.1:%d/v1" % port, max_retries=0,
                                   timeout=timeout)
            clients.append(client)
            return client

        return app, make_client

    yield start
    for client in clients:
        client.close()


@pytest.fixture
def keyed(keyed_relay):
    """:func:`keyed_relay` with its defaults."""
    return keyed_relay()


def only_record(store, timeout=5.0):
    """The one usage record of the test: waits for it, then makes sure no second one follows."""
    record = store.wait(1, timeout=timeout)[0]
    assert stays_false(lambda: len(store.records) > 1, 0.3), "more than one record: %s" % store.records
    return record


def assert_upstream_saw(app, method, path):
    """The fake upstream got exactly one HTTP request, ``method path``, with the upstream credential only."""
    assert [(m, p) for m, p, _ in app.http_requests] == [(method, path)]
    headers = app.http_requests[0][2]
    assert headers["authorization"] == "Bearer " + UPSTREAM_KEY
    assert all(RELAY_KEY not in value for value in headers.values())


def test_create_returns_the_response_with_usage_and_records_it_once(keyed, store):
    app, make_client = keyed
    response = make_client().responses.create(model=MODEL, input="hi")
    assert response.object == "response" and response.status == "completed" and response.model == MODEL
    assert response.id.startswith("resp_") and response.output_text == TEXT
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (120, 30, 150)
    assert usage.input_tokens_details.cached_tokens == 20 and usage.output_tokens_details.reasoning_tokens == 10
    assert_upstream_saw(app, "POST", "/v1/responses")
    record = only_record(store)
    assert record["transport"] == "http"
    assert tokens(record) == FAKE_USAGE
    assert record["response_id"] == response.id and record["model"] == MODEL
    assert record["key_id"] == auth.key_id(RELAY_KEY) and not record["client_disconnected"]


def test_create_with_stream_yields_the_turn_through_response_completed_and_records_it_once(keyed, store):
    app, make_client = keyed
    with make_client().responses.create(model=MODEL, input="hi", stream=True) as stream:
        events = list(stream)
    assert [event.type for event in events] == TURN
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == TEXT
    done = events[-1].response
    assert done.status == "completed" and done.usage.total_tokens == 150
    assert_upstream_saw(app, "POST", "/v1/responses")
    record = only_record(store)
    assert record["transport"] == "http"
    assert tokens(record) == FAKE_USAGE
    assert record["response_id"] == done.id and record["model"] == MODEL
    assert record["key_id"] == auth.key_id(RELAY_KEY) and record["terminal_event"] == "response.completed"
    assert not record["client_disconnected"]


# A silent turn longer than the SDK's read timeout (httpx's, per read): the relay's SSE keepalive comments are
# reads for the SDK, which shows none of them; without them the SDK gives up and the relay still bills the turn.
SILENCE = 2.5
SDK_READ_TIMEOUT = 1.0
SSE_KEEPALIVE = "gateway__openai_http__sse_keepalive_interval_seconds"


def test_sse_keepalive_comments_carry_a_silent_streamed_turn_past_the_sdk_read_timeout(keyed_relay, store):
    app, make_client = keyed_relay(timeout=SDK_READ_TIMEOUT, fake_options={"silence": SILENCE},
                                   **{SSE_KEEPALIVE: 0.3, APP_KEEPALIVE_INTERVAL: 0.3})
    started = time.monotonic()
    with make_client().responses.create(model=MODEL, input="hi", stream=True) as stream:
        events = list(stream)
    assert time.monotonic() - started >= SILENCE
    # No keepalive event either: the SDK is not Codex, so the app keepalive (mode auto) is not for it.
    assert [event.type for event in events] == TURN
    record = only_record(store)
    assert record["transport"] == "http" and tokens(record) == FAKE_USAGE and not record["client_disconnected"]


def test_a_silent_streamed_turn_without_keepalive_times_the_sdk_out_and_is_still_billed(keyed_relay, store):
    app, make_client = keyed_relay(timeout=SDK_READ_TIMEOUT, fake_options={"silence": SILENCE},
                                   **{SSE_KEEPALIVE: 0})
    events = []
    with pytest.raises(Exception) as raised:
        with make_client().responses.create(model=MODEL, input="hi", stream=True) as stream:
            for event in stream:
                events.append(event.type)
    # SDK 3.x raises APITimeoutError; 2.x lets its HTTP client's ReadTimeout out of the stream.
    assert isinstance(raised.value, openai.APITimeoutError) or type(raised.value).__name__ == "ReadTimeout", \
        repr(raised.value)
    assert events == TURN[:6]  # the head of the turn, up to the silence
    record = only_record(store, timeout=SILENCE + 3)
    assert record["transport"] == "http" and tokens(record) == FAKE_USAGE
    assert record["client_disconnected"], "the client left in the silence, before the terminal event: %s" % record


def test_models_list_shows_the_upstream_models(keyed, store):
    app, make_client = keyed
    models = make_client().models.list()
    assert [model.id for model in models] == [FAKE_MODEL]
    assert models.data[0].owned_by == "wsrelay-fake-upstream"
    assert_upstream_saw(app, "GET", "/v1/models")
    assert store.records == []


def test_one_client_makes_several_calls_in_a_row_on_its_kept_alive_connection(keyed, store):
    app, make_client = keyed
    client = make_client()
    first = client.responses.create(model=MODEL, input="hi")
    with client.responses.create(model=MODEL, input="hi", stream=True) as stream:
        assert [event.type for event in stream] == TURN
    assert [model.id for model in client.models.list()] == [FAKE_MODEL]
    last = client.responses.create(model=MODEL, input="hi", previous_response_id=first.id)
    assert last.usage.total_tokens == 150
    assert [(m, p) for m, p, _ in app.http_requests] == [("POST", "/v1/responses")] * 2 + [
        ("GET", "/v1/models"), ("POST", "/v1/responses")]
    records = store.wait(3)
    assert stays_false(lambda: len(store.records) > 3, 0.3), store.records
    assert [r["transport"] for r in records] == ["http"] * 3
    assert records[0]["response_id"] == first.id and records[2]["response_id"] == last.id


CALLS = {
    "create": lambda client: client.responses.create(model=MODEL, input="hi"),
    "create-stream": lambda client: list(client.responses.create(model=MODEL, input="hi", stream=True)),
    "models-list": lambda client: client.models.list(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_wrong_relay_key_is_an_authentication_error_and_never_reaches_the_upstream(keyed, store, call):
    app, make_client = keyed
    with pytest.raises(openai.AuthenticationError) as raised:
        CALLS[call](make_client("rk-not-a-relay-key"))
    assert raised.value.status_code == 401
    assert isinstance(raised.value.body, dict) and raised.value.body.get("message"), raised.value.body
    assert app.http_requests == [] and app.handshakes == []
    assert store.records == []


def test_responses_connect_runs_a_turn_over_the_websocket_and_records_it(keyed, store):
    app, make_client = keyed
    events = []
    with gevent.Timeout(10, AssertionError("no response.completed over the WebSocket")):
        with make_client().responses.connect() as connection:
            connection.response.create(model=MODEL, input="hi")
            for event in connection:
                events.append(event)
                if event.type in ("response.completed", "response.failed", "error"):
                    break
    assert [event.type for event in events] == TURN
    done = events[-1].response
    assert done.usage.total_tokens == 150
    assert len(app.handshakes) == 1 and app.http_requests == []
    assert app.handshakes[0]["authorization"] == "Bearer " + UPSTREAM_KEY
    assert all(RELAY_KEY not in value for value in app.handshakes[0].values())
    record = only_record(store)
    assert record["transport"] == "websocket"
    assert tokens(record) == FAKE_USAGE
    assert record["response_id"] == done.id and record["model"] == MODEL
    assert record["key_id"] == auth.key_id(RELAY_KEY) and record["terminal_event"] == "response.completed"
