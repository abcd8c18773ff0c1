"""The only module that knows gevent-websocket's internals.

gevent-websocket 0.10.1 writes the 101 before the application runs (so nothing can be refused after looking at
the request), answers a non-base64 ``Sec-WebSocket-Key`` with a 500 and HTTP/1.0 with "402 Bad Request", sends
error bodies as ``str`` (gevent then drops them), matches subprotocols as substrings and mangles close frames on
Python 3.  :class:`RelayHandler` keeps its server plumbing and replaces the handshake: the request is validated
here, the application decides (refuse with an HTTP status and a JSON body, or accept), and on acceptance the raw
socket and any bytes read along with the request are handed over — the relay speaks the frames itself.
"""

import base64
import binascii
import hashlib
import http.client
import io
import json
import re
import socket

import gevent
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSION = "13"

_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long", 426: "Upgrade Required",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_body(status, code, message):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode("utf-8")


def error_response(status, code, message, headers=()):
    """A whole HTTP error response as ``(status, bytes)``, for the paths that write raw bytes (pywsgi's pre-WSGI
    errors, the handshake guard's answers)."""
    body = error_body(status, code, message)
    head = ("HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
            % (status_line(status), len(body)))
    head += "".join("%s: %s\r\n" % header for header in headers) + "\r\n"
    return str(status), head.encode("latin-1") + body


# http.client's limits, which pywsgi's header parsing applies.
_MAX_LINE = 65536
_MAX_HEADERS = 100
# A header line the email parser would read as ``(name, value)`` without a second look: a plain token name,
# one line, no stray CR.
_PLAIN_HEADER = re.compile(rb"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n\Z")


def parse_request_headers(fp):
    """pywsgi's request headers (its ``OldMessage``), as ``http.client.parse_headers`` makes them.

    The stock parse feeds the block through the email package's parser, ~7 % of the relay's CPU per handshake.
    A block of plain lines (nearly every request) is split here instead; anything else (folded lines, lines
    without a name, stray CRs) still goes through the stock parser, so the result is the same either way.
    """
    lines = []
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            message = pywsgi.OldMessage()
            message.status = "Line too long"  # what pywsgi's own factory answers
            return message
        lines.append(line)
        if len(lines) > _MAX_HEADERS:
            raise http.client.HTTPException("got more than %d headers" % _MAX_HEADERS)
        if line in (b"\r\n", b"\n", b""):
            break
    headers = []
    for line in lines[:-1]:
        match = _PLAIN_HEADER.match(line)
        if match is None:
            return http.client.parse_headers(io.BytesIO(b"".join(lines)), _class=pywsgi.OldMessage)
        headers.append((match.group(1).decode("latin-1"), match.group(2).decode("latin-1")))
    message = pywsgi.OldMessage()
    message._headers = headers
    return message


def status_line(status):
    return "%d %s" % (status, _REASONS.get(status, "Error"))


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def header_tokens(value):
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def is_upgrade_request(environ):
    return "websocket" in [t.lower() for t in header_tokens(environ.get("HTTP_UPGRADE"))]


def check_handshake(environ, request_version):
    """Problems with a WebSocket upgrade request as ``(status, code, message, headers)``, or None if it is valid."""
    if environ.get("REQUEST_METHOD") != "GET":
        return 405, "method_not_allowed", "a WebSocket handshake must use GET", [("Allow", "GET")]
    if request_version != "HTTP/1.1":
        return 400, "bad_http_version", "a WebSocket handshake needs HTTP/1.1, got %s" % request_version, []
    if "upgrade" not in [t.lower() for t in header_tokens(environ.get("HTTP_CONNECTION"))]:
        return 400, "bad_handshake", "the Connection header must include Upgrade", []
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    if version != SUPPORTED_VERSION:
        return (426, "unsupported_websocket_version",
                "Sec-WebSocket-Version must be 13, got %r" % version[:20],
                [("Sec-WebSocket-Version", SUPPORTED_VERSION)])
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key:
        return 400, "bad_handshake", "Sec-WebSocket-Key is missing", []
    try:
        decoded = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return 400, "bad_handshake", "Sec-WebSocket-Key is not base64", []
    if len(decoded) != 16:
        return 400, "bad_handshake", "Sec-WebSocket-Key must encode 16 bytes", []
    return None


class RelayHandler(WebSocketHandler):
    """A pywsgi handler for wsrelay: plain HTTP goes to the WSGI app, WebSocket upgrades to ``app.accept_websocket``.

    ``accept_websocket(handler)`` must end by calling :meth:`refuse` or :meth:`switch_protocols`; after the latter
    it owns ``handler.socket`` (see :meth:`take_over`) until it returns.
    """

    def MessageClass(self, fp, *args):
        return parse_request_headers(fp)

    def run_application(self):
        accept = getattr(self.application, "accept_websocket", None)
        if accept is None or not is_upgrade_request(self.environ):
            self.environ["wsrelay.handler"] = self  # for stream_response() and abandon_response()
            timeout = self.socket.gettimeout()
            try:
                return super(WebSocketHandler, self).run_application()  # pywsgi's plain WSGI path
            finally:
                self.socket.settimeout(timeout)  # a stream's write timeout ends with its response
        problem = check_handshake(self.environ, self.request_version)
        if problem is not None:
            status, code, message, headers = problem
            refuse = getattr(self.application, "refuse", None)  # the app's, which also logs the refusal
            if callable(refuse):
                return refuse(self, status, code, message, headers)
            return self.refuse(status, code, message, headers)
        accept(self)

    def refuse(self, status, code, message, headers=()):
        """Answer the upgrade request with an HTTP error and a JSON body; the connection then closes."""
        body = error_body(status, code, message)
        self.close_connection = True
        self.start_response(status_line(status), [("Content-Type", "application/json"),
                                                  ("Content-Length", str(len(body))),
                                                  ("Connection", "close")] + list(headers))
        self.write(body)

    def switch_protocols(self, headers=(), subprotocol=None):
        """Send the 101.  Returns False if the client is already gone.

        ``headers`` values are wire text (latin-1 strings); one that cannot be sent raises ValueError before
        anything is written, so the caller can still refuse the request.
        """
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Accept: " + accept_key(self.environ["HTTP_SEC_WEBSOCKET_KEY"].strip())]
        if subprotocol:
            lines.append("Sec-WebSocket-Protocol: " + subprotocol)
        lines.extend("%s: %s" % (name, value) for name, value in headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")  # UnicodeEncodeError is a ValueError
        if b"\n" in head[:-4].replace(b"\r\n", b""):
            raise ValueError("a response header contains a line break")
        self.status = "101 Switching Protocols"
        self.headers_sent = True
        self.close_connection = True
        self.response_length = 0
        try:
            self.socket.sendall(head)
        except OSError:
            return False
        return True

    def stream_response(self, write_timeout):
        """The response about to be written is a stream: its pieces go out as they come (no Nagle delay), and
        a client that takes nothing for ``write_timeout`` seconds makes the write fail (socket.timeout)."""
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a test's socket pair)
        self.socket.settimeout(write_timeout)

    def abandon_response(self):
        """The response cannot be finished (the client is gone, or the upstream broke off mid-body): pywsgi
        writes nothing more (no last chunk — an incomplete body tells the client it was cut) and closes."""
        self.close_connection = True
        self.response_use_chunked = False

    def take_over(self):
        """The raw socket and the bytes pywsgi read past the request headers (a client may not wait for the 101)."""
        sock = self.socket
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go out as they are relayed
        except OSError:
            pass  # not TCP (a test's socket pair)
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        # pywsgi's reader and its 8 KiB buffer would otherwise live as long as the session (and keep the
        # socket's descriptor open past the session's close); pywsgi reads nothing more after a 101.
        rfile, self.rfile = self.rfile, io.BytesIO()
        self.__dict__.pop("headers", None)  # the parsed request headers (pywsgi's class default is empty)
        try:
            initial = rfile.read1(1 << 20) or b""
        except (OSError, ValueError):
            initial = b""
        finally:
            sock.settimeout(timeout)
            rfile.close()
        return sock, initial

    # -- the request head, under the handshake deadline (wsrelay.handshake) --------------------------------------

    _head_timer = None  # the deadline of the head being read
    _pending = None  # the HandshakeGuard this connection is counted in while its head is awaited
    _request_line_read = False
    _served = 0  # requests begun on this connection

    def handle_one_request(self):
        """One request.  When the application has a ``handshake_guard`` (:class:`wsrelay.handshake.HandshakeGuard`),
        the head must arrive within its deadline, and a first request past its cap is refused unread."""
        guard = getattr(self.server.application, "handshake_guard", None)
        if guard is None:
            return self._one_request()
        served = self._served  # requests answered before this one on the connection
        self._served += 1
        if not served and guard.full:
            return self._last_answer(guard.refusal(self._client()))
        timer = gevent.Timeout(guard.timeout)  # a hub timer that interrupts this greenlet's read
        timer.start()
        self._head_timer, self._pending, self._request_line_read = timer, guard, False
        guard.pending += 1
        try:
            if not served and self._tls_pending():
                error = self._negotiate_tls()
                if error is not None:
                    guard.tls_failed(self._client(), error)
                    return self._last_answer(None)
            return self._one_request()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            return self._last_answer(guard.timed_out(self._client(), self._request_line_read, served))
        finally:
            self._head_done()

    def read_requestline(self):
        line = super().read_requestline()
        self._request_line_read = bool(line)
        return line

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self._head_done()  # the head is in (or unparsable): the deadline ends before the dial and the app

    def _head_done(self):
        if self._head_timer is not None:
            self._head_timer.close()
            self._head_timer = None
        if self._pending is not None:
            self._pending.pending -= 1
            self._pending = None

    def _tls_pending(self):
        # A TLS listener leaves the handshake to the handler (see RelayListener), so it runs under the deadline.
        return hasattr(self.socket, "do_handshake") and self.socket.version() is None

    def _negotiate_tls(self):
        """The TLS handshake; returns None, or what went wrong."""
        try:
            self.socket.do_handshake()
        except OSError as exc:
            return str(exc) or exc.__class__.__name__
        return None

    def _last_answer(self, response):
        """Send ``response`` (bytes, or None for nothing) without blocking, and end the connection.  Nothing
        can be sent before a TLS handshake (answering would mean reading the client)."""
        self.close_connection = True
        sock = self.socket
        if response is not None and not self._tls_pending():
            timeout = sock.gettimeout()
            try:
                sock.settimeout(0.0)
                sock.send(response)  # a few hundred bytes into an idle connection: taken whole
            except (OSError, ValueError):
                pass  # gone, or not reading: it is being closed anyway
            finally:
                sock.settimeout(timeout)
        return None

    def _client(self):
        address = self.client_address
        return "%s:%s" % address[:2] if isinstance(address, tuple) else str(address)

    def _one_request(self):
        result = super().handle_one_request()
        if isinstance(result, tuple) and result[0] == "414":
            log = getattr(self.server, "client_error_log", None)
            if log is not None:
                log(self, 414, "request line too long")
            return error_response(414, "request_line_too_long", "the request line is too long")
        return result

    def _handle_client_error(self, ex):
        """A request pywsgi could not parse: a status with a JSON body (pywsgi sends none) and one log line
        (pywsgi prints a traceback for some of them)."""
        text = str(ex)
        if isinstance(ex, http.client.HTTPException) or "Line too long" in text:
            status, code, message = 431, "headers_too_large", "the request headers are too large or too many"
        else:
            status, code, message = 400, "bad_request", "the request could not be parsed as HTTP/1.1"
        log = getattr(self.server, "client_error_log", None)
        if log is not None:
            log(self, status, text)
        self.close_connection = True
        return error_response(status, code, message)

    def log_request(self):
        log = getattr(self.server, "request_log", None)
        if log is not None:
            log(self)

