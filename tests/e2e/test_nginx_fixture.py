"""Checks that the NginxProxy test fixture proxies WebSockets through a real
nginx and enforces its proxy_read_timeout, so other end-to-end tests can rely
on it.

The upstream WebSocket server runs in a separate Python process so these tests
behave the same with and without gevent monkey-patching in the test process.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.e2e.nginx import NGINX_MISSING_MESSAGE, NginxProxy, nginx_binary
from wsrelay.sse import SseReader

# Upstream server: echoes every message; in "ping" mode it also sends a
# WebSocket Ping every PING_EVERY seconds while the connection is otherwise
# silent. It prints its port on stdout, and exits when its stdin closes, so it
# never outlives the test process.
UPSTREAM_SCRIPT = r"""
import os, sys, threading
from websockets.sync.server import serve

mode = sys.argv[1]
ping_every = float(sys.argv[2])

def handler(ws):
    while True:
        try:
            message = ws.recv(timeout=ping_every if mode == "ping" else None)
        except TimeoutError:
            ws.ping()
            continue
        except Exception:
            return
        ws.send(message)

def exit_when_parent_goes():
    sys.stdin.read()
    os._exit(0)

threading.Thread(target=exit_when_parent_goes, daemon=True).start()
with serve(handler, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"""

PING_EVERY = 0.3


class Upstream:
    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM_SCRIPT, mode, str(PING_EVERY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        line = self.proc.stdout.readline()
        if not line.strip():
            self.stop()
            raise RuntimeError(f"upstream WebSocket server failed to start (exit {self.proc.returncode})")
        self.port = int(line)

    def stop(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe:
                pipe.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def require_nginx() -> None:
    # A missing nginx is a broken test setup, not a reason to skip.
    if nginx_binary() is None:
        pytest.fail(NGINX_MISSING_MESSAGE, pytrace=False)


@pytest.fixture
def upstream_factory():
    started = []

    def make(mode: str = "echo") -> Upstream:
        up = Upstream(mode)
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


def ws_connect(url: str):
    # No client keepalive pings: only the upstream's traffic may keep nginx's
    # read timer from expiring. No proxy from the environment: loopback only.
    return connect(url, ping_interval=None, proxy=None, compression=None, open_timeout=5, close_timeout=2)


@pytest.mark.timeout(30)
def test_message_round_trips_through_nginx(upstream_factory):
    require_nginx()
    up = upstream_factory("echo")
    with NginxProxy(up.port, read_timeout=3.0) as proxy:
        assert proxy.url("/v1/responses") == f"ws://127.0.0.1:{proxy.port}/v1/responses"
        with ws_connect(proxy.url("/v1/responses")) as ws:
            ws.send("hello through nginx")
            assert ws.recv(timeout=5) == "hello through nginx"
            ws.send(b"\x00binary\xff")
            assert ws.recv(timeout=5) == b"\x00binary\xff"


@pytest.mark.timeout(30)
def test_nginx_closes_connection_after_upstream_silence(upstream_factory):
    require_nginx()
    up = upstream_factory("echo")
    with NginxProxy(up.port, read_timeout=1.0) as proxy:
        with ws_connect(proxy.url("/")) as ws:
            ws.send("ping?")
            assert ws.recv(timeout=5) == "ping?"
            silent_since = time.monotonic()
            # The upstream now says nothing; nginx must drop the connection
            # once its 1 s read timeout expires.
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=3.0)
            elapsed = time.monotonic() - silent_since
        assert 0.7 <= elapsed <= 3.0, f"connection closed after {elapsed:.2f} s of upstream silence"
        assert "upstream timed out" in proxy.error_log()


@pytest.mark.timeout(30)
def test_upstream_pings_keep_connection_open_through_nginx(upstream_factory):
    require_nginx()
    up = upstream_factory("ping")
    with NginxProxy(up.port, read_timeout=1.0) as proxy:
        with ws_connect(proxy.url("/")) as ws:
            # Three times nginx's read timeout with only pings from upstream:
            # no message arrives and the connection must still be open.
            with pytest.raises(TimeoutError):
                ws.recv(timeout=3.0)
            ws.send("still there")
            assert ws.recv(timeout=5) == "still there"
        assert "upstream timed out" not in proxy.error_log()


@pytest.mark.timeout(30)
def test_proxy_stop_is_idempotent_and_cleans_up():
    require_nginx()

    proxy = NginxProxy(1, read_timeout=0.5).start()
    prefix = proxy.prefix
    assert prefix and os.path.isdir(prefix)
    conf = open(proxy.conf_path).read()
    assert "proxy_read_timeout 500ms;" in conf
    assert f"listen 127.0.0.1:{proxy.port};" in conf
    proxy.stop()
    proxy.stop()
    assert not os.path.exists(prefix)


@pytest.mark.timeout(30)
def test_event_stream_passes_through_nginx_as_it_happens(fake):
    require_nginx()
    app, url = fake(silence=1.5)
    upstream_port = int(url.split(":")[2].split("/")[0])
    with NginxProxy(upstream_port, read_timeout=5.0) as proxy:
        assert proxy.http_url("/v1") == f"http://127.0.0.1:{proxy.port}/v1"
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        # A body the size of a long conversation: over nginx's default client_max_body_size (1 MiB).
        body = json.dumps({"model": "m", "input": "x" * (2 * 1024 * 1024), "stream": True}).encode()
        started = time.monotonic()
        conn.request("POST", "/v1/responses", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        reader, types, first_at = SseReader(), [], None
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break
            for event in reader.feed(chunk):
                first_at = first_at or time.monotonic()
                types.append(event.event)
        conn.close()
        assert first_at - started < 1.2, "nginx held the events back until the silence ended"
        assert time.monotonic() - started >= 1.5
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert app.http_requests[0][:2] == ("POST", "/v1/responses")
