"""A gunicorn worker class that serves wsrelay with every behaviour of ``wsrelay serve``.

    gunicorn -k wsrelay.gunicorn.Worker -b 127.0.0.1:8080 --graceful-timeout 120 wsrelay.wsgi:application

It is gunicorn's gevent pywsgi worker with wsrelay's handler (so upgrades are refused or accepted before any
101 and the relay owns the frames; every request head has ``server.handshake_timeout_seconds``, and connections
past ``server.max_pending_handshakes`` get 503), wsrelay's listener (``accept()`` backs off when descriptors run
out; TLS is negotiated under the deadline), the usage store started in the worker and flushed when it exits, and
SIGTERM ending sessions the wsrelay way: live turns run to their end for ``server.shutdown_grace_seconds``,
then clients get 1001 and their turns are drained so they are billed.  ``--graceful-timeout`` must cover that
grace plus ``upstream_drain_timeout_seconds``, or gunicorn kills the drains.  Do not use ``--preload``.
"""

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

from .handshake import RelayListener
from .websocket import RelayHandler


class Handler(RelayHandler, PyWSGIHandler):
    """wsrelay's handshake and takeover, gunicorn's access logging and environ."""


class Server(RelayListener, PyWSGIServer):
    """gunicorn's server with wsrelay's accept backoff and TLS under the handshake deadline."""


class Worker(GeventPyWSGIWorker):
    server_class = Server
    wsgi_handler = Handler

    def run(self):
        app = self.wsgi
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
            app.tracer.emit("server_stopped", worker=self.pid)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # gunicorn: stop accepting, wait for handlers
        gevent.spawn(self._end_sessions)

    def _end_sessions(self):
        from .server import end_sessions

        app = self.wsgi
        end_sessions(app, app.config, app.tracer)
