"""The client's part of the handshake, bounded: a deadline on each request head, and a cap on the connections still
waiting for theirs.

A client that connects and sends half a request head (or nothing) would otherwise hold its socket for ever, and
enough of them take every descriptor the process has.  The deadline itself runs in the handler
(:class:`wsrelay.websocket.RelayHandler`, so it works under ``wsrelay serve`` and the gunicorn worker alike);
this module keeps the count and says what the client gets.
"""

from gevent.pywsgi import WSGIServer

from .websocket import error_response


class HandshakeGuard:
    """The connections of one application whose request head the relay is waiting for (*pending*).

    A connection is pending from accept until its request head has been read, and again on a kept-alive plain
    HTTP connection from the end of each response until the next head is read; the upstream dial that follows a
    WebSocket head is not pending (``server.max_connections`` counts it).  Settings are read from the
    application's configuration each time, so a reload applies to the next connection.
    """

    def __init__(self, app):
        self.app = app
        self.pending = 0

    @property
    def timeout(self):
        return self.app.config["server.handshake_timeout_seconds"]

    @property
    def full(self):
        return self.pending >= self.app.config["server.max_pending_handshakes"]

    def refusal(self, client):
        """Trace a connection refused at the cap; returns the 503 to send it (whole response, bytes)."""
        limit = self.app.config["server.max_pending_handshakes"]
        self.app.tracer.emit("handshake_refused", status=503, code="too_many_pending_handshakes", client=client,
                             pending=self.pending)
        return error_response(503, "too_many_pending_handshakes", "the relay holds %d connections that have "
                              "not sent their request yet; retry shortly" % limit, [("Retry-After", "1")])[1]

    def timed_out(self, client, request_line, served):
        """Trace a head that missed the deadline; returns the 408 to send (bytes), or None to close silently.

        ``request_line``: whether the request line had arrived (only then is there a request to answer);
        ``served``: requests already answered on this connection.  A kept-alive connection that sends no next
        request is closed without a trace line: that is the ordinary end of an idle keep-alive connection.
        """
        if served and not request_line:
            return None
        timeout = self.timeout
        self.app.tracer.emit("handshake_timeout", client=client, request_line=request_line, served=served,
                             timeout_s=timeout)
        if not request_line:
            return None
        return error_response(408, "request_timeout", "the request head did not arrive within %gs" % timeout)[1]

    def tls_failed(self, client, error):
        """Trace a TLS handshake that failed (the connection is closed without an answer)."""
        self.app.tracer.emit("tls_handshake_failed", client=client, error=error[:200])


class RelayListener:
    """A mixin for gevent's ``StreamServer`` family (``pywsgi.WSGIServer``, gunicorn's ``PyWSGIServer``).

    TLS is not negotiated in the accepting code but by the handler, inside the handshake deadline (a client that
    opens a TCP connection to a TLS listener and says nothing would otherwise hold it for ever).
    """

    def __init__(self, *args, **kwargs):
        if "ssl_context" in kwargs or "certfile" in kwargs:
            kwargs.setdefault("do_handshake_on_connect", False)
        super().__init__(*args, **kwargs)


class RelayServer(RelayListener, WSGIServer):
    """The ``wsrelay serve`` listener: gevent's WSGI server with :class:`RelayListener`'s TLS."""

