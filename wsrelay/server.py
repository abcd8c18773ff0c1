"""The relay server: routes, authentication, the upstream dial before the 101, and one Session per client."""

import contextlib
import json
import signal
import ssl
import time
import uuid

import gevent
import gevent.event

from . import accounts, auth, httproutes, limits, quota, resume_http, resume_ws, upstream
from .accountsync import AccountSync
from .config import ConfigError
from .accounts import AccountPool
from .exchange import HTTPTransport
from .failover import Attempts, credential_header
from .httproutes import Refusal
from .handshake import HandshakeGuard, RelayServer
from .keepalive import app_keepalive_choice
from .metrics import Metrics
from .resume import ResumeRegistry
from .systemd import Notifier
from .session import Session
from .websocket import RelayHandler, error_body, header_tokens, status_line

class RelayApp:
    """The WSGI application (plain HTTP) plus ``accept_websocket`` for upgrades (see :class:`RelayHandler`)."""

    def __init__(self, config, tracer, store=None):
        self.config = config
        self.tracer = tracer
        self.store = store
        self.keys = auth.KeyRing(config.auth.keys)
        self.tls_context = upstream.tls_context(config.upstream.ca_file)
        self.pool = AccountPool(config.account_specs(), config.upstream.sticky_ttl_seconds)
        self.allowed_origins = frozenset(o.rstrip("/") for o in config.server.allowed_origins)
        self.sessions = set()
        self.limits, self.redis = limits.make(config, tracer)  # per key: local counts, or leases in Redis
        self.account_sync = self._account_sync(config)
        self.connections = 0  # sessions (and dials in progress) and HTTP requests in flight, in this process
        self.handshake_guard = HandshakeGuard(self)  # the connections whose request head is awaited
        self.accepting = True
        self.resume = ResumeRegistry(config.resume.max_total_bytes)  # the cut turns held for their retries
        self.http = HTTPTransport(self)
        self.metrics = Metrics(self, store)
        tracer.listeners.append(self.metrics.observe)

    # -- plain HTTP ----------------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            state = {"status": "ok" if self.accepting else "stopping", "sessions": len(self.sessions)}
            if environ.get("QUERY_STRING") == "detail=1":
                state.update(_process_state())  # walks the heap: for diagnostics and soak tests, not probes
            return _json(start_response, 200, state)
        if path == "/readyz":
            accounts_ready = self.pool.ready(time.monotonic())
            ready = self.accepting and accounts_ready
            state = {"ready": ready, "sessions": len(self.sessions), "accepting": self.accepting,
                     "upstream_accounts_usable": accounts_ready}
            state.update(self.limits.state())  # Redis down is not unready: the relay serves with local limits
            return _json(start_response, 200 if ready else 503, state)
        if path == "/accounts":
            if self.account_sync is not None:
                self.account_sync.pull()
            now = time.monotonic()
            return _json(start_response, 200, {"accounts": self.pool.status(now), "ready": self.pool.ready(now)})
        if path == "/metrics":
            content_type, body = self.metrics.render()
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        kind, target = httproutes.route(path)
        if kind == httproutes.RESPONSES and environ.get("REQUEST_METHOD") != "POST":
            body = error_body(426, "websocket_required", "%s takes POST (HTTP transport) or an Upgrade: websocket "
                              "request (WebSocket transport)" % path)
            start_response(status_line(426), [("Content-Type", "application/json"), ("Upgrade", "websocket"),
                                              ("Connection", "Upgrade"), ("Content-Length", str(len(body))),
                                              ("Allow", "POST")])
            return [body]
        if kind is not None:
            return self.http(environ, start_response, kind, target)
        body = error_body(404, "not_found", "no route for %s" % path[:200])
        start_response(status_line(404), [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    # -- WebSocket -----------------------------------------------------------------------------------------

    def refuse(self, handler, status, code, message, headers=()):
        self.tracer.emit("handshake_refused", status=status, code=code, path=handler.environ.get("PATH_INFO"),
                         client=_client(handler))
        handler.refuse(status, code, message, headers)

    def accept_websocket(self, handler):
        environ = handler.environ
        path = environ.get("PATH_INFO", "")
        if path not in httproutes.RESPONSES_PATHS:
            return self.refuse(handler, 404, "not_found", "no WebSocket route for %s" % path[:200])
        if not self.accepting:
            return self.refuse(handler, 503, "shutting_down", "the relay is shutting down", [("Retry-After", "5")])
        origin = environ.get("HTTP_ORIGIN")
        if origin and self.allowed_origins and origin.rstrip("/") not in self.allowed_origins:
            return self.refuse(handler, 403, "origin_not_allowed", "origin %s is not allowed" % origin[:200])
        try:
            key_id, passthrough = self.authorize(environ)
            with self.admitted(key_id):
                self._relay(handler, environ, key_id, passthrough)
        except Refusal as refusal:
            self.refuse(handler, refusal.status, refusal.code, refusal.message, refusal.headers)

    def authorize(self, environ):
        """``(key_id, passthrough)`` for a client request, both transports: the key's id (None without one), and
        in passthrough mode the client's own Authorization ("" when it sent none; None when relay keys are on
        and the account's credential goes upstream).  Raises :class:`Refusal` (401) for a missing or bad key."""
        client_authorization = environ.get("HTTP_AUTHORIZATION")
        token = auth.bearer_token(client_authorization)
        if self.keys.enabled:
            if not self.keys.check(token):
                message = ("missing relay key: send Authorization: Bearer <key>" if token is None
                           else "invalid relay key")
                raise Refusal(401, "invalid_api_key", message, [("WWW-Authenticate", "Bearer")])
            passthrough = None
        else:
            passthrough = client_authorization or ""  # the client's own credential goes upstream
        return (auth.key_id(token) if token else None), passthrough

    @contextlib.contextmanager
    def admitted(self, key_id):
        """Count a WebSocket session or an HTTP request in flight against the connection limit (this process's
        sockets) and its key's limit (all instances' when shared through Redis) while the block runs.  Raises
        :class:`Refusal` (503 or 429) when either is reached."""
        if self.connections >= self.config.server.max_connections:
            raise Refusal(503, "server_busy", "the relay is at its connection limit (%d)"
                          % self.config.server.max_connections, [("Retry-After", "1")])
        self.connections += 1  # before the key's lease: taking it may wait on Redis, and others get in meanwhile
        try:
            lease, held = self.limits.acquire(key_id, self.config.gateway.openai_ws.max_ingress_connections_per_api_key)
        except BaseException:
            self.connections -= 1
            raise
        if lease is None:
            self.connections -= 1
            raise Refusal(429, "too_many_connections", "this key already holds %d concurrent sessions or requests%s"
                          % (held, " across the relay's instances" if self.limits.shared and self.redis.up else ""),
                          [("Retry-After", "1")])
        try:
            yield
        finally:
            self.connections -= 1
            self.limits.release(lease)

    def _relay(self, handler, environ, key_id, passthrough):
        headers = upstream.select_headers(environ)
        attempts = Attempts(self, key_id, accounts.identity(key_id, dict(headers)), passthrough is None,
                            "websocket")
        try:
            while True:
                account = attempts.next()
                if account is None:
                    refusal = attempts.refusal()
                    return self.refuse(handler, refusal.status, refusal.code, refusal.message, refusal.headers)
                try:
                    up = upstream.dial(account.spec.url, headers,
                                       authorization=credential_header(account, passthrough),
                                       subprotocols=header_tokens(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL")),
                                       timeout=self.config.upstream.connect_timeout_seconds,
                                       context=self.tls_context)
                except upstream.DialError as exc:
                    self.tracer.emit("dial_failed", status=exc.status, code=exc.code, error=exc.message,
                                     key_id=key_id, account=account.name)
                    if attempts.failed(account, exc.status, exc.upstream_status, exc.retry_after, exc.code):
                        continue
                    headers = [("Retry-After", exc.retry_after)] if exc.retry_after else []
                    return self.refuse(handler, exc.status, exc.code, exc.message, headers)
                break
            attempts.succeeded(account)
            switch = quota.account_switch(self.pool, account, passthrough is None,
                                          self.config.upstream.default_cooldown_seconds, self.account_sync)
            self._session(handler, environ, key_id, account, up, switch, attempts)
        finally:
            attempts.release()  # the account's live count, taken when it was chosen

    def _session(self, handler, environ, key_id, account, up, switch, attempts):
        self.tracer.emit("dial_ok", key_id=key_id, dial_ms=round(up.dial_ms, 2), client=_client(handler),
                         account=account.name)
        try:
            switched = handler.switch_protocols(up.returned_headers(), up.subprotocol)
        except ValueError as exc:
            up.sock.close()
            self.tracer.emit("dial_failed", status=502, code="upstream_bad_header", error=str(exc), key_id=key_id)
            return self.refuse(handler, 502, "upstream_bad_header", "upstream answered with a header that "
                               "cannot be passed on")
        if not switched:
            up.sock.close()
            return
        ws = self.config.gateway.openai_ws
        app_keepalive = app_keepalive_choice(ws.passthrough_downstream_app_keepalive_mode,
                                             ws.passthrough_downstream_app_keepalive_interval_seconds,
                                             environ.get("HTTP_ORIGINATOR"), environ.get("HTTP_USER_AGENT"))
        sock, initial = handler.take_over()
        session_id = uuid.uuid4().hex[:12]
        if self.config.resume.enabled:
            initial = resume_ws.lend(self, environ, key_id, account.name, sock, initial, app_keepalive, session_id,
                                     up.sock, attempts)
            if initial is None:
                return  # the retry of a held turn: that session went on with this client
        session = Session(sock, up.sock, self.config, self.tracer, self.store, key_id=key_id, initial=initial,
                          up_initial=up.initial, app_keepalive=app_keepalive, account=account.name,
                          account_switch=switch, session_id=session_id)
        session.resume = resume_ws.copy_for(self, session, environ, key_id)
        self.sessions.add(session)
        if not self.accepting:
            session.shutdown()
        try:
            session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.session_finished(session)

    def _account_sync(self, config):
        # With relay credentials only (upstream.accounts): a passthrough client's 429 is about its own key, and
        # must not cool the account down for every instance.
        if self.redis is None or not config.upstream.accounts:
            return None
        return AccountSync(self.pool, self.redis)

    def start(self):
        """Start what runs beside the sessions (the lease keeper); in the process that serves, after any fork."""
        self.limits.start()

    def close(self):
        """Give the leases back and close the Redis connections (after the sessions have ended)."""
        self.limits.close()

    def reconfigure(self, config):
        """Take a reloaded configuration: keys, limits, origins and timers apply to sessions from now on.  The
        ``limits.*`` Redis settings are read at start only."""
        self.keys = auth.KeyRing(config.auth.keys)
        self.pool.reload(config.account_specs())
        self.pool.sticky_ttl = config.upstream.sticky_ttl_seconds
        self.account_sync = self._account_sync(config)
        if config.upstream.ca_file != self.config.upstream.ca_file:
            self.tls_context = upstream.tls_context(config.upstream.ca_file)
        self.allowed_origins = frozenset(o.rstrip("/") for o in config.server.allowed_origins)
        self.resume.max_total_bytes = config.resume.max_total_bytes
        self.config = config

    def shutdown(self, force=False):
        """Stop taking sessions; end live ones at their turn's end (``force``: now, draining their turns)."""
        self.accepting = False
        resume_http.release_all(self.resume)  # no retry is let in any more: held turns are billed now
        for session in list(self.sessions):
            session.shutdown(force)
        if force:
            for live in list(self.http.live):
                live.stop()


def _json(start_response, status, payload):
    body = json.dumps(payload).encode("utf-8")
    start_response("200 OK" if status == 200 else status_line(status),
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def ops_only(app):
    """The WSGI app of the separate metrics listener: /metrics, /healthz, /readyz and /accounts only."""

    def ops(environ, start_response):
        if environ.get("PATH_INFO") in ("/metrics", "/healthz", "/readyz", "/accounts"):
            return app(environ, start_response)
        body = error_body(404, "not_found", "this listener serves /metrics, /healthz, /readyz and /accounts")
        start_response(status_line(404), [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    ops.handshake_guard = app.handshake_guard  # the deadline, and one cap for both listeners
    ops.tracer = app.tracer
    return ops


def _process_state():
    import gc
    import os

    from greenlet import greenlet

    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    return {"greenlets": sum(1 for o in gc.get_objects() if isinstance(o, greenlet)), "open_fds": fds,
            "pid": os.getpid()}


def _client(handler):
    address = handler.client_address
    return "%s:%s" % address[:2] if isinstance(address, tuple) else str(address)


def make_server(config, tracer, store=None, listener=None):
    """A ready (not yet started) server; ``listener`` overrides ``server.host``/``server.port``."""
    app = RelayApp(config, tracer, store)
    address = listener or (config.server.host, config.server.port)
    tls = {}
    if config.server.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
        tls = {"ssl_context": context}
    server = RelayServer(address, app, handler_class=RelayHandler, log=None, backlog=config.server.backlog, **tls)
    server.app = app
    app.start()
    server.client_error_log = lambda handler, status, error: tracer.emit(
        "handshake_refused", status=status, code="unparsable_request", error=error[:200], client=_client(handler))
    return server


def stop(server, config, tracer, grace=None):
    """Graceful stop: no new connections, then :func:`end_sessions`, then the listener is gone."""
    server.close()  # stop accepting; live handlers go on
    end_sessions(server.app, config, tracer, grace)
    server.stop(timeout=1)
    server.app.http.close()
    server.app.close()


def end_sessions(app, config, tracer, grace=None):
    """Live turns run to their end for up to ``grace`` (default ``server.shutdown_grace_seconds``), each client
    being closed with 1001 as its turn ends; then the rest are closed and their in-flight turns drained, so
    they are billed.  Returns once every session has ended (bounded by connect + drain + close time)."""
    grace = config.server.shutdown_grace_seconds if grace is None else grace
    tracer.emit("server_stopping", sessions=len(app.sessions), grace_s=grace)
    app.shutdown()
    _wait_until(lambda: not app.connections, grace)
    if app.connections:
        tracer.emit("server_shutdown_forced", sessions=len(app.sessions))
        app.shutdown(force=True)
    ws = config.gateway.openai_ws
    settle = (config.upstream.connect_timeout_seconds + ws.upstream_drain_timeout_seconds
              + 2 * ws.close_timeout_seconds + 1)
    # Forced sessions drain their upstreams (their turns are billed): wait for them, dials in progress included.
    if not _wait_until(lambda: not app.connections, settle):
        tracer.emit("server_stop_abandoned", sessions=len(app.sessions))


def _wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        gevent.sleep(min(0.05, left))
    return True


def serve(config, tracer, store, reload=None):
    """Run until a signal: TERM graceful stop, INT/QUIT stop without grace (turns still drained and billed),
    HUP reload (``reload()`` returns the new config; keys and limits apply to new sessions, live ones go on)."""
    server = make_server(config, tracer, store)
    server.start()
    side = None
    if config.server.metrics_listen:
        host, _, port = config.server.metrics_listen.rpartition(":")
        side = RelayServer((host.strip("[]"), int(port)), ops_only(server.app), handler_class=RelayHandler,
                           log=None)
        side.start()
        tracer.emit("metrics_listening", host=host, port=side.server_port)
    host, port = server.address[:2]
    tracer.emit("server_listening", host=host, port=port, upstream=config.upstream.url,
                auth="keys" if server.app.keys.enabled else "passthrough",
                tls=bool(config.server.tls_cert), limits="redis" if server.app.limits.shared else "local")
    app = server.app
    notifier = Notifier(lambda: "%d live sessions, %s" % (len(app.sessions), "accepting" if app.accepting
                                                           else "stopping"))
    notifier.ready()
    stop_signal = gevent.event.AsyncResult()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        gevent.signal_handler(signum, stop_signal.set, signum)
    if reload is not None:
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(_reload, app, reload, tracer))
    signum = stop_signal.get()
    notifier.stopping()
    stop(server, app.config, tracer, grace=None if signum == signal.SIGTERM else 0)
    if side is not None:
        side.stop(timeout=1)
    if store is not None:
        store.close()
    tracer.emit("server_stopped")
    return 0


def _reload(app, reload, tracer):
    try:
        config = reload()
    except ConfigError as exc:
        tracer.emit("config_reload_failed", error="; ".join(exc.problems))
        return
    app.reconfigure(config)
    tracer.emit("config_reloaded", auth="keys" if app.keys.enabled else "passthrough",
                sessions=len(app.sessions))
