"""The client handshake through a real relay: routes, refusals, the upstream dial before the 101, auth, headers.

Every refusal must be an HTTP error with a JSON body, sent before any 101.  The ``test_stock_gevent_websocket_*``
tests run the unmodified gevent-websocket handler and prove that each defect the relay works around is really
there (if one of them starts failing, the library was fixed and the workaround can be revisited).
"""

import hashlib
import json
import socket
import time

import gevent
import gevent.event
import pytest
import websocket
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from websocket import _cookiejar, _handshake

from tests.helpers import CREATE, connect, free_port, port_of, raw_request, read_response, ws_key
from wsrelay import auth, frames, trace
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(30)

ROUTES = ("/v1/responses", "/responses", "/backend-api/codex/responses")
UPSTREAM_KEY = "sk-upstream-secret"
RELAY_KEY = "rk-relay-key-0123456789"


# -- helpers -----------------------------------------------------------------------------------------------------


def at_path(url, path):
    """``url`` (ws://host:port/...) with its path replaced."""
    hostport = url[len("ws://"):].partition("/")[0]
    return "ws://%s%s" % (hostport, path)


def send_raw(url, head, timeout=10):
    """Send exactly ``head`` (request line and headers, no blank line) and read one response.

    Returns ``(sock, status, headers, body)``; the body is read to its Content-Length.
    """
    sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=timeout)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    return (sock,) + read_response(sock)


def read_to_eof(sock, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def assert_json_refusal(sock, status, headers, body, expected, closes=True):
    """A refusal: the expected status, a JSON ``{"error": {...}}`` body that really arrived, never a 101."""
    assert status == expected, (status, headers, body)
    assert headers.get("content-type", "").split(";")[0].strip() == "application/json", headers
    assert int(headers.get("content-length", "0")) == len(body) > 0, (headers, body)
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}, error
    assert error["message"] and error["type"] and error["code"]
    if closes:
        after = read_to_eof(sock)
        assert b"101" not in after and b"Switching Protocols" not in after, after
    sock.close()
    return error


def upgrade_headers(**overrides):
    """The handshake headers raw_request would add, as a list (so a test can leave some out)."""
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": ws_key()}
    headers.update(overrides)
    return [(k, v) for k, v in headers.items() if v is not None]


def upgrade_request(url, method="GET", version="HTTP/1.1", **overrides):
    hostport, _, path = url[len("ws://"):].partition("/")
    return ["%s /%s %s" % (method, path, version), "Host: %s" % hostport] + \
        ["%s: %s" % h for h in upgrade_headers(**overrides)]


def finish_turn(client):
    """Run one response.create through ``client`` and read until the terminal event."""
    client.send(OP_TEXT, CREATE)
    with gevent.Timeout(5, AssertionError("no response.completed")):
        while True:
            opcode, payload = client.read_message()
            if b'"response.completed"' in payload:
                return payload


class FixedProtocolUpstream:
    """An upstream that always answers its 101 with ``protocol``, whatever the client offered."""

    def __init__(self, protocol):
        self.protocol = protocol
        self.handshakes = []
        self.released = gevent.event.Event()

    def __call__(self, environ, start_response):
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]

    def accept_websocket(self, handler):
        self.handshakes.append(handler.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"))
        if handler.switch_protocols([], self.protocol):
            handler.take_over()
            self.released.wait(5)


class LeakyRefusal:
    """An upstream that refuses the handshake with a body holding something secret."""

    SECRET = "sk-proj-LEAKED-fragment-42"

    def __init__(self, status):
        self.status = status

    def __call__(self, environ, start_response):
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]

    def accept_websocket(self, handler):
        handler.refuse(self.status, "debug", "credential %s rejected" % self.SECRET)


@pytest.fixture
def silent_listener():
    """A TCP listener that accepts connections and never says a word; returns its ws:// URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []

    def accept():
        while True:
            conn, _ = sock.accept()
            held.append(conn)

    acceptor = gevent.spawn(accept)
    yield "ws://127.0.0.1:%d/v1/responses" % sock.getsockname()[1]
    acceptor.kill()
    for conn in held:
        conn.close()
    sock.close()


# -- the stock gevent-websocket handler, for the companion tests -------------------------------------------------


class StockEchoApp:
    """A trivial WSGI echo app for the stock handler; offers the ``chat`` subprotocol the stock way."""

    def __call__(self, environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is None:
            body = b"plain http"
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        while True:
            message = ws.receive()
            if message is None:
                return []
            ws.send(message)

    def app_protocol(self, path):
        return "chat"


@pytest.fixture
def stock():
    """A stock ``geventwebsocket.handler.WebSocketHandler`` echo server; returns its ws:// URL."""
    server = WSGIServer(("127.0.0.1", 0), StockEchoApp(), handler_class=WebSocketHandler, log=None,
                        error_log=None)
    server.start()
    yield "ws://127.0.0.1:%d/echo" % server.server_port
    server.stop(timeout=1)


# -- routes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
def test_websocket_routes_upgrade(fake, relay, path):
    _, up_url = fake()
    client = connect(at_path(relay(up_url), path))
    assert b'"response.completed"' in finish_turn(client)
    client.sock.close()


@pytest.mark.parametrize("path", ROUTES)
def test_plain_get_on_a_websocket_route_gets_426_json(fake, relay, path):
    app, up_url = fake()
    url = at_path(relay(up_url), path)
    hostport = url[len("ws://"):].partition("/")[0]
    sock, status, headers, body = send_raw(url, ["GET %s HTTP/1.1" % path, "Host: %s" % hostport,
                                                 "Connection: close"])
    error = assert_json_refusal(sock, status, headers, body, 426)
    assert error["code"] == "websocket_required"
    assert app.handshakes == []


def test_healthz_answers_200(fake, relay):
    _, up_url = fake()
    url = at_path(relay(up_url), "/healthz")
    hostport = url[len("ws://"):].partition("/")[0]
    sock, status, headers, body = send_raw(url, ["GET /healthz HTTP/1.1", "Host: %s" % hostport,
                                                 "Connection: close"])
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == "ok"
    sock.close()


def test_websocket_upgrade_on_unknown_path_gets_404_json_and_no_dial(fake, relay, tracer):
    app, up_url = fake()
    sock, status, headers, body = raw_request(at_path(relay(up_url), "/v1/chat/completions"))
    error = assert_json_refusal(sock, status, headers, body, 404)
    assert error["code"] == "not_found"
    assert app.handshakes == []
    assert tracer.find("handshake_refused")[0]["status"] == 404


# -- gevent-websocket defects the relay fixes, each with its stock companion -------------------------------------


def test_non_base64_key_gets_400_with_body(fake, relay):
    app, up_url = fake()
    sock, status, headers, body = raw_request(relay(up_url), key="not*base64*at*all!!")
    assert_json_refusal(sock, status, headers, body, 400)
    assert app.handshakes == []


def test_stock_gevent_websocket_answers_non_base64_key_with_500(stock):
    sock, status, headers, body = raw_request(stock, key="not*base64*at*all!!")
    sock.close()
    assert status == 500


def test_key_of_wrong_length_gets_400_with_body(fake, relay):
    app, up_url = fake()
    sock, status, headers, body = raw_request(relay(up_url), key="c2hvcnQ=")  # "short": 5 bytes, not 16
    assert_json_refusal(sock, status, headers, body, 400)
    assert app.handshakes == []


def test_http_1_0_upgrade_gets_400_with_body(fake, relay):
    app, up_url = fake()
    sock, status, headers, body = raw_request(relay(up_url), version="HTTP/1.0")
    assert_json_refusal(sock, status, headers, body, 400)
    assert app.handshakes == []


def test_stock_gevent_websocket_answers_http_1_0_with_402_bad_request(stock):
    sock, status, headers, body = raw_request(stock, version="HTTP/1.0")
    sock.close()
    assert status == 402


def test_missing_key_gets_400_with_body(fake, relay):
    app, up_url = fake()
    url = relay(up_url)
    sock, status, headers, body = send_raw(url, upgrade_request(url, **{"Sec-WebSocket-Key": None}))
    error = assert_json_refusal(sock, status, headers, body, 400)
    assert "Sec-WebSocket-Key" in error["message"]
    assert app.handshakes == []


def test_stock_gevent_websocket_drops_the_body_of_its_refusals(stock):
    # A missing key is refused with 400 and a str body: gevent announces its length but never sends it.
    sock, status, headers, body = send_raw(stock, upgrade_request(stock, **{"Sec-WebSocket-Key": None}))
    rest = body + read_to_eof(sock)
    sock.close()
    assert status == 400
    assert int(headers["content-length"]) > 0
    assert rest == b""


@pytest.mark.parametrize("version", ["8", "12", "7", ""])
def test_wrong_websocket_version_gets_426_naming_13(fake, relay, version):
    app, up_url = fake()
    url = relay(up_url)
    sock, status, headers, body = send_raw(url, upgrade_request(url, **{"Sec-WebSocket-Version": version}))
    assert headers.get("sec-websocket-version") == "13"
    error = assert_json_refusal(sock, status, headers, body, 426)
    assert error["code"] == "unsupported_websocket_version"
    assert app.handshakes == []


def test_stock_gevent_websocket_accepts_version_8_and_refuses_12_with_400(stock):
    sock, status, headers, body = raw_request(stock, headers=[("Sec-WebSocket-Version", "8")])
    sock.close()
    assert status == 101
    sock, status, headers, body = raw_request(stock, headers=[("Sec-WebSocket-Version", "12")])
    sock.close()
    assert status == 400
    assert headers["sec-websocket-version"] != "13"


def test_post_upgrade_gets_405(fake, relay):
    app, up_url = fake()
    url = relay(up_url)
    sock, status, headers, body = send_raw(url, upgrade_request(url, method="POST") + ["Content-Length: 0"])
    assert "GET" in headers.get("allow", "")
    assert_json_refusal(sock, status, headers, body, 405)
    assert app.handshakes == []


def test_stock_gevent_websocket_passes_post_upgrade_to_the_app(stock):
    sock, status, headers, body = send_raw(stock, upgrade_request(stock, method="POST") + ["Content-Length: 0"])
    sock.close()
    assert status == 200 and body == b"plain http"


def test_stock_gevent_websocket_matches_subprotocols_as_substrings(stock):
    sock, status, headers, body = raw_request(stock, headers=[("Sec-WebSocket-Protocol", "superchat")])
    sock.close()
    assert status == 101
    assert headers["sec-websocket-protocol"] == "chat"


def test_relay_never_answers_a_subprotocol_the_client_did_not_offer(relay, start_server):
    upstream = FixedProtocolUpstream("chat")
    up_url = "ws://127.0.0.1:%d/v1/responses" % start_server(upstream)
    sock, status, headers, body = raw_request(relay(up_url), headers=[("Sec-WebSocket-Protocol", "superchat")])
    upstream.released.set()
    assert headers.get("sec-websocket-protocol") != "chat"
    assert upstream.handshakes == ["superchat"]
    assert_json_refusal(sock, status, headers, body, 502)


def test_relay_echoes_the_subprotocol_the_upstream_chose(scripted, relay):
    upstream, up_url = scripted()
    client = connect(relay(up_url), headers=[("Sec-WebSocket-Protocol", "superchat, chat")])
    up = upstream.next()
    assert upstream.handshakes[0]["sec-websocket-protocol"].replace(" ", "") == "superchat,chat"
    assert client.response_headers["sec-websocket-protocol"] == "superchat"  # the scripted upstream picks the first
    up.done.set()


def test_relay_echoes_a_later_offered_subprotocol_exactly(relay, start_server):
    upstream = FixedProtocolUpstream("chat")
    up_url = "ws://127.0.0.1:%d/v1/responses" % start_server(upstream)
    client = connect(relay(up_url), headers=[("Sec-WebSocket-Protocol", "superchat, chat")])
    upstream.released.set()
    assert client.response_headers["sec-websocket-protocol"] == "chat"


def test_no_subprotocol_offered_means_none_answered(scripted, relay):
    upstream, up_url = scripted()
    client = connect(relay(up_url))
    up = upstream.next()
    assert "sec-websocket-protocol" not in upstream.handshakes[0]
    assert "sec-websocket-protocol" not in client.response_headers
    up.done.set()


# -- auth --------------------------------------------------------------------------------------------------------


def keyed_relay(relay, up_url, keys=(RELAY_KEY,)):
    return relay(up_url, auth__keys=list(keys), upstream__api_key=UPSTREAM_KEY)


def test_missing_relay_key_gets_401_and_no_dial(fake, relay, tracer):
    app, up_url = fake()
    sock, status, headers, body = raw_request(keyed_relay(relay, up_url))
    assert headers.get("www-authenticate", "").startswith("Bearer")
    error = assert_json_refusal(sock, status, headers, body, 401)
    assert error["type"] == "authentication_error"
    assert app.handshakes == []
    assert tracer.find("dial_ok") == [] and tracer.find("dial_failed") == []


@pytest.mark.parametrize("authorization", ["Bearer wrong-key", "Bearer " + RELAY_KEY + "x", "Basic " + RELAY_KEY,
                                           "Bearer"])
def test_wrong_relay_key_gets_401_and_no_dial(fake, relay, tracer, authorization):
    app, up_url = fake()
    sock, status, headers, body = raw_request(keyed_relay(relay, up_url),
                                              headers=[("Authorization", authorization)])
    assert headers.get("www-authenticate", "").startswith("Bearer")
    assert_json_refusal(sock, status, headers, body, 401)
    assert app.handshakes == []
    assert "wrong-key" not in repr(tracer.events)


def test_right_relay_key_is_replaced_by_the_upstream_credential(fake, relay, store):
    app, up_url = fake()
    client = connect(keyed_relay(relay, up_url), headers=[("Authorization", "Bearer " + RELAY_KEY)])
    finish_turn(client)
    assert app.handshakes[0]["authorization"] == "Bearer " + UPSTREAM_KEY
    assert all(RELAY_KEY not in value for value in app.handshakes[0].values())
    record = store.wait(1)[0]
    assert record["key_id"] == auth.key_id(RELAY_KEY)
    client.sock.close()


def test_bearer_scheme_is_case_insensitive(fake, relay):
    app, up_url = fake()
    client = connect(keyed_relay(relay, up_url), headers=[("Authorization", "bearer " + RELAY_KEY)])
    finish_turn(client)
    assert app.handshakes[0]["authorization"] == "Bearer " + UPSTREAM_KEY
    client.sock.close()


def test_sha256_configured_key_accepts_the_key(fake, relay):
    app, up_url = fake()
    digest = hashlib.sha256(RELAY_KEY.encode()).hexdigest()
    url = keyed_relay(relay, up_url, keys=["sha256:" + digest])
    client = connect(url, headers=[("Authorization", "Bearer " + RELAY_KEY)])
    finish_turn(client)
    assert app.handshakes[0]["authorization"] == "Bearer " + UPSTREAM_KEY
    client.sock.close()
    # The digest itself is not a key.
    sock, status, headers, body = raw_request(url, headers=[("Authorization", "Bearer sha256:" + digest)])
    assert_json_refusal(sock, status, headers, body, 401)
    assert len(app.handshakes) == 1


def test_one_of_several_keys_is_enough(fake, relay):
    app, up_url = fake()
    url = keyed_relay(relay, up_url, keys=["first-key", RELAY_KEY, "sha256:" + "0" * 64])
    client = connect(url, headers=[("Authorization", "Bearer " + RELAY_KEY)])
    finish_turn(client)
    client.sock.close()


def test_without_keys_the_client_authorization_is_forwarded_unchanged(fake, relay, store):
    app, up_url = fake()
    client = connect(relay(up_url, upstream__api_key=UPSTREAM_KEY),
                     headers=[("Authorization", "Bearer sk-client-own-credential")])
    finish_turn(client)
    assert app.handshakes[0]["authorization"] == "Bearer sk-client-own-credential"
    assert store.wait(1)[0]["key_id"] == auth.key_id("sk-client-own-credential")
    client.sock.close()


def test_without_keys_and_without_client_authorization_none_is_sent(fake, relay):
    app, up_url = fake()
    client = connect(relay(up_url, upstream__api_key=UPSTREAM_KEY))
    finish_turn(client)
    assert "authorization" not in app.handshakes[0]
    client.sock.close()


def test_keys_without_upstream_credential_get_503_and_no_dial(fake, relay, monkeypatch):
    monkeypatch.delenv("WSRELAY_TEST_NO_SUCH_VAR", raising=False)
    app, up_url = fake()
    url = relay(up_url, auth__keys=[RELAY_KEY], upstream__api_key_env="WSRELAY_TEST_NO_SUCH_VAR")
    sock, status, headers, body = raw_request(url, headers=[("Authorization", "Bearer " + RELAY_KEY)])
    assert_json_refusal(sock, status, headers, body, 503)
    assert app.handshakes == []


def test_relay_key_never_reaches_the_trace_or_the_upstream(fake, relay, tracer, store):
    app, up_url = fake()
    url = keyed_relay(relay, up_url)
    client = connect(url, headers=[("Authorization", "Bearer " + RELAY_KEY)])
    finish_turn(client)
    client.close()
    with pytest.raises(ConnectionClosed):
        client.read_message()
    client.sock.close()
    store.wait(1)
    sock, status, headers, body = raw_request(url, headers=[("Authorization", "Bearer " + RELAY_KEY + "-typo")])
    assert_json_refusal(sock, status, headers, body, 401)
    assert tracer.events
    lines = [trace.format_line(stage, fields) for stage, fields in tracer.events]
    assert not [line for line in lines if RELAY_KEY in line or UPSTREAM_KEY in line]
    for handshake in app.handshakes:
        assert all(RELAY_KEY not in value for value in handshake.values()), handshake
    assert RELAY_KEY not in json.dumps(store.records)


# -- header forwarding -------------------------------------------------------------------------------------------

FORWARDED = [
    ("OpenAI-Beta", "responses_websockets=2026-02-06"),
    ("originator", "codex_cli_rs"),
    ("session-id", "0199a3f2-sess"),
    ("x-codex-turn-metadata", '{"turn":1}'),
    ("chatgpt-account-id", "acct-123"),
    ("OpenAI-Organization", "org-abc"),
    ("version", "0.169.0"),
    ("accept-language", "de-DE"),
    ("User-Agent", "codex_cli_rs/0.169.0 (Linux; x86_64)"),
    ("thread-id", "0199a3f2-thread"),
    ("x-client-request-id", "req-42"),
    ("x-codex-window-id", "win-7"),
    ("OpenAI-Project", "proj-xyz"),
]
DROPPED = [
    ("Origin", "https://evil.example"),
    ("Cookie", "session=client-cookie"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ("X-Foo", "bar"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
]


def test_allow_listed_headers_reach_the_upstream_and_others_do_not(fake, relay):
    app, up_url = fake()
    client = connect(relay(up_url), headers=FORWARDED + DROPPED)
    finish_turn(client)
    seen = app.handshakes[0]
    for name, value in FORWARDED:
        assert seen.get(name.lower()) == value, (name, seen)
    for name, value in DROPPED:
        assert name.lower() not in seen, (name, seen)
        assert value not in seen.values(), (name, seen)
    client.sock.close()


def test_upstream_response_headers_come_back_on_the_101(scripted, relay):
    returned = [("x-codex-turn-state", "ts-abc"), ("x-models-etag", "W/\"etag-1\""),
                ("x-reasoning-included", "true"), ("openai-model", "gpt-5-codex")]
    upstream, up_url = scripted(response_headers=returned + [("x-upstream-internal", "private"),
                                                             ("Set-Cookie", "sid=upstream")])
    client = connect(relay(up_url))
    up = upstream.next()
    for name, value in returned:
        assert client.response_headers.get(name) == value, (name, client.response_headers)
    assert "x-upstream-internal" not in client.response_headers
    assert "set-cookie" not in client.response_headers
    up.done.set()


# -- upstream dial failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream_status, client_status", [(401, 401), (403, 403), (429, 429), (500, 502),
                                                            (503, 502), (404, 502), (426, 426)])
def test_upstream_refusal_maps_to_an_http_error_before_the_101(scripted, relay, tracer, upstream_status,
                                                               client_status):
    upstream, up_url = scripted(refuse=(upstream_status, []))
    sock, status, headers, body = raw_request(relay(up_url))
    assert_json_refusal(sock, status, headers, body, client_status)
    assert b"scripted refusal" not in body
    assert len(upstream.handshakes) == 1
    failed = tracer.wait_for("dial_failed")
    assert failed["status"] == client_status
    assert "retry-after" not in headers


def test_upstream_429_retry_after_is_passed_through(scripted, relay, tracer):
    upstream, up_url = scripted(refuse=(429, [("Retry-After", "17")]))
    sock, status, headers, body = raw_request(relay(up_url))
    assert headers.get("retry-after") == "17"
    error = assert_json_refusal(sock, status, headers, body, 429)
    assert error["type"] == "rate_limit_error"
    assert tracer.wait_for("dial_failed")["status"] == 429


@pytest.mark.parametrize("upstream_status", [401, 403, 429, 500])
def test_upstream_refusal_body_never_reaches_the_client(relay, start_server, tracer, upstream_status):
    up_url = "ws://127.0.0.1:%d/v1/responses" % start_server(LeakyRefusal(upstream_status))
    sock, status, headers, body = raw_request(relay(up_url))
    assert_json_refusal(sock, status, headers, body, 502 if upstream_status == 500 else upstream_status)
    assert LeakyRefusal.SECRET.encode() not in body
    assert b"LEAKED" not in body
    assert LeakyRefusal.SECRET not in repr(tracer.events)


def test_nothing_listening_upstream_gets_502(relay, tracer):
    up_url = "ws://127.0.0.1:%d/v1/responses" % free_port()
    sock, status, headers, body = raw_request(relay(up_url))
    error = assert_json_refusal(sock, status, headers, body, 502)
    assert error["code"] == "upstream_unreachable"
    assert tracer.wait_for("dial_failed")["status"] == 502


def test_silent_upstream_gets_504_within_the_connect_timeout(relay, tracer, silent_listener):
    url = relay(silent_listener, upstream__connect_timeout_seconds=0.5)
    started = time.monotonic()
    sock, status, headers, body = raw_request(url)
    elapsed = time.monotonic() - started
    error = assert_json_refusal(sock, status, headers, body, 504)
    assert error["code"] == "upstream_timeout"
    assert 0.4 <= elapsed < 2.0, elapsed
    assert tracer.wait_for("dial_failed")["status"] == 504


# -- the websocket-client cookie jar -----------------------------------------------------------------------------

SET_COOKIE = [("Set-Cookie", "sid=secret; Domain=127.0.0.1")]


def test_upstream_cookie_is_never_replayed_on_a_later_session(fake, relay):
    app, up_url = fake(response_headers=SET_COOKIE)
    url = relay(up_url)
    first = connect(url, headers=[("Authorization", "Bearer user-one")])
    finish_turn(first)
    second = connect(url, headers=[("Authorization", "Bearer user-two")])
    finish_turn(second)
    assert len(app.handshakes) == 2
    assert "cookie" not in app.handshakes[1], app.handshakes[1]
    assert all("secret" not in value for value in app.handshakes[1].values())
    first.sock.close()
    second.sock.close()


def test_stock_websocket_client_replays_an_upstream_cookie(fake, monkeypatch):
    # What the relay must prevent: with the library's own jar, user two carries user one's cookie.
    monkeypatch.setattr(_handshake, "CookieJar", _cookiejar.SimpleCookieJar())
    app, up_url = fake(response_headers=SET_COOKIE)
    for _ in range(2):
        ws = websocket.create_connection(up_url, timeout=5, suppress_origin=True)
        ws.close()
    assert "cookie" not in app.handshakes[0]
    assert "sid=secret" in app.handshakes[1].get("cookie", "")


# -- bytes that arrive with the handshake ------------------------------------------------------------------------


def test_message_sent_right_behind_the_handshake_is_not_lost(scripted, relay):
    upstream, up_url = scripted()
    payload = b'{"type":"response.create","model":"gpt-early","input":[]}'
    early = frames.build_frame(OP_TEXT, payload, mask=True)
    sock, status, headers, rest = raw_request(relay(up_url), extra=early)
    assert status == 101, (status, rest)
    up = upstream.next()
    with gevent.Timeout(5, AssertionError("the early message never reached the upstream")):
        assert up.read_message() == (OP_TEXT, payload)
    up.done.set()
    sock.close()


def test_several_messages_sent_behind_the_handshake_arrive_in_order(scripted, relay):
    upstream, up_url = scripted()
    payloads = [b'{"n":%d}' % i for i in range(5)] + [b"x" * 70000]
    early = b"".join(frames.build_frame(OP_TEXT, p, mask=True) for p in payloads)
    sock, status, headers, rest = raw_request(relay(up_url), extra=early)
    assert status == 101, (status, rest)
    up = upstream.next()
    with gevent.Timeout(5, AssertionError("early messages lost")):
        assert [up.read_message() for _ in payloads] == [(OP_TEXT, p) for p in payloads]
    up.done.set()
    sock.close()


# -- more handshake shapes ---------------------------------------------------------------------------------------


def test_connection_header_with_several_tokens_and_mixed_case_upgrade_is_accepted(scripted, relay):
    upstream, up_url = scripted()
    url = relay(up_url)
    sock, status, headers, rest = send_raw(url, upgrade_request(url, Upgrade="WebSocket",
                                                                Connection="keep-alive, Upgrade"))
    assert status == 101, (status, rest)
    upstream.next().done.set()
    sock.close()


def test_upgrade_without_connection_upgrade_gets_400(fake, relay):
    app, up_url = fake()
    url = relay(up_url)
    sock, status, headers, body = send_raw(url, upgrade_request(url, Connection="keep-alive"))
    assert_json_refusal(sock, status, headers, body, 400)
    assert app.handshakes == []


def test_upstream_host_header_is_the_upstreams_own(fake, relay):
    app, up_url = fake()
    client = connect(relay(up_url))
    finish_turn(client)
    assert app.handshakes[0]["host"] == up_url[len("ws://"):].partition("/")[0]
    client.sock.close()


def test_mixed_case_subprotocol_is_echoed_exactly(scripted, relay):
    upstream, up_url = scripted()
    sock, status, headers, rest = raw_request(relay(up_url), headers=[("Sec-WebSocket-Protocol", "Chat.V2")])
    if status == 101:
        upstream.next().done.set()
    sock.close()
    assert upstream.handshakes[0]["sec-websocket-protocol"] == "Chat.V2"
    assert status == 101, (status, rest)
    assert headers.get("sec-websocket-protocol") == "Chat.V2"


def test_upstream_choosing_no_subprotocol_is_passed_on_as_none(fake, relay):
    app, up_url = fake()  # the fake upstream never selects a subprotocol
    sock, status, headers, rest = raw_request(relay(up_url), headers=[("Sec-WebSocket-Protocol", "chat")])
    sock.close()
    assert app.handshakes[0]["sec-websocket-protocol"] == "chat"
    assert status == 101, (status, rest)
    assert "sec-websocket-protocol" not in headers


def test_upstream_redirect_is_not_followed(scripted, fake, relay, tracer):
    target, target_url = fake()
    location = "http" + target_url[len("ws"):]
    upstream, up_url = scripted(refuse=(302, [("Location", location)]))
    # RelayHandler.refuse only knows reasons for the statuses it uses; the status code is what counts.
    sock, status, headers, body = raw_request(relay(up_url, upstream__api_key=UPSTREAM_KEY),
                                              headers=[("Authorization", "Bearer sk-client-own")])
    assert_json_refusal(sock, status, headers, body, 502)
    assert len(upstream.handshakes) == 1
    assert target.handshakes == []
    assert "location" not in headers
    assert tracer.wait_for("dial_failed")["status"] == 502


def test_upstream_message_sent_right_behind_its_101_reaches_the_client(scripted, relay):
    upstream, up_url = scripted()
    url = relay(up_url)
    pending = gevent.spawn(connect, url)
    up = upstream.next()
    up.send(OP_TEXT, b'{"type":"early.upstream"}')
    client = pending.get(timeout=5)
    with gevent.Timeout(5, AssertionError("the upstream's first message was lost")):
        assert client.read_message() == (OP_TEXT, b'{"type":"early.upstream"}')
    up.done.set()
    client.sock.close()


# -- header values that are not ASCII ----------------------------------------------------------------------------


def as_wire(text):
    """``text`` as it travels in an HTTP header: its UTF-8 bytes, seen as latin-1 (how WSGI and our helpers
    represent header bytes)."""
    return text.encode("utf-8").decode("latin-1")


def test_non_ascii_request_header_reaches_the_upstream_byte_for_byte(fake, relay):
    app, up_url = fake()
    metadata = as_wire('{"branch":"café-ü","cwd":"/home/jörg/項目"}')
    client = connect(relay(up_url), headers=[("x-codex-turn-metadata", metadata)])
    finish_turn(client)
    assert app.handshakes[0]["x-codex-turn-metadata"] == metadata
    client.sock.close()


def test_non_ascii_upstream_response_header_reaches_the_client_byte_for_byte(scripted, relay, tracer):
    state = as_wire("turn-state-€-ü")
    upstream, up_url = scripted(response_headers=[("x-codex-turn-state", state)])
    sock, status, headers, rest = raw_request(relay(up_url))
    if status == 101:
        upstream.next().done.set()
    sock.close()
    assert status == 101, (status, rest, tracer.stages())
    assert headers.get("x-codex-turn-state") == state


def test_upstream_names_are_resolved_once_and_ip_literals_never(monkeypatch):
    import socket as socket_module

    from wsrelay import upstream

    calls = []
    real = socket_module.getaddrinfo

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", counting)
    resolver = upstream._Resolver(ttl=60)
    assert resolver.addresses("127.0.0.1", 443) == [(socket_module.AF_INET, ("127.0.0.1", 443))]
    assert resolver.addresses("::1", 443) == [(socket_module.AF_INET6, ("::1", 443))]
    assert calls == []
    first = resolver.addresses("localhost", 443)
    assert resolver.addresses("localhost", 443) == first and calls == ["localhost"]
    resolver.forget("localhost", 443)
    resolver.addresses("localhost", 443)
    assert calls == ["localhost", "localhost"]
