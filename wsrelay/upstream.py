"""Dialing the upstream Responses WebSocket with websocket-client, before the client gets its 101.

This module owns every websocket-client quirk the relay meets (see DEPENDENCIES in the docs):
the global cookie jar is replaced by one that keeps nothing, ``Origin`` is suppressed, redirects are not
followed (they could carry the operator's credential to another host), the handshake is bounded as a whole,
and every failure becomes a :class:`DialError` carrying the HTTP status the client should see.
"""

import ipaddress
import socket
import ssl
import time
import urllib.parse

import gevent

from ._gevent import patch

patch()  # before websocket-client binds socket, ssl and threading

import websocket  # noqa: E402
from websocket import _handshake, _url  # noqa: E402

# Headers a client may pass on; everything else (hop-by-hop, Origin, Cookie, Host, Sec-WebSocket-*) stays here.
FORWARDED_HEADERS = frozenset(h.lower() for h in (
    "OpenAI-Beta", "originator", "User-Agent", "session-id", "thread-id", "x-client-request-id",
    "chatgpt-account-id", "OpenAI-Organization", "OpenAI-Project", "version", "accept-language"))
FORWARDED_PREFIXES = ("x-codex-",)
# Upstream response headers the client reads from the 101.
RETURNED_HEADERS = ("x-codex-turn-state", "x-models-etag", "x-reasoning-included", "openai-model", "x-request-id")


class _NoCookieJar:
    """websocket-client keeps one module-global cookie jar and replays an upstream's ``Set-Cookie`` on later
    connections — made here for *other* users.  A multi-tenant relay must remember nothing."""

    def add(self, set_cookie):
        pass

    def set(self, set_cookie):
        pass

    def get(self, host):
        return ""


def disable_cookie_jar():
    _handshake.CookieJar = _NoCookieJar()


disable_cookie_jar()

# The most an upstream's handshake response head may take (websocket-client itself sets no bound).
MAX_RESPONSE_HEAD = 64 * 1024
_library_read_headers = _handshake.read_headers


def _read_headers(sock):
    """websocket-client reads the response head with one ``recv(1)`` call per byte (a few hundred calls, a
    quarter of the relay's CPU per handshake); the relay's own sockets serve it from their buffer instead."""
    if isinstance(sock, _HandshakeReader):
        return sock.read_head()
    return _library_read_headers(sock)


_handshake.read_headers = _read_headers


class DialError(Exception):
    """The upstream handshake failed; ``status`` is the HTTP status for the client, ``code`` an error code."""

    def __init__(self, status, code, message, retry_after=None, upstream_status=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.upstream_status = upstream_status  # the upstream's own answer; None when it could not be reached


class Upstream:
    """An open upstream WebSocket: its socket (plain or TLS) and what its handshake answered."""

    def __init__(self, sock, headers, subprotocol, dial_ms, initial=b""):
        self.sock = sock
        self.headers = headers
        self.subprotocol = subprotocol
        self.dial_ms = dial_ms
        self.initial = initial  # frames that arrived along with the 101

    def returned_headers(self):
        """The upstream response headers to repeat on the client's 101, as their wire text (latin-1 strings).

        websocket-client decodes response headers as UTF-8; re-encoding gives back the upstream's exact bytes.
        """
        out = []
        for name in RETURNED_HEADERS:
            value = self.headers.get(name)
            if value:
                out.append((name, value.encode("utf-8", "surrogateescape").decode("latin-1")))
        return out


def select_headers(environ):
    """Client request headers (from a WSGI environ) that the upstream may see, as ``[(name, value)]``."""
    out = []
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = key[5:].replace("_", "-").lower()
        if name in FORWARDED_HEADERS or name.startswith(FORWARDED_PREFIXES):
            out.append((name, value))
    return out


def _header_line(name, value):
    # WSGI hands header values over decoded as latin-1 and websocket-client encodes the request as UTF-8:
    # going back to the wire bytes first keeps a UTF-8 value byte-for-byte.
    try:
        value = value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise DialError(400, "invalid_header", "header %s is not valid UTF-8" % name)
    if "\r" in value or "\n" in value:
        raise DialError(400, "invalid_header", "header %s contains a line break" % name)
    return "%s: %s" % (name, value)


def tls_context(ca_file=None):
    """Verification always on: the system CAs, plus ``ca_file`` when given (never a silent verify-off)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def dial(url, headers, authorization=None, subprotocols=None, timeout=10.0, context=None):
    """Open the upstream WebSocket.  ``headers`` are already filtered; ``authorization`` is the full header value.

    Returns an :class:`Upstream`; raises :class:`DialError`.  Runs in the calling greenlet; the whole handshake,
    DNS and TLS included, is bounded by ``timeout``.
    """
    lines = [_header_line(n, v) for n, v in headers]
    if authorization:
        lines.append(_header_line("Authorization", authorization))
    if subprotocols:
        # Offered by hand: websocket-client lowercases the answer and rejects a 101 that picks none, which
        # RFC 6455 allows; the relay passes the upstream's exact choice (or none) on to the client.
        lines.append(_header_line("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
    started = time.monotonic()
    reader = None
    try:
        response, reader = _open(url, lines, timeout, context)
        if response.status != 101:
            # Only a redirect gets here (redirects are not followed).
            raise DialError(502, "upstream_redirect", "upstream answered the handshake with %s" % response.status)
        response_headers = response.headers or {}
        chosen = response_headers.get("sec-websocket-protocol")
        chosen = chosen.strip() if chosen else None
        if chosen and chosen not in (subprotocols or ()):
            raise DialError(502, "upstream_bad_subprotocol", "upstream chose a subprotocol the client did not offer")
    except BaseException:
        if reader is not None:
            _close(reader.sock)
        raise
    return Upstream(reader.sock, response_headers, chosen, (time.monotonic() - started) * 1000.0,
                    initial=reader.rest())


def _open(url, lines, timeout, context):
    """``(websocket-client's handshake response, _HandshakeReader)``; failures become DialError.

    The library's handshake function speaks the HTTP upgrade over the relay's socket (request, response,
    ``Sec-WebSocket-Accept`` check) without a ``WebSocket`` object around it: the relay never uses one after
    the handshake, and each left a reference cycle for the garbage collector.  Redirects are returned, not
    followed (they could carry the operator's credential to another host).
    """
    reader = None
    try:
        with gevent.Timeout(timeout):
            reader = _HandshakeReader(_connect(url, timeout, context))
            hostname, port, resource, _ = _url.parse_url(url)
            response = _handshake.handshake(reader, url, hostname, port, resource, header=lines,
                                            suppress_origin=True)
        return response, reader
    except BaseException as exc:
        if reader is not None:
            _close(reader.sock)
        raise _dial_error(exc, timeout) from None


def _dial_error(exc, timeout):
    if isinstance(exc, websocket.WebSocketBadStatusException):
        return _status_error(exc.status_code, exc.resp_headers or {})
    if isinstance(exc, websocket.WebSocketTimeoutException):
        exc = socket.timeout()
    elif isinstance(exc, websocket.WebSocketException):
        exc = OSError(_describe(exc))
    failure = classify_failure(exc, "upstream did not complete the WebSocket handshake in %gs" % timeout)
    return DialError(*failure) if failure else exc


def classify_failure(exc, timeout_message, doing=""):
    """``(status, code, message)`` a client gets for an upstream that could not be reached or was too slow
    (both transports), or None when ``exc`` is no such failure (GreenletExit, a bug: let it through)."""
    if isinstance(exc, (gevent.Timeout, socket.timeout)):
        return 504, "upstream_timeout", timeout_message
    if isinstance(exc, socket.gaierror):
        return 502, "upstream_unreachable", "upstream host name did not resolve"
    if isinstance(exc, ssl.SSLError):
        return 502, "upstream_tls_error", "TLS with the upstream failed: %s" % (exc.reason or exc)
    if isinstance(exc, ConnectionRefusedError):
        return 502, "upstream_unreachable", "upstream refused the connection"
    if isinstance(exc, OSError):
        return 502, "upstream_unreachable", "upstream connection failed%s: %s" % (doing, _describe(exc))
    return None


class _Resolver:
    """Upstream addresses, looked up once per ``ttl`` instead of on every dial.

    gevent resolves names in a small thread pool; with every dial queueing there (even for an IP literal),
    dials under load waited seconds for a lookup that takes a fraction of a millisecond.  An IP literal is
    used as it is; a name is cached for ``ttl`` seconds and forgotten when a connection to it fails.
    """

    def __init__(self, ttl=60.0):
        self.ttl = ttl
        self._cache = {}

    def addresses(self, host, port):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, (host, port))]
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        found = [(family, address) for family, _, _, _, address in infos]
        self._cache[(host, port)] = (time.monotonic() + self.ttl, found)
        return found

    def forget(self, host, port):
        self._cache.pop((host, port), None)


_resolver = _Resolver()


def _open_tcp(host, port, timeout):
    error = None
    for family, address in _resolver.addresses(host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    _resolver.forget(host, port)
    raise error or OSError("no address for %s" % host)


def split_url(url):
    """``urllib.parse.urlsplit``, with a clear error for a URL that has no host."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError("no host in URL %r" % url)
    return parts


def open_socket(host, port, timeout, context=None):
    """TCP to ``host:port`` (through the resolver cache) with TCP_NODELAY, and TLS over it when ``context``
    is given (verifying ``host``)."""
    sock = _open_tcp(host, port, timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(url, timeout, context):
    """TCP (and TLS for wss://) to the upstream; websocket-client then speaks the handshake over it."""
    parts = split_url(url)
    secure = parts.scheme == "wss"
    return open_socket(parts.hostname, parts.port or (443 if secure else 80), timeout,
                       (context or tls_context()) if secure else None)


class _HandshakeReader:
    """The socket as websocket-client sees it during the handshake.

    websocket-client reads the handshake response one byte per ``recv`` call (a few hundred calls per dial);
    this reads whatever has arrived in one call and parses the head from it (:meth:`read_head`, in place of the
    library's ``read_headers``).  Bytes past the response head (frames the upstream sent right behind its 101)
    are kept for the relay (:meth:`rest`), and a body of a refusal is served to the library from the buffer.
    """

    def __init__(self, sock):
        self.sock = sock
        self._data = b""
        self._pos = 0
        self._head_bytes = 0  # response head lines handed out so far

    def recv(self, bufsize):
        if self._pos >= len(self._data):
            data = self.sock.recv(65536)
            if not data:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos:self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

    def rest(self):
        return self._data[self._pos:]

    def gettimeout(self):
        return self.sock.gettimeout()

    def read_head(self):
        """``(status, headers, status_message)`` parsed exactly as websocket-client's ``read_headers`` does."""
        status = status_message = None
        headers = {}
        while True:
            line = self._line()
            try:
                line = line.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise websocket.WebSocketException(
                    "Invalid header line, not valid UTF-8 at byte %d: %r" % (exc.start, line))
            if not line:
                return status, headers, status_message
            if not status:
                status_info = line.split(" ", 2)
                try:
                    status = int(status_info[1])
                except (IndexError, ValueError):
                    raise websocket.WebSocketException("Invalid status line: %r" % line)
                if len(status_info) > 2:
                    status_message = status_info[2]
                continue
            kv = line.split(":", 1)
            if len(kv) != 2:
                raise websocket.WebSocketException("Invalid header")
            key, value = kv[0].lower(), kv[1].strip()
            if key == "set-cookie" and headers.get("set-cookie"):
                headers[key] = headers[key] + "; " + value
            else:
                headers[key] = value

    def _line(self):
        start = self._pos
        while True:
            newline = self._data.find(b"\n", start)
            if newline >= 0:
                line = self._data[self._pos:newline + 1]
                self._pos = newline + 1
                self._head_bytes += len(line)
                return line
            if self._head_bytes + len(self._data) - self._pos > MAX_RESPONSE_HEAD:
                raise websocket.WebSocketException(
                    "upstream handshake response head is over %d bytes" % MAX_RESPONSE_HEAD)
            start = len(self._data)
            data = self.sock.recv(65536)
            if not data:
                raise websocket.WebSocketConnectionClosedException("Connection to remote host was lost.")
            self._data = self._data[self._pos:] + data
            start -= self._pos
            self._pos = 0

    def __getattr__(self, name):
        return getattr(self.sock, name)


def _status_error(status, headers):
    if status in (401, 403):
        return DialError(status, "upstream_auth_failed", "upstream refused the credential (HTTP %d)" % status,
                         upstream_status=status)
    if status == 429:
        return DialError(429, "rate_limit_exceeded", "upstream rate limit reached (HTTP 429)",
                         retry_after=headers.get("retry-after"), upstream_status=429)
    if status == 426:
        # The upstream serves Responses over HTTP only: Codex falls back to HTTP at once on a 426 (after a
        # 502 only once its retries are spent), and the relay serves that transport too.
        return DialError(426, "websocket_not_supported", "upstream does not take WebSocket connections; use "
                         "the HTTP transport (POST /v1/responses)", upstream_status=426)
    return DialError(502, "upstream_handshake_refused", "upstream refused the WebSocket handshake (HTTP %d)" % status,
                     upstream_status=status)


def _describe(exc):
    text = str(exc) or exc.__class__.__name__
    return text.split(" -+-+- ")[0][:200]


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
