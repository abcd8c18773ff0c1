"""The HTTP transport end to end: a real relay in front of the real fake upstream, driven over real sockets."""

import http.client
import json
import socket
import time

import pytest

from tests.helpers import port_of, stays_false, wait_until
from wsrelay import usage
from wsrelay.sse import SseReader

pytestmark = pytest.mark.timeout(30)

KEY = "relay-key-1"
UPSTREAM_KEY = "sk-upstream-secret"
HTTP = "gateway__openai_http__"


@pytest.fixture
def http_relay(fake, relay):
    """``http_relay(fake_options, **relay_settings)``: a fake upstream that wants the upstream credential and a
    relay with one key in front of it; returns ``(fake_app, relay_port)``."""

    def start(fake_options=None, **settings):
        app, url = fake(require_authorization="Bearer " + UPSTREAM_KEY, **(fake_options or {}))
        settings.setdefault("auth__keys", [KEY])
        settings.setdefault("upstream__api_key", UPSTREAM_KEY)
        return app, port_of(relay(url, **settings))

    return start


def request(port, method="POST", path="/v1/responses", body=None, headers=None, key=KEY, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    all_headers = {"Content-Type": "application/json"}
    if key:
        all_headers["Authorization"] = "Bearer " + key
    all_headers.update(headers or {})
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, payload, all_headers)
    return conn, conn.getresponse()


def turn(stream=True, **fields):
    return dict({"model": "gpt-test", "input": "hi", "stream": stream}, **fields)


def read_stream(response):
    """``(events, comments, raw)`` of a whole event stream: events as ``(type, dict)``, with arrival times."""
    reader, events, raw = SseReader(), [], b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return events, reader.comments, raw
        raw += chunk
        for event in reader.feed(chunk):
            events.append((event.event, json.loads(event.data), time.monotonic()))


def test_a_streamed_turn_arrives_as_it_happens_and_is_billed_once_as_http(http_relay, store, tracer):
    app, port = http_relay({"silence": 0.6})
    started = time.monotonic()
    conn, response = request(port, body=turn())
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    events, comments, _ = read_stream(response)
    assert events[0][2] - started < 0.5, "the head of the turn waited for the silence"
    assert [e[0] for e in events][-1] == "response.completed"
    record = store.wait(1)[0]
    assert (record["transport"], record["terminal_event"], record["total_tokens"]) == ("http", "response.completed", 150)
    assert record["model"] == "gpt-test" and record["response_id"] == events[-1][1]["response"]["id"]
    assert not record["client_disconnected"] and comments == 0  # the default keepalive interval is 20 s
    method, path, headers = app.http_requests[0]
    assert (method, path) == ("POST", "/v1/responses")
    assert headers["authorization"] == "Bearer " + UPSTREAM_KEY  # the relay key stays here
    assert headers["accept-encoding"] == "identity"
    assert tracer.find("http_request")[-1]["status"] == 200
    assert stays_false(lambda: len(store.records) > 1, 0.2)
    conn.close()


@pytest.mark.parametrize("path", ["/v1/responses", "/responses", "/backend-api/codex/responses"])
def test_every_responses_path_reaches_the_upstream_responses_endpoint(http_relay, store, path):
    app, port = http_relay()
    conn, response = request(port, path=path, body=turn(stream=False))
    body = json.loads(response.read())
    assert response.status == 200 and body["object"] == "response"
    assert app.http_requests[0][1] == "/v1/responses"
    conn.close()


def test_a_json_turn_passes_through_with_its_length_and_is_billed(http_relay, store):
    app, port = http_relay()
    conn, response = request(port, body=turn(stream=False))
    raw = response.read()
    assert response.status == 200
    assert response.getheader("Content-Length") == str(len(raw))
    assert response.getheader("Transfer-Encoding") is None
    body = json.loads(raw)
    record = store.wait(1)[0]
    assert (record["transport"], record["response_id"], record["input_tokens"]) == ("http", body["id"], 120)
    assert record["terminal_event"] == "response.completed"
    conn.close()


def test_keepalive_comments_fill_a_silent_stream_only_after_its_first_event(http_relay, tracer):
    _, port = http_relay({"silence": 1.3}, **{HTTP + "sse_keepalive_interval_seconds": 0.25})
    conn, response = request(port, body=turn())
    _, comments, raw = read_stream(response)
    assert raw.startswith(b"event: response.created"), "a keepalive came before the first event"
    assert 3 <= comments <= 6
    assert raw.count(b": keepalive\n\n") == comments
    # Each comment sits between two events (or comments), never inside one.
    at = raw.find(b": keepalive")
    while at >= 0:
        assert raw[:at].endswith(b"\n\n")
        at = raw.find(b": keepalive", at + 1)
    line = tracer.find("downstream_sse_keepalive_ok")[0]
    assert (line["direction"], line["graceful"], line["wrote_downstream"]) == ("downstream_keepalive", True, True)
    assert tracer.find("http_request")[-1]["keepalives"] == comments
    conn.close()


def test_no_keepalive_when_the_interval_is_zero(http_relay):
    _, port = http_relay({"silence": 0.6}, **{HTTP + "sse_keepalive_interval_seconds": 0})
    conn, response = request(port, body=turn())
    _, comments, raw = read_stream(response)
    assert comments == 0 and b"keepalive" not in raw
    conn.close()


@pytest.mark.parametrize("headers, expected", [
    ({"originator": "codex_exec"}, True),
    ({"User-Agent": "codex_cli_rs/0.169.0"}, True),
    ({"User-Agent": "OpenAI/Python 2.8.0"}, False),
])
def test_codex_gets_the_app_keepalive_event_its_watchdog_counts(http_relay, headers, expected):
    _, port = http_relay({"silence": 1.0}, **{HTTP + "sse_keepalive_interval_seconds": 0,
                                              "gateway__openai_ws__passthrough_downstream_app_keepalive_interval_"
                                              "seconds": 0.3})
    conn, response = request(port, body=turn(), headers=headers)
    events, _, _ = read_stream(response)
    keepalives = [e for e in events if e[0] == "keepalive"]
    assert bool(keepalives) is expected
    if expected:
        assert keepalives[0][1] == {"type": "keepalive"}
        assert events[-1][0] == "response.completed"
    conn.close()


def test_a_client_that_leaves_mid_stream_is_billed_once_from_the_drained_upstream(http_relay, store, tracer):
    _, port = http_relay({"silence": 1.0})
    conn, response = request(port, body=turn())
    assert response.read1(65536).startswith(b"event: response.created")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    record = store.wait(1, timeout=10)[0]
    assert record["client_disconnected"] and record["terminal_event"] == "response.completed"
    assert record["total_tokens"] == 150 and record["transport"] == "http"
    assert tracer.find("drain_terminal")
    assert stays_false(lambda: len(store.records) > 1, 0.3)


def test_a_drain_is_bounded_by_its_timeout(http_relay, store, tracer):
    _, port = http_relay({"silence": 5}, **{HTTP + "upstream_drain_timeout_seconds": 0.5,
                                            HTTP + "sse_keepalive_interval_seconds": 0.1})
    conn, response = request(port, body=turn())
    response.read1(65536)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    record = store.wait(1, timeout=5)[0]
    assert record["client_disconnected"] and record["terminal_event"] == usage.RELAY_DRAIN_TIMEOUT
    assert tracer.find("drain_timeout")


def test_an_upstream_that_breaks_off_mid_stream_cuts_the_client_too(http_relay, store):
    _, port = http_relay({"mode": "drop-mid"})
    conn, response = request(port, body=turn())
    with pytest.raises(http.client.IncompleteRead):
        response.read()  # no last chunk: the client can tell the stream was cut
    record = store.wait(1)[0]
    assert record["terminal_event"] == usage.RELAY_UPSTREAM_LOST and not record["client_disconnected"]
    conn.close()


def test_an_upstream_error_event_is_relayed_and_billed_once(http_relay, store):
    _, port = http_relay({"mode": "error"})
    conn, response = request(port, body=turn())
    events, _, _ = read_stream(response)
    assert [e[0] for e in events][-2:] == ["error", "response.failed"]
    assert stays_false(lambda: len(store.records) > 1, 0.3)
    assert store.records[0]["terminal_event"] == "response.failed"
    conn.close()


def test_an_http_10_client_gets_a_close_delimited_stream(http_relay, store):
    _, port = http_relay()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = json.dumps(turn()).encode()
    sock.sendall(b"POST /v1/responses HTTP/1.0\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (KEY.encode(), len(body), body))
    raw = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert b"connection: close" in head.lower()
    assert rest.startswith(b"event: response.created") and b"response.completed" in rest
    store.wait(1)
    sock.close()


# -- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_bad_relay_key_gets_401_with_a_bearer_challenge_and_nothing_goes_upstream(http_relay, key):
    app, port = http_relay()
    conn, response = request(port, body=turn(), key=key)
    body = json.loads(response.read())
    assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
    assert app.http_requests == []
    conn.close()


def test_an_oversize_body_gets_413_before_anything_goes_upstream(http_relay):
    app, port = http_relay(**{HTTP + "max_request_body_bytes": 1000})
    conn, response = request(port, body=turn(input="x" * 2000))
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    assert app.http_requests == []
    conn.close()


def test_an_oversize_chunked_body_gets_413(http_relay):
    app, port = http_relay(**{HTTP + "max_request_body_bytes": 1000})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/models/x", body=iter([b"y" * 600, b"y" * 600]),
                 headers={"Authorization": "Bearer " + KEY}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


def test_in_flight_requests_count_against_the_key_limit(http_relay):
    _, port = http_relay({"silence": 1.0}, gateway__openai_ws__max_ingress_connections_per_api_key=1)
    conn, response = request(port, body=turn())
    response.read1(65536)
    second, refused = request(port, body=turn())
    assert refused.status == 429 and refused.getheader("Retry-After") == "1"
    assert json.loads(refused.read())["error"]["code"] == "too_many_connections"
    read_stream(response)
    third, ok = request(port, body=turn(stream=False))
    assert ok.status == 200
    for c in (conn, second, third):
        c.close()


def test_a_dead_upstream_gets_502(relay, tracer):
    from tests.helpers import free_port

    port = port_of(relay("ws://127.0.0.1:%d/v1/responses" % free_port()))
    conn, response = request(port, body=turn(), key=None)
    body = json.loads(response.read())
    assert response.status == 502 and body["error"]["code"] == "upstream_unreachable"
    assert body["error"]["type"] == "server_error"
    conn.close()


def test_an_upstream_slower_than_the_read_timeout_gets_504(http_relay):
    _, port = http_relay({"silence": 3}, upstream__http_read_timeout_seconds=0.3)
    conn, response = request(port, body=turn(stream=False))
    assert response.status == 504
    assert json.loads(response.read())["error"]["code"] == "upstream_timeout"
    conn.close()


def test_an_upstream_error_status_and_body_pass_through_unchanged(http_relay, store):
    _, port = http_relay({"mode": "error"})
    conn, response = request(port, body=turn(stream=False))
    body = json.loads(response.read())
    assert response.status == 500 and body["error"]["message"] == "fake failure"
    assert stays_false(lambda: store.records, 0.2), "a refused request ran no turn"
    conn.close()


def test_the_upstream_credential_never_reaches_the_client_or_the_trace(http_relay, tracer):
    _, port = http_relay({"mode": "error"})
    conn, response = request(port, body=turn(stream=False))
    assert UPSTREAM_KEY.encode() not in response.read()
    assert UPSTREAM_KEY not in json.dumps(tracer.events, default=str)
    conn.close()


# -- the passthrough -----------------------------------------------------------------------------------------


def test_models_and_other_v1_paths_are_proxied_with_their_query(http_relay):
    app, port = http_relay()
    conn, response = request(port, "GET", "/v1/models?limit=5")
    assert response.status == 200 and json.loads(response.read())["data"][0]["id"] == "gpt-fake"
    assert app.http_requests[-1][:2] == ("GET", "/v1/models")
    conn, response = request(port, "GET", "/v1/responses/resp_123")
    assert response.status == 404 and json.loads(response.read())["error"]["code"] == "not_found"
    assert app.http_requests[-1][:2] == ("GET", "/v1/responses/resp_123")
    conn.close()


def test_hop_by_hop_headers_and_client_credentials_stay_at_the_relay(http_relay):
    app, port = http_relay()
    conn, response = request(port, "GET", "/v1/models", headers={
        "Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "timeout=5",
        "Cookie": "session=abc", "Proxy-Authorization": "Basic x", "X-Stainless-Lang": "python"})
    response.read()
    headers = app.http_requests[-1][2]
    for name in ("x-private", "keep-alive", "cookie", "proxy-authorization"):
        assert name not in headers
    assert headers["x-stainless-lang"] == "python"
    assert headers["authorization"] == "Bearer " + UPSTREAM_KEY
    conn.close()


def test_a_chunked_request_body_streams_to_the_upstream(http_relay, store):
    app, port = http_relay({"mode": "echo"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/responses/compact", body=iter([b'{"model": "gpt-test", ', b'"input": "hi"}']),
                 headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert json.loads(response.read()) == {"model": "gpt-test", "input": "hi"}
    assert app.http_requests[-1][2]["transfer-encoding"] == "chunked"
    assert stays_false(lambda: store.records, 0.2), "an echo is not a Response object"
    conn.close()


def test_upstream_connections_are_kept_alive_and_reused(http_relay):
    app, port = http_relay()
    for _ in range(3):
        conn, response = request(port, body=turn(stream=False))
        response.read()
        conn.close()
        conn, response = request(port, "GET", "/v1/models")
        response.read()
        conn.close()
    assert len(app.http_requests) == 6
    assert len(set(app.http_peers)) == 1


def test_http_requests_are_counted_by_route_and_status(http_relay, relay):
    _, port = http_relay()
    for key in (KEY, "bad"):
        conn, response = request(port, "GET", "/v1/models", key=key)
        response.read()
        conn.close()
    metrics = relay.apps[-1].metrics.render()[1].decode()
    assert 'wsrelay_http_requests_total{route="passthrough",status="200"} 1.0' in metrics
    assert 'wsrelay_http_requests_total{route="passthrough",status="401"} 1.0' in metrics


def test_a_forced_stop_cuts_the_client_and_still_bills_the_turn(http_relay, relay, store):
    _, port = http_relay({"silence": 0.8})
    conn, response = request(port, body=turn())
    response.read1(65536)
    app = relay.apps[-1]
    wait_until(lambda: app.http.live, what="the exchange is live")
    app.shutdown(force=True)
    record = store.wait(1, timeout=5)[0]
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"]
    conn.close()


def test_an_event_stream_with_a_length_upstream_is_chunked_so_keepalives_fit(relay, start_server, store):
    def upstream(environ, start_response):
        environ["wsgi.input"].read()
        body = (b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\"}}\n\n"
                + b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\","
                b"\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}}\n\n")
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Content-Length", str(len(body)))])
        return [body]

    port = port_of(relay("ws://127.0.0.1:%d/v1/responses" % start_server(upstream)))
    conn, response = request(port, body=turn(), key=None)
    assert response.getheader("Content-Length") is None and response.getheader("Transfer-Encoding") == "chunked"
    events, _, _ = read_stream(response)
    assert [e[0] for e in events] == ["response.created", "response.completed"]
    assert store.wait(1)[0]["total_tokens"] == 3
    conn.close()
