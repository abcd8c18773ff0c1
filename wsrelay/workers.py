"""``wsrelay serve --workers N``: N relay processes on one listening socket, kept by gunicorn's arbiter.

The ``serve`` process becomes gunicorn's arbiter, running wsrelay's gunicorn worker class
(:mod:`wsrelay.gunicorn`): it opens the listeners, forks the workers, replaces one that dies and passes signals
on.  It never patches for gevent nor imports the relay's I/O modules: each worker patches itself (gunicorn's
gevent worker does), then builds its own :class:`~wsrelay.server.RelayApp`, usage store and tracer (its trace
lines carry ``worker=<pid>``) from the configuration the arbiter read and checked.

What wsrelay adds to gunicorn's arbiter:

* the relay's settings as gunicorn's: the bind (and ``server.metrics_listen``, served the ops routes only by
  every worker), TLS, the backlog, a graceful timeout covering the relay's grace, drains and usage flush;
* systemd's notify protocol, from the arbiter alone (``NotifyAccess=main``): ``READY=1`` once every worker
  listens, ``WATCHDOG=1`` and ``STATUS=`` from the arbiter's loop, ``STOPPING=1`` at a stop signal;
* a reload that an invalid file cannot break (``config_reload_failed``, nothing restarted);
* one ``/metrics`` over all workers: prometheus-client's multiprocess mode in a directory made here before the
  first fork and removed at exit; a dead worker's live gauges are dropped, its counts stay.

Signals (to the arbiter): TERM: every worker stops accepting and ends its sessions the relay's way (live turns
get ``server.shutdown_grace_seconds``, then clients get 1001 and their turns are drained and billed), flushes its
usage store, exits; INT/QUIT: the same without the grace; HUP: re-read the configuration, start new workers with
it, stop the old ones as on TERM.  TTIN/TTOU add or remove a worker (gunicorn's).
"""

import math
import os
import shutil
import ssl
import tempfile
import time

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from . import systemd
from .gunicorn import Worker  # here, not at the first fork: it needs packaging and gevent>=24.10
from .config import ConfigError

# (wsrelay.metrics.MULTIPROCESS_DIR: importing prometheus_client here, before it is set, would turn it off)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

STORE_FLUSH_SECONDS = 5.0  # a worker's usage store flush, after its sessions have ended
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def graceful_timeout(config):
    """Seconds a worker may take to stop before the arbiter kills it: what :func:`wsrelay.server.end_sessions`
    may take (the grace, then dials, drains and closing handshakes), then the usage store's flush."""
    ws = config.gateway.openai_ws
    drain = max(ws.upstream_drain_timeout_seconds, config.gateway.openai_http.upstream_drain_timeout_seconds)
    settle = config.upstream.connect_timeout_seconds + drain + 2 * ws.close_timeout_seconds + 1
    return config.server.shutdown_grace_seconds + settle + STORE_FLUSH_SECONDS


def tls_problem(config):
    """Why ``server.tls_cert``/``server.tls_key`` cannot be loaded, or None: checked before the first fork, since
    a worker failing on it after booting would be replaced, and fail again, for ever."""
    if not config.server.tls_cert:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.server.tls_cert,
                                                                             config.server.tls_key)
    except (ssl.SSLError, OSError) as exc:
        return "cannot load server.tls_cert and server.tls_key: %s" % exc
    return None


def _address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _metrics_port(config):
    listen = config.server.metrics_listen
    return int(listen.rpartition(":")[2]) if listen else None


def gunicorn_settings(config):
    """gunicorn's settings for a relay configuration."""
    server = config.server
    binds = [_address(server.host, server.port)]
    if server.metrics_listen:
        binds.append(server.metrics_listen)
    settings = {
        "bind": binds,
        "workers": server.workers,
        "worker_class": Worker,
        # The relay's own limits refuse with a status; gunicorn's pool would only stop accepting.
        "worker_connections": server.max_connections + server.max_pending_handshakes,
        "backlog": server.backlog,
        "graceful_timeout": math.ceil(graceful_timeout(config)),
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",  # the trace says what happens; gunicorn's own lines are warnings and errors
        "proc_name": "wsrelay",
        "preload_app": False,  # each worker starts its usage store, after gevent's patching
        "control_socket_disable": True,
        "pre_fork": _pre_fork,
        "child_exit": _child_exit,
    }
    if server.tls_cert:
        settings.update(certfile=server.tls_cert, keyfile=server.tls_key)
    return settings


def _pre_fork(arbiter, worker):
    worker.wsrelay_spawned = _heartbeat(worker)


def _child_exit(arbiter, worker):
    arbiter.worker_exited(worker)


def _heartbeat(worker):
    """The worker's heartbeat file's time: it changes when the worker first reports, with its servers started."""
    try:
        return worker.tmp.last_update()
    except (OSError, ValueError):
        return None


class Application(BaseApplication):
    """The relay as a gunicorn application: settings from the relay's configuration, one RelayApp per worker."""

    def __init__(self, config, read_config, tracer):
        self.config = config
        self.read_config = read_config  # returns the configuration anew (HUP); raises ConfigError
        self.tracer = tracer
        super().__init__(prog="wsrelay")

    @property
    def ops_port(self):
        """The port of ``server.metrics_listen``, where workers serve the ops routes only (see the worker)."""
        return _metrics_port(self.config)

    def load_config(self):
        for name, value in gunicorn_settings(self.config).items():
            if name in self.cfg.settings:  # (control_socket_disable is new in gunicorn 25)
                self.cfg.set(name, value)

    def load(self):
        """In each worker, after gevent's patching: the worker's own app, store and tracer."""
        from .server import RelayApp
        from .store import UsageStore
        from .trace import Tracer

        config = self.config
        tracer = Tracer(path=config.trace.path, context={"worker": os.getpid()})
        store = UsageStore(config.usage.sqlite_path, config.usage_fallback_path, trace=tracer)
        return RelayApp(config, tracer, store)


class RelayArbiter(Arbiter):
    """gunicorn's arbiter, speaking systemd's notify protocol and reloading the relay's configuration."""

    def __init__(self, app, notify_env, status_interval=10.0):
        self.notify_env = notify_env
        self.status_interval = status_interval
        self.watchdog = systemd.watchdog_interval(notify_env)
        self.ready = self.stopping = False
        self._next_watchdog = self._next_status = 0.0
        super().__init__(app)

    # -- systemd ---------------------------------------------------------------------------------------------

    def _notify(self, message):
        systemd.notify(message, self.notify_env)

    def _tick(self):
        """Called from the arbiter's loop (at least once a second) and while it waits for workers to stop."""
        now = time.monotonic()
        lines = []
        if not self.ready and not self.stopping and self._all_booted():
            self.ready = True
            self._next_status = now + self.status_interval
            lines += ["READY=1", "STATUS=" + self._status()]
            config = self.app.config
            self.app.tracer.emit("server_listening", host=config.server.host, port=self._port(),
                                 workers=len(self.WORKERS), upstream=config.upstream.url,
                                 auth="keys" if config.auth.keys else "passthrough",
                                 tls=bool(config.server.tls_cert))
        elif self.ready and now >= self._next_status:
            self._next_status = now + self.status_interval
            lines.append("STATUS=" + self._status())
        if self.watchdog and self.ready and now >= self._next_watchdog:  # (as wsrelay serve: from READY on)
            self._next_watchdog = now + self.watchdog
            lines.append("WATCHDOG=1")
        if lines:
            self._notify("\n".join(lines))

    def _port(self):
        try:
            return self.LISTENERS[0].sock.getsockname()[1]
        except (IndexError, AttributeError, OSError):
            return self.app.config.server.port

    def _all_booted(self):
        workers = list(self.WORKERS.values())
        return len(workers) >= self.num_workers and all(
            _heartbeat(w) != getattr(w, "wsrelay_spawned", None) for w in workers)

    def _status(self):
        sessions = _live_sessions()
        state = "stopping" if self.stopping else "accepting"
        if sessions is None:
            return "%d workers, %s" % (len(self.WORKERS), state)
        return "%d workers, %d live sessions, %s" % (len(self.WORKERS), sessions, state)

    def manage_workers(self):
        super().manage_workers()
        self._tick()

    def reap_workers(self):
        super().reap_workers()
        self._tick()

    def wait_for_signals(self, timeout=1.0):
        # Until every worker listens, look often: READY=1 waits for it.  (A watchdog under a second, too.)
        return super().wait_for_signals(min(timeout if self.ready else 0.1, self.watchdog or timeout))

    # -- signals ---------------------------------------------------------------------------------------------

    def _stop_signal(self, name):
        if not self.stopping:
            self.stopping = True
            self._notify("STOPPING=1\nSTATUS=" + self._status())
            self.app.tracer.emit("server_stopping", signal=name, workers=len(self.WORKERS),
                                 grace_s=self.app.config.server.shutdown_grace_seconds if name == "TERM" else 0)

    def handle_term(self):
        self._stop_signal("TERM")
        super().handle_term()

    def handle_int(self):
        self._stop_signal("INT")
        super().handle_int()

    def handle_quit(self):
        self._stop_signal("QUIT")
        super().handle_quit()

    def handle_usr2(self):
        # gunicorn's binary upgrade re-executes its own command line; this process was started as wsrelay.
        self.app.tracer.emit("signal_ignored", signal="USR2", why="binary upgrade is not supported; use HUP")

    def reload(self):
        try:
            config = self.app.read_config()
        except ConfigError as exc:
            self.app.tracer.emit("config_reload_failed", error="; ".join(exc.problems))
            return
        self.app.config = config
        super().reload()  # new workers with the new configuration; the old ones stop as on TERM
        self.app.tracer.emit("config_reloaded", workers=len(self.WORKERS),
                             auth="keys" if config.auth.keys else "passthrough")

    def worker_exited(self, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
        self.app.tracer.emit("worker_exited", worker=worker.pid, stopping=self.stopping)


def _live_sessions():
    """The live sessions of all workers, read from the metrics they share (None when unreadable)."""
    try:
        from prometheus_client import multiprocess

        for family in multiprocess.MultiProcessCollector(None).collect():
            if family.name == "wsrelay_sessions":
                return int(sum(sample.value for sample in family.samples))
    except Exception:  # the status line is informative only
        return None
    return 0


def serve(config, read_config, tracer):
    """Run the arbiter until it stops; returns the exit status."""
    notify_env = {name: os.environ.pop(name) for name in NOTIFY_ENV if name in os.environ}  # the arbiter's own
    metrics_dir = tempfile.mkdtemp(prefix="wsrelay-metrics-")
    os.environ[MULTIPROCESS_DIR] = metrics_dir  # before any worker imports prometheus_client
    arbiter_pid = os.getpid()
    try:
        app = Application(config, read_config, tracer)
        if config.server.metrics_listen:
            tracer.emit("metrics_listening", listen=config.server.metrics_listen, workers=config.server.workers)
        RelayArbiter(app, notify_env).run()
        status = 0
    except SystemExit as exc:
        if os.getpid() != arbiter_pid:
            raise  # a worker (forked in there) exiting: the directory and the last line are the arbiter's
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        if os.getpid() == arbiter_pid:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        raise
    shutil.rmtree(metrics_dir, ignore_errors=True)
    tracer.emit("server_stopped", status=status)
    return status
