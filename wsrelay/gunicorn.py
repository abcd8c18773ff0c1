"""A gunicorn worker class that serves wsrelay with every behaviour of ``wsrelay serve``.

    gunicorn -k wsrelay.gunicorn.Worker -b 127.0.0.1:8080 --graceful-timeout 120 wsrelay.wsgi:application

It is gunicorn's gevent pywsgi worker with wsrelay's handler (so upgrades are refused or accepted before any
101 and the relay owns the frames; every request head has ``server.handshake_timeout_seconds``, and connections
past ``server.max_pending_handshakes`` get 503), wsrelay's listener (``accept()`` backs off when descriptors run
out; TLS is negotiated under the deadline), the usage store started in the worker and flushed when it exits, and
SIGTERM ending sessions the wsrelay way: live turns run to their end for ``server.shutdown_grace_seconds``,
then clients get 1001 and their turns are drained so they are billed.  ``--graceful-timeout`` must cover that
grace plus ``upstream_drain_timeout_seconds``, or gunicorn kills the drains.  INT and QUIT stop the same way
without the grace (turns still drained and billed).  Do not use ``--preload``.
"""

import functools
import signal

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

from .handshake import RelayListener
from .websocket import RelayHandler


class Handler(RelayHandler, PyWSGIHandler):
    """wsrelay's handshake and takeover, gunicorn's access logging and environ."""


class Server(RelayListener, PyWSGIServer):
    """gunicorn's server with wsrelay's accept backoff and TLS under the handshake deadline.

    Under ``wsrelay serve --workers`` (``worker``'s application has an ``ops_port``) the listener on that port
    is ``server.metrics_listen``: it serves the ops routes only, in plain HTTP like ``wsrelay serve``'s.  With
    several workers on one socket each accepts one connection per wake-up, so a burst is shared among them.
    """

    def __init__(self, listener, worker=None, **kwargs):
        ops_port = getattr(worker.app, "ops_port", None) if worker is not None else None
        if ops_port and listener.getsockname()[1] == ops_port:
            from .server import ops_only

            kwargs["application"] = ops_only(kwargs["application"])
            kwargs.pop("ssl_context", None)
        super().__init__(listener, **kwargs)
        if worker is not None:
            worker.servers.append(self)
            if worker.cfg.workers > 1:
                self.max_accept = 1


class Worker(GeventPyWSGIWorker):
    server_class = Server
    wsgi_handler = Handler
    _ending = None  # the greenlet ending the sessions, once a stop signal came

    def init_signals(self):
        super().init_signals()
        # A HUP is the arbiter's (a closed terminal sends it to the whole group): stop gracefully, not at once.
        signal.signal(signal.SIGHUP, self.handle_exit)

    def run(self):
        app = self.wsgi
        self.servers = []
        self.server_class = functools.partial(Server, worker=self)
        app.store.start()
        app.start()  # the lease keeper and its Redis connections belong to this worker, made after the fork
        app.tracer.emit("server_listening", worker=self.pid, upstream=app.config.upstream.url,
                        auth="keys" if app.keys.enabled else "passthrough",
                        limits="redis" if app.limits.shared else "local")
        try:
            super().run()
        finally:
            app.close()
            app.store.close()
            app.metrics.close()
            app.tracer.emit("server_stopped", worker=self.pid)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # gunicorn: stop accepting, wait for handlers
        self._end_sessions(None)

    def handle_quit(self, sig, frame):
        # INT/QUIT: as TERM without the grace; gunicorn's own would exit at once, leaving turns unbilled.
        self.alive = False
        self._end_sessions(0)

    def _end_sessions(self, grace):
        app = self.wsgi
        if self._ending is None:
            self._ending = gevent.spawn(self._stop, grace)
        elif grace == 0:  # a fast stop after a graceful one (or systemd's TERM after the arbiter's): no more grace
            gevent.spawn(app.shutdown, True)

    def _stop(self, grace):
        from .server import end_sessions

        app = self.wsgi
        end_sessions(app, app.config, app.tracer, grace)
        # Then, as wsrelay serve does, the connections left (idle keep-alive, heads never sent) are closed:
        # gunicorn would wait for them up to its graceful timeout.
        for server in getattr(self, "servers", ()):
            server.stop(timeout=1)
