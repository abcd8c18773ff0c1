"""A Responses-shaped upstream, on both transports, for tests and for smoke-testing a deployment.

For each ``response.create`` (WebSocket) or ``POST /v1/responses`` (HTTP; ``"stream": true`` gets Server-Sent
Events) it sends ``response.created``, ``response.in_progress``, an output item with a few
``response.output_text.delta`` events, optionally stays silent for ``silence`` seconds, then ends the turn
according to ``mode``:

``normal``     ``response.output_item.done`` + ``response.completed`` with usage
``error``      ``error`` (status 500) followed by ``response.failed`` for the same turn (HTTP without streaming:
               a 500 with OpenAI's error body)
``quota-mid``  ``error`` with status 429 and code ``rate_limit_exceeded`` in the middle of the turn, the way a
               quota runs out mid-session (HTTP without streaming: a 429)
``close-mid``  WebSocket: a close frame 1011 in the middle of the turn; HTTP: the event stream ends there
``drop-mid``   a TCP reset in the middle of the turn (no close frame, no end of the HTTP body)
``echo``       no Responses events: every data message comes back as it was sent (same opcode); over HTTP the
               request body of any POST comes back as JSON

``refuse_websocket`` (an HTTP status, e.g. 426) makes it an HTTP-only upstream: every WebSocket handshake is
answered with that status and an OpenAI-shaped JSON error (a client such as Codex then falls back to HTTP).
``refuse`` (``(status, retry_after)``; settable while it runs) answers every request on both transports with that
status (and ``Retry-After`` unless None): an account that is rate-limited (429), refused (401) or down (503).

A ``response.create`` with ``"generate": false`` (Codex's prewarm) is answered with ``response.created`` and a
``response.completed`` with zero usage, whatever the mode.  A non-streaming request gets the final Response
object (``usage`` at its top level).  ``GET /v1/models`` lists one model.
"""

import json
import socket
import struct
import uuid

import gevent
from gevent.pywsgi import WSGIServer

from . import frames
from .fake_http import http_exchange
from .frames import OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT
from .websocket import RelayHandler

MODES = ("normal", "error", "quota-mid", "close-mid", "drop-mid", "echo")


class ConnectionClosed(Exception):
    def __init__(self, code=None, reason=""):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class FrameSocket:
    """Blocking, message-level WebSocket I/O over a raw socket (server side: reads masked, writes unmasked)."""

    def __init__(self, sock, initial=b"", client=False):
        self.sock = sock
        self.buf = bytearray(initial)
        self.client = client

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed()
            self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_frame(self):
        """``(fin, opcode, payload)`` of the next frame, payload unmasked."""
        b0, b1 = self._read(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read(8))[0]
        key = self._read(4) if b1 & 0x80 else None
        payload = self._read(length)
        if key:
            payload = frames.unmask(payload, key)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def read_message(self, on_control=None):
        """``(opcode, payload)`` of the next data message; answers Pings, raises ConnectionClosed on a close."""
        opcode, parts = None, []
        while True:
            fin, op, payload = self.read_frame()
            if op == OP_PING:
                self.send(OP_PONG, payload)
            elif op == OP_CLOSE:
                code, reason = frames.parse_close(payload)
                try:
                    self.send(OP_CLOSE, payload)
                except OSError:
                    pass
                raise ConnectionClosed(code, reason)
            if op >= OP_CLOSE:
                if on_control is not None:
                    on_control(op, payload)
                continue
            if op != OP_CONTINUATION:
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def send(self, opcode, payload=b"", fin=True):
        self.sock.sendall(frames.build_frame(opcode, payload, fin=fin, mask=self.client))

    def send_json(self, event):
        self.send(OP_TEXT, json.dumps(event, separators=(",", ":")).encode("utf-8"))

    def close(self, code=frames.CLOSE_NORMAL, reason=""):
        self.sock.sendall(frames.build_close(code, reason, mask=self.client))


def delta_texts(deltas=3):
    """The text of each ``response.output_text.delta`` of a turn; joined, the turn's output text."""
    return ["word%d " % i for i in range(deltas)]


def turn_events(request, mode="normal", deltas=3, usage=None):
    """The events of one turn before and after the silence: ``(head, tail)`` lists of dicts."""
    response_id = "resp_" + uuid.uuid4().hex[:24]
    model = request.get("model") or "gpt-fake"
    base = {"id": response_id, "object": "response", "model": model}
    if request.get("generate") is False:
        done = dict(base, status="completed", output=[],
                    usage={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0})
        return [{"type": "response.created", "response": dict(base, status="in_progress")}], \
               [{"type": "response.completed", "response": done}]
    usage = usage or {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 20},
                      "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 10},
                      "total_tokens": 150}
    item = {"id": "msg_" + uuid.uuid4().hex[:16], "type": "message", "role": "assistant", "content": []}
    head = [{"type": "response.created", "response": dict(base, status="in_progress")},
            {"type": "response.in_progress", "response": dict(base, status="in_progress")},
            {"type": "response.output_item.added", "output_index": 0, "item": item}]
    head += [{"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0,
              "content_index": 0, "delta": text} for text in delta_texts(deltas)]
    if mode == "quota-mid":
        tail = [{"type": "error", "status": 429, "error": {
            "type": "requests", "code": "rate_limit_exceeded",
            "message": "fake upstream: rate limit reached for requests"}}]
    elif mode == "error":
        tail = [{"type": "error", "status": 500, "error": {"type": "server_error", "message": "fake failure"}},
                {"type": "response.failed", "response": dict(base, status="failed", usage=usage)}]
    else:
        text = "".join(delta_texts(deltas))
        done_item = dict(item, status="completed", content=[{"type": "output_text", "text": text}])
        tail = [{"type": "response.output_item.done", "output_index": 0, "item": done_item},
                {"type": "response.completed",
                 "response": dict(base, status="completed", output=[done_item], usage=usage)}]
    return head, tail


class FakeUpstream:
    """The WSGI app + ``accept_websocket`` of the fake upstream.  ``handshakes`` keeps each request's headers."""

    def __init__(self, mode="normal", silence=0.0, deltas=3, usage=None, response_headers=(),
                 require_authorization=None, refuse_websocket=None, refuse=None):
        if mode not in MODES:
            raise ValueError("mode must be one of %s" % ", ".join(MODES))
        if refuse_websocket is not None and not 400 <= refuse_websocket <= 599:
            raise ValueError("refuse_websocket must be an HTTP error status (400-599)")
        self.mode = mode
        self.silence = silence
        self.deltas = deltas
        self.usage = usage
        self.response_headers = list(response_headers)
        self.require_authorization = require_authorization
        self.refuse_websocket = refuse_websocket
        self.refuse = refuse  # (status, Retry-After or None): every request gets it, on both transports
        self.handshakes = []
        self.http_requests = []   # (method, path, headers) of each HTTP request
        self.http_peers = []      # the client port of each HTTP request (one per upstream connection)
        self.closes = []          # (code, reason) of each close frame a client sent
        self.connections = 0
        self.requests = []        # (connection number, request) of each WebSocket response.create, from 1

    def __call__(self, environ, start_response):
        """The HTTP transport: ``POST /v1/responses`` (SSE or JSON) and ``GET /v1/models``."""
        return http_exchange(self, environ, start_response, turn_events)

    def accept_websocket(self, handler):
        environ = handler.environ
        self.handshakes.append({k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                                if k.startswith("HTTP_")})
        if self.require_authorization and environ.get("HTTP_AUTHORIZATION") != self.require_authorization:
            return handler.refuse(401, "invalid_api_key", "fake upstream: wrong credential")
        if self.refuse:
            status, retry_after = self.refuse
            return handler.refuse(status, "fake_refusal", "fake upstream: refused with %d" % status,
                                  [("Retry-After", str(retry_after))] if retry_after is not None else [])
        if self.refuse_websocket:
            return handler.refuse(self.refuse_websocket, "websocket_not_supported",
                                  "fake upstream: WebSocket is not served here; use HTTP (POST /v1/responses)")
        if not handler.switch_protocols(self.response_headers):
            return
        sock, initial = handler.take_over()
        self.connections += 1
        peer = FrameSocket(sock, initial)
        peer.number = self.connections
        try:
            self._serve(peer)
        except ConnectionClosed as closed:
            if closed.code is not None or closed.reason:
                self.closes.append((closed.code, closed.reason))
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, peer):
        while True:
            opcode, payload = peer.read_message()
            if self.mode == "echo":
                peer.send(opcode, payload)
                continue
            if opcode != OP_TEXT:
                continue
            try:
                request = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(request, dict) or request.get("type") != "response.create":
                continue
            self.requests.append((peer.number, request))
            head, tail = turn_events(request, self.mode, self.deltas, self.usage)
            for event in head:
                peer.send_json(event)
            if request.get("generate") is not False:
                if self.silence:
                    gevent.sleep(self.silence)
                if self.mode == "close-mid":
                    peer.close(frames.CLOSE_INTERNAL_ERROR, "fake upstream failure")
                    _wait_for_close(peer)
                    return
                if self.mode == "drop-mid":
                    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
            for event in tail:
                peer.send_json(event)


def _wait_for_close(peer, timeout=5.0):
    try:
        with gevent.Timeout(timeout):
            while True:
                peer.read_message()
    except (ConnectionClosed, OSError, gevent.Timeout):
        pass


def make_server(app, host="127.0.0.1", port=0):
    return WSGIServer((host, port), app, handler_class=RelayHandler, log=None)

