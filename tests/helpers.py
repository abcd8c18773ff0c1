"""What the relay's tests share besides fixtures: stand-ins (a recording tracer, an in-memory store, a scripted
upstream), raw clients (hand-written handshakes, ``connect``), readers for what the relay sends back, setting names
for the ``relay`` fixture, a ``wsrelay serve`` process, and ``wait_until`` for state without an event of its own.

Importing ``wsrelay`` patches the standard library for gevent, so everything here — servers and test code — runs
as greenlets of one hub; a test blocking on a socket lets the servers run.  The fixtures are in ``conftest.py``.
"""

from wsrelay._gevent import patch

patch()  # before the tests' own imports of socket, ssl and threading

import base64  # noqa: E402
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import gevent
import gevent.event
import gevent.queue

from wsrelay import frames
from wsrelay.fake_upstream import ConnectionClosed, FrameSocket
from wsrelay.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT
from wsrelay.trace import NullTracer

# -- stand-ins -----------------------------------------------------------------------------------------------------

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


def wait_until(predicate, timeout=5.0, what="condition", interval=0.01):
    """Poll a condition that has no event of its own (state kept by another greenlet or process) until it holds;
    fails the test after ``timeout``."""
    with gevent.Timeout(timeout, AssertionError("%s not met within %ss" % (what, timeout))):
        while not predicate():
            gevent.sleep(interval)


def stays_false(predicate, period, interval=0.01):
    """Whether ``predicate`` stays false for all of ``period`` (checked every ``interval``): for the behaviours
    that are an absence (no Ping before the first write, no keepalive between turns)."""
    deadline = time.monotonic() + period
    while time.monotonic() < deadline:
        if predicate():
            return False
        gevent.sleep(interval)
    return not predicate()


# -- settings for the relay fixture --------------------------------------------------------------------------------

FAST = {
    "gateway.openai_ws.passthrough_downstream_ping_interval_seconds": 0,
    "gateway.openai_ws.passthrough_downstream_ping_timeout_seconds": 0.2,
    "gateway.openai_ws.upstream_drain_timeout_seconds": 3,
    "gateway.openai_ws.close_timeout_seconds": 1,
    "upstream.connect_timeout_seconds": 2,
}


WS = "gateway__openai_ws__"
INTERVAL = WS + "passthrough_downstream_ping_interval_seconds"
PING_TIMEOUT = WS + "passthrough_downstream_ping_timeout_seconds"
APP_KEEPALIVE_INTERVAL = WS + "passthrough_downstream_app_keepalive_interval_seconds"
APP_KEEPALIVE_MODE = WS + "passthrough_downstream_app_keepalive_mode"
DRAIN_TIMEOUT = WS + "upstream_drain_timeout_seconds"
WRITE_TIMEOUT = WS + "write_timeout_seconds"
READ_LIMIT = WS + "client_read_limit_bytes"
FIRST_MESSAGE_TIMEOUT = WS + "client_first_message_timeout_seconds"

# -- what a client sends and what the fake upstream answers --------------------------------------------------------

CREATE = json.dumps({"type": "response.create", "model": "gpt-test", "input": []}).encode()
HEAD_EVENTS = 6  # response.created, response.in_progress, response.output_item.added, 3 deltas
FAKE_USAGE = {"input_tokens": 120, "output_tokens": 30, "total_tokens": 150, "cached_tokens": 20,
              "reasoning_tokens": 10}
MiB = 1024 * 1024


def port_of(url):
    return int(url[len("ws://"):].partition("/")[0].rpartition(":")[2])


def send_create(client, **fields):
    """Send a response.create with one user message; ``fields`` are set on the request."""
    request = {"type": "response.create", "model": "gpt-test", "input": [{"role": "user", "content": "hi"}]}
    request.update(fields)
    client.send(OP_TEXT, json.dumps(request).encode())


def tokens(record):
    """A usage record's token counts, to compare with :data:`FAKE_USAGE`."""
    return {name: record[name] for name in FAKE_USAGE}


# -- reading what the relay sends ----------------------------------------------------------------------------------

def read_events(client, count=None, until=None, timeout=5.0):
    """Read JSON events (answering Pings) until ``count`` were read or one of type ``until`` arrived."""
    events = []
    with gevent.Timeout(timeout, AssertionError("events so far: %s" % [e.get("type") for e in events])):
        while True:
            fin, opcode, payload = client.read_frame()
            if opcode == OP_PING:
                client.send(OP_PONG, payload)
                continue
            assert opcode == OP_TEXT and fin, (opcode, payload[:80])
            events.append(json.loads(payload))
            if count is not None and len(events) == count:
                return events
            if until is not None and events[-1]["type"] == until:
                return events


def read_close(peer, timeout=5.0, strict=False):
    """Read the peer's close frame; returns its ``(code, reason)``, ``(None, "")`` for an empty one.

    ``strict`` says what may come before it.  False: anything — Pings are answered, data frames skipped, and
    if the connection ends without a close frame the result is the string ``"eof"``.  True: nothing — the very
    next frame must be the close (any other frame fails the assertion, the end of the connection raises).
    """
    with gevent.Timeout(timeout, AssertionError("no close frame within %ss" % timeout)):
        if strict:
            fin, opcode, payload = peer.read_frame()
            assert opcode == OP_CLOSE, "expected a close frame, got opcode %#x payload %r" % (opcode, payload[:120])
            return frames.parse_close(payload)
        while True:
            try:
                fin, opcode, payload = peer.read_frame()
            except (ConnectionClosed, OSError):
                return "eof"
            if opcode == OP_CLOSE:
                return frames.parse_close(payload)
            if opcode == OP_PING:
                peer.send(OP_PONG, payload)


def read_until_marker(peer, marker, timeout=5.0):
    """Read (answering Pings) until a frame other than a Ping whose payload contains ``marker``; returns that
    payload."""
    with gevent.Timeout(timeout, AssertionError("no %r within %ss" % (marker, timeout))):
        while True:
            fin, opcode, payload = peer.read_frame()
            if opcode == OP_PING:
                peer.send(OP_PONG, payload)
            elif marker in payload:
                return payload


def read_frames_until(peer, predicate, timeout=5.0, answer_pings=True):
    """Read frames until ``predicate(opcode, payload)`` holds for one (Pings included, answered unless
    ``answer_pings`` is false); returns every frame seen, that one last, as ``(opcode, payload, arrival time)``."""
    seen = []
    with gevent.Timeout(timeout, AssertionError("predicate not met; saw %r" % [(o, p[:60]) for o, p, _ in seen])):
        while True:
            fin, opcode, payload = peer.read_frame()
            seen.append((opcode, payload, time.monotonic()))
            if opcode == OP_PING and answer_pings:
                peer.send(OP_PONG, payload)
            if predicate(opcode, payload):
                return seen


# -- the trace -----------------------------------------------------------------------------------------------------

def first_exit(tracer, timeout=5.0):
    """The fields of the session's ``first_exit`` trace line, once it is there."""
    return tracer.wait_for("first_exit", timeout=timeout)


def exit_fields(tracer):
    """``(side, cause, graceful, wrote_downstream)`` of the ``first_exit`` trace line."""
    fields = first_exit(tracer)
    return fields["side"], fields["cause"], fields["graceful"], fields["wrote_downstream"]


# -- raw clients and processes -------------------------------------------------------------------------------------

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


def tls_connect(url, cafile):
    """A raw client over TLS: the handshake by hand, then FrameSocket over the TLS socket."""
    hostport, _, path = url[len("wss://"):].partition("/")
    host, _, port = hostport.partition(":")
    context = ssl.create_default_context(cafile=cafile)
    sock = context.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall(("GET /%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % (path, hostport, key)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return FrameSocket(sock, rest, client=True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Served:
    """A ``wsrelay serve`` process; its standard error is collected as it comes.  ``preexec_fn`` runs in the
    child before the relay starts (e.g. to lower its open-file limit).  A relay with workers runs in a process
    group of its own, all killed at teardown."""

    def __init__(self, *args, env=None, preexec_fn=None):
        self.group = "--workers" in args
        self.proc = subprocess.Popen([sys.executable, "-m", "wsrelay", "serve"] + [str(a) for a in args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=preexec_fn, start_new_session=self.group)
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
        if self.group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the workers too, whatever became of the arbiter
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.kill()
        self.proc.stdout.close()
        self.proc.stderr.close()


def ws_turn(port, headers=()):
    """One turn over WebSocket on a relay at ``port``; its response id."""
    client = connect("ws://127.0.0.1:%d/v1/responses" % port, headers)
    try:
        send_create(client)
        return read_events(client, until="response.completed", timeout=10)[-1]["response"]["id"]
    finally:
        client.sock.close()


def http_turn(port, headers=None):
    """One streamed turn over HTTP (POST /v1/responses) on a relay at ``port``; its response id."""
    import http.client

    from wsrelay.sse import SseReader

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/responses", json.dumps({"model": "gpt-test", "input": "hi", "stream": True}),
                     dict({"Content-Type": "application/json"}, **(headers or {})))
        response = conn.getresponse()
        assert response.status == 200, response.read()
        reader, last = SseReader(), None
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break
            for event in reader.feed(chunk):
                last = json.loads(event.data)
        assert last["type"] == "response.completed", last
        return last["response"]["id"]
    finally:
        conn.close()
