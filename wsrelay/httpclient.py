"""The upstream HTTP client: kept-alive connections per upstream, streamed bodies both ways.

The only module that knows geventhttpclient's internals.  geventhttpclient parses responses with a C parser
(llhttp) on gevent sockets and pools connections cooperatively; wsrelay takes those two parts and keeps the rest
in hand: the request head and body are written here (a client's body streams through with its own length, or
chunked when it had none), TCP and TLS are opened by :mod:`wsrelay.upstream`'s dialer (its resolver cache, its
TLS context), and :meth:`UpstreamResponse.read_some` returns whatever body bytes have arrived — an event stream
is relayed as it comes, not in fixed-size blocks.

Failures become :class:`HTTPUpstreamError` with the status the client should see: 502 when the upstream cannot
be reached or answers garbage, 504 when it is too slow, 503 when every pooled connection is busy.
"""

import socket
import ssl

import gevent
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError, HTTPSocketPoolResponse

from . import upstream

BLOCK = 65536
# Never sent upstream as the client sent them: connection-level headers (RFC 9110 7.6.1), the target's Host, the
# body framing the relay sets itself, and the client's credentials (the relay sends its own).
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-authenticate", "host", "content-length", "expect"))


class HTTPUpstreamError(Exception):
    """The upstream could not answer; ``status`` and ``code`` are what the client gets."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Pool(ConnectionPool):
    """geventhttpclient's cooperative pool (a bounded LIFO of kept-alive sockets), dialing like the WebSocket
    path: the same resolver cache, TCP_NODELAY, the relay's TLS context with verification always on."""

    def __init__(self, host, port, secure, context, size, connect_timeout, read_timeout):
        super().__init__(host, port, host, port, size=size, connection_timeout=connect_timeout,
                         network_timeout=read_timeout)
        self.secure = secure
        self.context = context

    def _create_socket(self):
        sock = upstream.open_socket(self._connection_host, self._connection_port, self.connection_timeout,
                                    self.context if self.secure else None)
        sock.settimeout(self.network_timeout)
        return sock


class UpstreamHTTP:
    """Requests to one upstream base URL (``https://host/v1``), over a pool of kept-alive connections."""

    def __init__(self, base_url, connect_timeout, read_timeout, max_connections, context=None):
        parts = upstream.split_url(base_url)
        self.base_url = base_url
        self.secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.rpartition("@")[2]
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool = _Pool(self.host, self.port, self.secure, context or upstream.tls_context(), max_connections,
                          connect_timeout, read_timeout)

    def close(self):
        self.pool.close()

    def request(self, method, target, headers, body=b"", length=None):
        """Send a request for ``target`` (a path below the base URL, with its query) and read the response head.

        ``body`` is bytes, or an iterable of byte chunks of ``length`` bytes in all (None: sent chunked).
        ``headers`` are ``(name, value)`` pairs, hop-by-hop ones already left out.  A kept-alive connection
        the upstream closed meanwhile is replaced once when the body can be sent again.
        """
        replayable = isinstance(body, (bytes, bytearray))
        if replayable:
            length = len(body)
        head = self._head(method, target, headers, length)
        for attempt in (1, 2):
            sock = self._socket()
            try:
                self._send(sock, head, body, replayable, length)
            except BaseException as exc:
                self.pool.release_socket(sock)
                if attempt == 1 and replayable and isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    continue  # a kept-alive connection the upstream had closed
                raise _error(exc, "sending the request", self.read_timeout)
            try:
                # On any failure the response hands the connection back (closed) itself.
                response = HTTPSocketPoolResponse(sock, self.pool, block_size=BLOCK, method=method)
            except HTTPConnectionClosed:
                if attempt == 1 and replayable:
                    continue
                raise HTTPUpstreamError(502, "upstream_lost", "upstream closed the connection without answering")
            except HTTPParseError as exc:
                raise HTTPUpstreamError(502, "upstream_bad_response", "upstream answered with an invalid HTTP "
                                        "response: %s" % _describe(exc))
            except BaseException as exc:
                raise _error(exc, "reading the response head", self.read_timeout)
            return UpstreamResponse(response, self.read_timeout)
        raise AssertionError("unreachable")

    def _head(self, method, target, headers, length):
        lines = ["%s %s%s HTTP/1.1" % (method, self.prefix, target), "Host: " + self.host_header]
        for name, value in headers:
            if "\r" in value or "\n" in value:
                raise HTTPUpstreamError(400, "invalid_header", "header %s contains a line break" % name)
            lines.append("%s: %s" % (name, value))
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        elif length or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append("Content-Length: %d" % length)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _socket(self):
        try:
            with gevent.Timeout(self.connect_timeout):
                sock = self.pool.get_socket()
            sock.settimeout(self.read_timeout)
            return sock
        except gevent.Timeout:
            # Waiting for a free slot or for the connection itself: the pool cannot tell which.
            if self.pool._semaphore.locked():
                raise HTTPUpstreamError(503, "upstream_busy", "every upstream connection is in use; retry later")
            raise HTTPUpstreamError(504, "upstream_timeout", "upstream did not accept a connection in %gs"
                                    % self.connect_timeout)
        except BaseException as exc:
            raise _error(exc, "connecting", self.connect_timeout)

    @staticmethod
    def _send(sock, head, body, replayable, length):
        if replayable:
            sock.sendall(head + bytes(body))
            return
        sock.sendall(head)
        chunked = length is None
        for chunk in body:
            if chunk:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            sock.sendall(b"0\r\n\r\n")


class UpstreamResponse:
    """A response whose head has been read: ``status``, ``reason``, ``headers``; the body via :meth:`read_some`.

    :meth:`close` must be called once: the connection goes back to the pool when the body was read to its end,
    and is closed otherwise.
    """

    def __init__(self, response, read_timeout):
        self._r = response
        self.status = response.status_code
        self.reason = response.status_message
        self.headers = list(response.items())
        self.read_timeout = read_timeout

    def header(self, name):
        value = self._r.get(name)
        if isinstance(value, list):
            value = value[-1] if value else None
        return value

    @property
    def complete(self):
        return self._r.message_complete

    def read_some(self, timeout=None):
        """The body bytes that arrived (waiting up to ``timeout``, default the read timeout, for some); b"" at
        the end of the body.  Raises :class:`socket.timeout` when nothing came in time (the response stays
        usable: read again), :class:`HTTPUpstreamError` (502) when the upstream broke off mid-body."""
        r = self._r
        buf = r._body_buffer
        while not buf:
            if r.message_complete:
                return b""
            sock = r._sock
            if sock is None:
                raise HTTPUpstreamError(502, "upstream_lost", "upstream connection closed mid-body")
            sock.settimeout(self.read_timeout if timeout is None else timeout)
            try:
                data = sock.recv(BLOCK)
            except socket.timeout:
                raise
            except (OSError, ssl.SSLError) as exc:
                self._drop()
                raise HTTPUpstreamError(502, "upstream_lost", "upstream connection failed mid-body: %s"
                                        % _describe(exc))
            try:
                r.feed(data)  # b"": the end of a body delimited by the connection's close, or a cut one
            except HTTPParseError as exc:
                self._drop()
                if not data:
                    raise HTTPUpstreamError(502, "upstream_lost", "upstream connection closed mid-body")
                raise HTTPUpstreamError(502, "upstream_bad_response", "upstream sent an invalid body: %s"
                                        % _describe(exc))
            if not data and not r.message_complete:
                self._drop()
                raise HTTPUpstreamError(502, "upstream_lost", "upstream connection closed mid-body")
        data = bytes(buf)
        del buf[:]
        return data

    def _drop(self):
        """The connection broke: close it and give its pool slot back."""
        r = self._r
        pool, sock = r._pool, r._sock
        r._sock = r._pool = None
        if sock is None:
            return
        if pool is not None:
            pool.release_socket(sock)
        else:
            _close(sock)

    def close(self):
        r = self._r
        if r._sock is None:
            return  # the whole body was read: the connection went back to the pool then
        if r.message_complete:
            r._sock.settimeout(self.read_timeout)
            r.release()  # back to the pool, or closed when the upstream said so
        else:
            self._drop()  # an unread body: the connection cannot carry another request


def _error(exc, doing, timeout):
    if isinstance(exc, HTTPUpstreamError):
        return exc
    failure = upstream.classify_failure(exc, "upstream timed out %s (%gs)" % (doing, timeout), " " + doing)
    return HTTPUpstreamError(*failure) if failure else exc


def _describe(exc):
    return (str(exc) or exc.__class__.__name__)[:200]


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
