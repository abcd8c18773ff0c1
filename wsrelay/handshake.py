"""The client's part of the handshake, bounded: a deadline on each request head, a cap on the connections still
waiting for theirs, and a listener that backs off when ``accept()`` runs out of descriptors.

A client that connects and sends half a request head (or nothing) would otherwise hold its socket for ever, and
enough of them take every descriptor the process has.  The deadline itself runs in the handler
(:class:`wsrelay.websocket.RelayHandler`, so it works under ``wsrelay serve`` and the gunicorn worker alike);
this module keeps the count and says what the client gets.
"""

import errno
import time

from gevent.pywsgi import WSGIServer

from .timers import cancel_timer
from .websocket import error_response

# accept() errors that mean "no descriptor or memory for one more connection": retrying at once cannot work.
RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


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
        return self.app.config.server.handshake_timeout_seconds

    @property
    def full(self):
        return self.pending >= self.app.config.server.max_pending_handshakes

    def refusal(self, client):
        """Trace a connection refused at the cap; returns the 503 to send it (whole response, bytes)."""
        limit = self.app.config.server.max_pending_handshakes
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

    * ``accept()`` failing with EMFILE, ENFILE, ENOBUFS or ENOMEM pauses accepting (0.1 s, doubling to 1 s)
      instead of retrying and printing a traceback per attempt: waiting connections stay in the kernel's backlog
      until descriptors are free again.  One ``accept_failed`` trace line when a burst of failures starts, one
      ``accept_recovered`` with their count once accepting has gone a second without one.
    * TLS is not negotiated in the accepting code but by the handler, inside the handshake deadline (a client
      that opens a TCP connection to a TLS listener and says nothing would otherwise hold it for ever).
    """

    min_pause = 0.1
    max_pause = 1.0
    quiet = 1.0  # a burst is over once accepting has run this long after the last failure's pause

    _failures = 0  # in the current burst
    _burst_started = _last_failure = 0.0
    _pause = min_pause
    _quiet_timer = None

    def __init__(self, *args, **kwargs):
        if "ssl_context" in kwargs or "certfile" in kwargs:
            kwargs.setdefault("do_handshake_on_connect", False)
        super().__init__(*args, **kwargs)

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRORS:
                raise  # gevent's own handling: fatal errors close the listener, others back off
            self._accept_failed(exc)
            return None  # gevent ends this round; the pause timer restarts accepting

    def close(self):
        self._quiet_timer = cancel_timer(self._quiet_timer)
        super().close()

    def _accept_failed(self, exc):
        now = time.monotonic()
        if not self._failures:
            self._burst_started = now
            self._trace("accept_failed", error=errno.errorcode.get(exc.errno, exc.errno), message=exc.strerror,
                        pause_s=self._pause, max_pause_s=self.max_pause)
        self._failures += 1
        self._last_failure = now
        # gevent's own timer slot: stop_accepting() and close() cancel it with the rest.
        self.stop_accepting()
        self._timer = self.loop.timer(self._pause)
        self._timer.start(self._start_accepting_if_started)
        cancel_timer(self._quiet_timer)
        self._quiet_timer = self.loop.timer(self._pause + self.quiet)
        self._quiet_timer.start(self._accept_recovered)
        self._pause = min(self.max_pause, self._pause * 2)

    def _accept_recovered(self):
        # In the hub, a quiet period after the last failure: nothing here blocks.
        self._quiet_timer = cancel_timer(self._quiet_timer)
        self._trace("accept_recovered", failures=self._failures,
                    duration_s=round(self._last_failure - self._burst_started, 3))
        self._failures = 0
        self._pause = self.min_pause

    def _trace(self, stage, **fields):
        tracer = getattr(getattr(self, "application", None), "tracer", None)
        if tracer is not None:
            tracer.emit(stage, listener=_address(self), **fields)


class RelayServer(RelayListener, WSGIServer):
    """The ``wsrelay serve`` listener: gevent's WSGI server with :class:`RelayListener`'s accept and TLS."""


def _address(server):
    address = getattr(server, "address", None)
    if isinstance(address, tuple) and len(address) >= 2:
        return "%s:%s" % address[:2]
    return str(address)

