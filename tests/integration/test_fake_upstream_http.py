"""The fake upstream's HTTP transport, as an HTTP client sees it: SSE and JSON responses, models, errors; and the
HTTP-only fake that refuses WebSocket handshakes."""

import http.client
import json
import subprocess
import sys
import time

import gevent
import pytest

from tests.helpers import REPO, free_port, port_of, raw_request
from wsrelay.fake_upstream import FakeUpstream
from wsrelay.sse import SseReader

pytestmark = pytest.mark.timeout(30)


def post(url, body, headers=None, path="/v1/responses"):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=10)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, payload, dict({"Content-Type": "application/json"}, **(headers or {})))
    return conn, conn.getresponse()


def sse_events(response):
    """Read the whole event stream: ``[(type, event dict)]``, and when the first event arrived."""
    reader, events, first_at = SseReader(), [], None
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return events, first_at
        for event in reader.feed(chunk):
            first_at = first_at or time.monotonic()
            events.append((event.event, json.loads(event.data)))


def test_a_streaming_request_gets_its_events_as_they_happen_then_the_terminal_event(fake):
    app, url = fake(silence=0.6)
    started = time.monotonic()
    conn, response = post(url, {"model": "gpt-x", "input": "hi", "stream": True}, {"Authorization": "Bearer k"})
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events, first_at = sse_events(response)
    assert first_at - started < 0.5, "the head of the turn waited for the silence"
    assert time.monotonic() - started >= 0.6
    types = [kind for kind, _ in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert all(kind == event["type"] for kind, event in events)
    done = events[-1][1]["response"]
    assert done["model"] == "gpt-x" and done["usage"]["total_tokens"] == 150
    assert app.http_requests[0][:2] == ("POST", "/v1/responses")
    assert app.http_requests[0][2]["authorization"] == "Bearer k"
    conn.close()


def test_a_request_without_stream_gets_the_final_response_object(fake):
    _, url = fake()
    conn, response = post(url, {"model": "gpt-x", "input": "hi"}, path="/responses")
    body = json.loads(response.read())
    assert response.status == 200 and body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "completed" and body["usage"]["input_tokens"] == 120
    conn.close()


def test_models_are_listed(fake):
    _, url = fake()
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=10)
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    assert response.status == 200
    assert [m["id"] for m in json.loads(response.read())["data"]] == ["gpt-fake"]
    conn.close()


def test_error_mode_streams_error_then_failed_and_answers_500_without_stream(fake):
    _, url = fake(mode="error")
    conn, response = post(url, {"model": "m", "stream": True})
    types = [kind for kind, _ in sse_events(response)[0]]
    assert types[-2:] == ["error", "response.failed"]
    conn.close()
    conn, response = post(url, {"model": "m"})
    assert response.status == 500 and json.loads(response.read())["error"]["code"] == "server_error"
    conn.close()


def test_close_mid_ends_the_stream_before_the_terminal_event_and_drop_mid_resets_it(fake):
    _, url = fake(mode="close-mid")
    conn, response = post(url, {"model": "m", "stream": True})
    types = [kind for kind, _ in sse_events(response)[0]]
    assert types[-1] == "response.output_text.delta"
    conn.close()
    _, url = fake(mode="drop-mid")
    conn, response = post(url, {"model": "m", "stream": True})
    with pytest.raises((ConnectionError, http.client.IncompleteRead)):
        sse_events(response)
    conn.close()


def test_bad_requests_get_openai_shaped_errors(fake):
    app, url = fake(require_authorization="Bearer right")
    conn, response = post(url, {"model": "m"}, {"Authorization": "Bearer wrong"})
    assert response.status == 401 and json.loads(response.read())["error"]["code"] == "invalid_api_key"
    conn.close()
    _, url = fake()
    for body, path, status in ((b"{not json", "/v1/responses", 400), (b"[]", "/v1/responses", 400),
                               (b"{}", "/v1/elsewhere", 404), (b"{}", "/v1/models", 405)):
        conn, response = post(url, body, path=path)
        assert response.status == status, (body, path)
        assert json.loads(response.read())["error"]["message"]
        conn.close()


def test_refuse_websocket_answers_every_handshake_with_that_status_and_still_serves_http(fake):
    app, url = fake(refuse_websocket=426)
    for _ in range(2):
        sock, status, headers, body = raw_request(url, [("Authorization", "Bearer k")])
        sock.close()
        assert status == 426 and headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] == "websocket_not_supported" and error["type"] == "invalid_request_error"
    assert len(app.handshakes) == 2 and app.handshakes[0]["authorization"] == "Bearer k"
    assert app.connections == 0
    conn, response = post(url, {"model": "m", "input": "hi", "stream": True})
    assert [kind for kind, _ in sse_events(response)[0]][-1] == "response.completed"
    conn.close()


def test_refuse_websocket_takes_only_an_http_error_status():
    for status in (101, 200, 399, 600):
        with pytest.raises(ValueError):
            FakeUpstream(refuse_websocket=status)


def test_fake_upstream_command_refuses_websocket_when_asked():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wsrelay", "fake-upstream", "--port", str(port),
                             "--refuse-websocket", "426"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(15, AssertionError("the fake upstream process did not start listening")):
            line = proc.stderr.readline()
        assert "listening on http://127.0.0.1:%d/v1, refusing WebSocket with 426" % port in line
        url = "ws://127.0.0.1:%d/v1/responses" % port
        sock, status, _, body = raw_request(url)
        sock.close()
        assert status == 426 and json.loads(body)["error"]["code"] == "websocket_not_supported"
        conn, response = post(url, {"model": "m"})
        assert response.status == 200 and json.loads(response.read())["status"] == "completed"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
