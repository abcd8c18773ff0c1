"""Limits, origins, session timers, TLS on both sides, and secrets that never leak."""

import http.client
import io
import json
import os
import socket
import ssl
import time

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from tests.helpers import (CREATE, FIRST_MESSAGE_TIMEOUT, INTERVAL, PING_TIMEOUT, WS, connect, port_of, raw_request,
                           read_close, read_until_marker, tls_connect)
from wsrelay import trace
from wsrelay.fake_upstream import FakeUpstream, FrameSocket
from wsrelay.frames import OP_TEXT
from wsrelay.websocket import RelayHandler

pytestmark = pytest.mark.timeout(30)


# -- limits ----------------------------------------------------------------------------------------------------

def test_per_key_connection_cap_answers_429_with_retry_after_before_the_upgrade(fake, relay, tracer):
    app, url = fake()
    relay_url = relay(url, **{WS + "max_ingress_connections_per_api_key": 2})
    alice = [("Authorization", "Bearer key-alice")]
    first, second = connect(relay_url, alice), connect(relay_url, alice)
    sock, status, headers, body = raw_request(relay_url, alice)
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    assert len(app.handshakes) == 2, "the refused client must not cost an upstream connection"
    # Another key is not affected, and a freed slot is usable again.
    connect(relay_url, [("Authorization", "Bearer key-bob")])
    first.close(1000)
    assert read_close(first) == (1000, "")
    tracer.wait_for("relay_complete")
    with gevent.Timeout(5):
        while True:
            sock, status, headers, body = raw_request(relay_url, alice)
            if status == 101:
                break
            gevent.sleep(0.01)  # the slot is given back when the session's handler returns
    second.close(1000)


def test_global_connection_limit_answers_503(fake, relay):
    _, url = fake()
    relay_url = relay(url, server__max_connections=1)
    held = connect(relay_url)  # kept referenced: a collected client would close its socket and free the slot
    sock, status, headers, body = raw_request(relay_url)
    assert status == 503 and headers["retry-after"]
    assert json.loads(body)["error"]["code"] == "server_busy"
    held.close(1000)


def test_allowed_origins_refuse_other_browser_origins_but_not_origin_less_clients(fake, relay):
    _, url = fake()
    relay_url = relay(url, server__allowed_origins=["https://app.example.com"])
    sock, status, headers, body = raw_request(relay_url, [("Origin", "https://evil.example.net")])
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
    connect(relay_url, [("Origin", "https://app.example.com")])
    connect(relay_url)  # Codex and the SDKs send no Origin


# -- session timers ----------------------------------------------------------------------------------------------

def test_idle_session_is_closed_even_while_pings_keep_it_alive(fake, relay, tracer, store):
    _, url = fake()
    client = connect(relay(url, **{WS + "ingress_inter_turn_idle_timeout_seconds": 0.6,
                                   INTERVAL: 0.1, PING_TIMEOUT: 0.05}))
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    assert read_close(client) == (1000, "websocket idle timeout")
    assert len(tracer.find("downstream_ping_ok")) >= 3  # pinged all along, closed anyway
    first = tracer.wait_for("first_exit")
    assert first["cause"] == "idle_timeout" and first["graceful"] is True
    assert len(store.records) == 1


def test_client_sending_no_request_is_closed_with_1008(fake, relay, tracer, store):
    app, url = fake()
    client = connect(relay(url, **{FIRST_MESSAGE_TIMEOUT: 0.3}))
    assert read_close(client) == (1008, "no request received")
    assert tracer.wait_for("first_exit")["cause"] == "client_first_message_timeout"
    tracer.wait_for("relay_complete")
    assert app.closes == [(1000, "client sent no request")]
    assert store.records == []


def test_turn_with_a_silent_upstream_is_given_up_after_the_read_timeout(fake, relay, tracer, store):
    _, url = fake(silence=5)
    client = connect(relay(url, **{WS + "read_timeout_seconds": 0.5}))
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b"delta")
    assert read_close(client) == (1001, "upstream read timeout")
    first = tracer.wait_for("first_exit")
    assert first["cause"] == "upstream_read_timeout" and first["side"] == "upstream"
    record = store.wait(1)[0]
    assert record["terminal_event"] == "wsrelay.read_timeout" and record["client_disconnected"] is False


# -- TLS ---------------------------------------------------------------------------------------------------------

def test_relay_serves_wss_with_its_own_certificate(fake, relay, certificate, store, tracer):
    cert, key = certificate
    _, url = fake(silence=0.5)
    relay_url = relay(url, server__tls_cert=cert, server__tls_key=key,
                      **{INTERVAL: 0.2, PING_TIMEOUT: 0.1})
    client = tls_connect(relay_url.replace("ws://", "wss://"), cert)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    assert store.wait(1)[0]["terminal_event"] == "response.completed"
    assert tracer.find("downstream_ping_ok")  # Pings over TLS go out from a greenlet, and are answered


def test_tls_client_that_never_starts_its_tls_handshake_is_closed_after_the_deadline(fake, relay, certificate,
                                                                                      tracer):
    cert, key = certificate
    _, url = fake()
    relay_url = relay(url, server__tls_cert=cert, server__tls_key=key, server__handshake_timeout_seconds=0.5)
    sock = socket.create_connection(("127.0.0.1", port_of(relay_url)), timeout=5)
    started = time.monotonic()
    with gevent.Timeout(3, AssertionError("the relay still holds a TLS connection that never said a word")):
        assert sock.recv(100) == b""
    assert 0.4 <= time.monotonic() - started < 2.5
    assert tracer.wait_for("handshake_timeout")["request_line"] is False
    plain = socket.create_connection(("127.0.0.1", port_of(relay_url)), timeout=5)
    plain.sendall(b"GET /v1/responses HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to the TLS listener
    with gevent.Timeout(3, AssertionError("a failed TLS handshake was not closed")):
        try:
            while plain.recv(4096):
                pass  # a TLS alert, if any
        except ConnectionResetError:
            pass
    assert tracer.wait_for("tls_handshake_failed")["error"]
    tls_connect(relay_url.replace("ws://", "wss://"), cert)  # TLS clients are still served


@pytest.fixture
def tls_upstream(certificate):
    cert, key = certificate
    app = FakeUpstream()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv = WSGIServer(("127.0.0.1", 0), app, handler_class=RelayHandler, log=None, ssl_context=context)
    srv.start()
    yield app, "wss://127.0.0.1:%d/v1/responses" % srv.server_port
    srv.stop(timeout=1)


def test_upstream_certificate_is_verified_and_a_self_signed_one_is_refused(tls_upstream, relay, tracer):
    _, url = tls_upstream
    sock, status, headers, body = raw_request(relay(url))
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_tls_error"
    assert tracer.find("dial_failed")[0]["code"] == "upstream_tls_error"


def test_upstream_ca_file_adds_a_trusted_ca(tls_upstream, relay, certificate, store):
    _, url = tls_upstream
    client = connect(relay(url, upstream__ca_file=certificate[0]))
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    assert store.wait(1)[0]["terminal_event"] == "response.completed"


def test_https_upstream_is_verified_on_the_http_transport_too(tls_upstream, relay, certificate, store):
    _, url = tls_upstream
    port = port_of(relay(url))
    status, body = _post_responses(port)
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_tls_error"
    port = port_of(relay(url, upstream__ca_file=certificate[0]))
    status, body = _post_responses(port)
    assert status == 200 and json.loads(body)["object"] == "response"
    assert store.wait(1)[0]["transport"] == "http"


def _post_responses(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/responses", json.dumps({"model": "m", "input": "hi"}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    try:
        return response.status, response.read()
    finally:
        conn.close()


# -- secrets -----------------------------------------------------------------------------------------------------

def test_keys_never_reach_traces_error_bodies_or_client_frames(start_server, relay, tracer, store, monkeypatch):
    relay_key, upstream_key = "rk-DISTINCTIVE-relay-7f3a", "sk-DISTINCTIVE-upstream-91bc"
    lines = io.StringIO()
    text_tracer = trace.Tracer(stream=lines)
    tracer.listeners.append(lambda stage, fields: text_tracer.emit(stage, **fields))
    app = FakeUpstream(require_authorization="Bearer " + upstream_key,
                       response_headers=[("Set-Cookie", "sid=%s; Domain=127.0.0.1" % upstream_key)])
    url = "ws://127.0.0.1:%d/v1/responses" % start_server(app)
    monkeypatch.setenv("WSRELAY_TEST_UPSTREAM_KEY", upstream_key)
    relay_url = relay(url, auth__keys=[relay_key], upstream__api_key_env="WSRELAY_TEST_UPSTREAM_KEY")
    seen = []
    for presented in ("Bearer " + relay_key, "Bearer wrong-" + relay_key, None):
        headers = [("Authorization", presented), ("Cookie", "c=" + relay_key)] if presented else []
        sock, status, response_headers, body = raw_request(relay_url, headers)
        seen.append(json.dumps(response_headers).encode() + body)
        if status == 101:
            client = FrameSocket(sock, body, client=True)
            client.send(OP_TEXT, CREATE)
            with gevent.Timeout(5):
                while True:
                    fin, opcode, payload = client.read_frame()
                    seen.append(payload)
                    if b'"response.completed"' in payload:
                        break
            client.close(1000)
    store.wait(1)
    seen.append(lines.getvalue().encode())
    seen.append(json.dumps(store.records).encode())
    blob = b"\n".join(seen)
    assert relay_key.encode() not in blob and upstream_key.encode() not in blob
    assert app.handshakes[0]["authorization"] == "Bearer " + upstream_key
    assert all("cookie" not in h for h in app.handshakes)
    assert os.environ["WSRELAY_TEST_UPSTREAM_KEY"] == upstream_key
