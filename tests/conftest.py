"""Shared fixtures: real servers on 127.0.0.1 (fake or scripted upstream, the relay) and raw WebSocket peers.

Importing ``wsrelay`` patches the standard library for gevent, so everything here — servers and test code — runs
as greenlets of one hub; a test blocking on a socket lets the servers run.
"""

from wsrelay._gevent import patch

patch()  # before the tests' own imports of socket, ssl and threading

import base64  # noqa: E402
import os
import signal
import socket
import subprocess
import sys
import time

import gevent
import gevent.event
import gevent.queue
import pytest

from wsrelay import config as config_mod
from wsrelay import fake_upstream, server
from wsrelay.fake_upstream import FrameSocket
from wsrelay.trace import NullTracer


class RecordingTracer(NullTracer):
    """Keeps every trace line as ``(stage, fields)``; ``wait_for`` blocks until a stage shows up."""

    def __init__(self):
        super().__init__()
        self.events = []
        self._changed = gevent.event.Event()

    def emit(self, stage, **fields):
        super().emit(stage, **fields)
        self.events.append((stage, fields))
        self._changed.set()

    def stages(self):
        return [stage for stage, _ in self.events]

    def find(self, stage):
        return [fields for s, fields in self.events if s == stage]

    def wait_for(self, stage, timeout=5.0, count=1):
        with gevent.Timeout(timeout, AssertionError("no %r trace within %ss; saw %s"
                                                    % (stage, timeout, self.stages()))):
            while len(self.find(stage)) < count:
                self._changed.clear()
                self._changed.wait()
        return self.find(stage)[count - 1]


class ListStore:
    """A usage store that keeps records in memory (the real one is tested on its own)."""

    queue_depth = 0
    failures = 0

    def __init__(self):
        self.records = []
        self._changed = gevent.event.Event()

    def put(self, record):
        self.records.append(record.to_dict() if hasattr(record, "to_dict") else dict(record))
        self._changed.set()

    def wait(self, count=1, timeout=5.0):
        with gevent.Timeout(timeout, AssertionError("expected %d usage records, have %s" % (count, self.records))):
            while len(self.records) < count:
                self._changed.clear()
                self._changed.wait()
        return self.records


class ScriptedUpstream:
    """An upstream the test drives frame by frame: each accepted connection arrives on ``connections``
    as a :class:`FrameSocket` (raw socket in ``.sock``), after the 101 with ``response_headers``."""

    def __init__(self, response_headers=(), refuse=None):
        self.connections = gevent.queue.Queue()
        self.handshakes = []
        self.response_headers = list(response_headers)
        self.refuse = refuse
        self._hold = []

    def __call__(self, environ, start_response):
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]

    def accept_websocket(self, handler):
        self.handshakes.append({k[5:].replace("_", "-").lower(): v for k, v in handler.environ.items()
                                if k.startswith("HTTP_")})
        if self.refuse:
            status, headers = self.refuse
            return handler.refuse(status, "refused", "scripted refusal", headers)
        subprotocol = handler.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL")
        chosen = subprotocol.split(",")[0].strip() if subprotocol else None
        if not handler.switch_protocols(self.response_headers, chosen):
            return
        sock, initial = handler.take_over()
        done = gevent.event.Event()
        peer = FrameSocket(sock, initial)
        peer.done = done
        self.connections.put(peer)
        done.wait()  # the test ends the connection by setting peer.done (or the fixture does at teardown)

    def next(self, timeout=5.0):
        return self.connections.get(timeout=timeout)


@pytest.fixture
def tracer():
    return RecordingTracer()


@pytest.fixture
def store():
    return ListStore()


@pytest.fixture
def start_server():
    """Start a gevent WSGI server for an app on 127.0.0.1:0; stopped at teardown.  Returns its port."""
    servers = []

    def start(app):
        srv = fake_upstream.make_server(app)
        srv.start()
        servers.append(srv)
        return srv.server_port

    yield start
    for srv in servers:
        srv.stop(timeout=1)


@pytest.fixture
def fake(start_server):
    """``fake(**options)`` starts a :class:`FakeUpstream`; returns ``(app, url)``."""

    def make(**options):
        app = fake_upstream.FakeUpstream(**options)
        port = start_server(app)
        return app, "ws://127.0.0.1:%d/v1/responses" % port

    return make


@pytest.fixture
def scripted(start_server):
    made = []

    def make(**options):
        app = ScriptedUpstream(**options)
        port = start_server(app)
        made.append(app)
        return app, "ws://127.0.0.1:%d/v1/responses" % port

    yield make
    for app in made:
        while not app.connections.empty():
            app.connections.get().done.set()


FAST = {
    "gateway.openai_ws.passthrough_downstream_ping_interval_seconds": 0,
    "gateway.openai_ws.passthrough_downstream_ping_timeout_seconds": 0.2,
    "gateway.openai_ws.upstream_drain_timeout_seconds": 3,
    "gateway.openai_ws.close_timeout_seconds": 1,
    "upstream.connect_timeout_seconds": 2,
}


@pytest.fixture
def relay(tracer, store):
    """``relay(upstream_url, **settings)`` starts a relay server; returns its ws:// base URL (``/v1/responses``)."""
    servers = []

    def start(upstream_url, **settings):
        overrides = dict(FAST)
        overrides["upstream.url"] = upstream_url
        overrides.update({k.replace("__", "."): v for k, v in settings.items()})
        cfg = config_mod.load(None, overrides)
        srv = server.make_server(cfg, tracer, store, listener=("127.0.0.1", 0))
        srv.start()
        servers.append(srv)
        start.apps.append(srv.app)
        return "ws://127.0.0.1:%d/v1/responses" % srv.server_port

    start.apps = []  # the RelayApp of each relay started, in order
    yield start
    for srv in servers:
        srv.stop(timeout=1)


def ws_key():
    return base64.b64encode(os.urandom(16)).decode("ascii")


def raw_request(url, headers=(), version="HTTP/1.1", extra=b"", method="GET", key=None):
    """Send a hand-written handshake; returns ``(sock, status, headers_dict, body_or_leftover)``."""
    hostport, _, path = url[len("ws://"):].partition("/")
    host, _, port = hostport.partition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    lines = ["%s /%s %s" % (method, path, version), "Host: %s" % hostport]
    lines += ["%s: %s" % h for h in headers]
    default = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
               "sec-websocket-key": key or ws_key()}
    given = {h[0].lower() for h in headers}
    lines += ["%s: %s" % (k, v) for k, v in default.items() if k not in given and method == "GET"]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + extra)
    return (sock,) + read_response(sock)


def read_response(sock):
    """Read one HTTP response head (and its body, unless it is a 101): ``(status, headers_dict, body_or_rest)``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1]) if status_line else 0
    response_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    if status != 101:
        length = int(response_headers.get("content-length", "0") or 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, response_headers, rest


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def connect(url, headers=(), extra=b""):
    """A raw client :class:`FrameSocket` (masks what it sends) after a successful handshake."""
    sock, status, response_headers, rest = raw_request(url, headers, extra=extra)
    assert status == 101, (status, rest)
    peer = FrameSocket(sock, rest, client=True)
    peer.response_headers = response_headers
    return peer


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Served:
    """A ``wsrelay serve`` process; its standard error is collected as it comes.  ``preexec_fn`` runs in the
    child before the relay starts (e.g. to lower its open-file limit)."""

    def __init__(self, *args, env=None, preexec_fn=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "wsrelay", "serve"] + [str(a) for a in args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=preexec_fn)
        self.lines = []
        self.reader = gevent.spawn(self._read)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def stderr(self):
        return "\n".join(self.lines)

    def wait_listening(self, port, timeout=15.0):
        """Until the trace says it listens and the port accepts a connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("wsrelay serve exited with %s: %s" % (self.proc.returncode, self.stderr()))
            if any("stage=server_listening" in line for line in self.lines):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return
                except OSError:
                    pass
            gevent.sleep(0.05)
        raise AssertionError("wsrelay serve did not listen on %d: %s" % (port, self.stderr()))

    def terminate(self, timeout=5.0):
        """SIGTERM; returns the exit status (the process must end within ``timeout``)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("wsrelay serve ignored SIGTERM for %ss: %s" % (timeout, self.stderr()))
        self.reader.join(timeout=2)
        self.elapsed = time.monotonic() - started
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.kill()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def serve():
    started = []

    def start(*args, env=None, preexec_fn=None):
        served = Served(*args, env=env, preexec_fn=preexec_fn)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()
