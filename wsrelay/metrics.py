"""Prometheus metrics, derived from the trace.

Every life-cycle stage is already a trace event, so the metrics listen to the tracer instead of adding code to
the relay's paths; what is live (bytes and frames of open sessions, the usage store's queue) is read at scrape
time.  Served as ``GET /metrics`` (and on ``server.metrics_listen`` when set).
"""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .accounts import STATES as ACCOUNT_STATES
from .usage import TOKEN_FIELDS

TOKEN_KINDS = tuple(name for name in TOKEN_FIELDS if name != "total_tokens")  # total is their sum
DIRECTIONS = ("client_to_upstream", "upstream_to_client")


class Metrics:
    """The relay's metrics; ``observe`` is a tracer listener, ``render`` the exposition."""

    def __init__(self, app=None, store=None):
        self.app = app
        self.store = store
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.handshakes = Counter("wsrelay_handshakes", "WebSocket handshakes by HTTP status answered (101: relayed)",
                                  ["status"], registry=registry)
        self.dial_seconds = Histogram("wsrelay_upstream_dial_seconds",
                                      "Upstream WebSocket dial time (TCP+TLS+handshake)",
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=registry)
        self.dial_failures = Counter("wsrelay_upstream_dial_failures", "Failed upstream dials by error code",
                                     ["code"], registry=registry)
        self.pings = Counter("wsrelay_downstream_pings", "Downstream keepalive Pings by outcome (ok, failed, "
                             "unsupported)", ["outcome"], registry=registry)
        self.pong_rtt = Histogram("wsrelay_downstream_pong_rtt_seconds", "Time from a keepalive Ping to its Pong",
                                  buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=registry)
        self.drains = Counter("wsrelay_drains", "Upstream drains after a client left mid-turn, by outcome "
                              "(terminal, timeout, upstream_lost)", ["outcome"], registry=registry)
        self.exits = Counter("wsrelay_session_exits", "Sessions by what ended them first", ["cause", "side"],
                             registry=registry)
        self.turns = Counter("wsrelay_turns", "Recorded turns by terminal event", ["terminal_event"],
                             registry=registry)
        self.tokens = Counter("wsrelay_usage_tokens", "Recorded tokens by model and kind", ["model", "kind"],
                              registry=registry)
        self.handshake_timeouts = Counter("wsrelay_handshake_timeouts", "Connections closed for not sending their "
                                          "request head in time, by whether a request line had arrived (then "
                                          "answered 408)", ["request_line"], registry=registry)
        self.accept_pauses = Counter("wsrelay_accept_pauses", "Bursts of accept() failures for lack of "
                                     "descriptors or memory (accepting paused), by error", ["error"],
                                     registry=registry)
        self.http_requests = Counter("wsrelay_http_requests", "HTTP transport requests by route (responses, "
                                     "passthrough) and the status answered", ["route", "status"], registry=registry)
        self.http_keepalives = Counter("wsrelay_http_keepalives", "Keepalives written into HTTP event streams, by "
                                       "kind (comment: ': keepalive'; app: the event Codex's watchdog counts)",
                                       ["kind"], registry=registry)
        self.account_dials = Counter("wsrelay_account_dials", "Upstream dials and HTTP requests by account and "
                                     "outcome (ok, rate_limited, auth_failed, server_error, unreachable, timeout, "
                                     "refused)", ["account", "outcome"], registry=registry)
        self.account_failovers = Counter("wsrelay_account_failovers", "Attempts moved on to another account, by the "
                                         "account that failed", ["account"], registry=registry)
        self.account_cooldowns = Counter("wsrelay_account_cooldowns", "Cooldowns started (a 429 or a quota error), "
                                         "by account", ["account"], registry=registry)
        self.lingering_closes = Counter("wsrelay_lingering_closes", "Lingering closes after the relay's own close, "
                                        "by side and how they ended (close, eof, reset, timeout, idle, max_bytes)",
                                        ["side", "outcome"], registry=registry)
        self.resume_turns = Counter("wsrelay_resume_turns", "Turn resume: turns held for a retry, retries that got "
                                    "one (hit), held turns that expired, and misses (miss_<reason>), by transport",
                                    ["transport", "outcome"], registry=registry)
        self._completed = {"bytes": dict.fromkeys(DIRECTIONS, 0), "frames": dict.fromkeys(DIRECTIONS, 0)}
        registry.register(_LiveCollector(self))

    def observe(self, stage, fields):
        """Tracer listener: one trace event in, the matching metric updates out."""
        handler = _HANDLERS.get(stage)
        if handler is not None:
            handler(self, fields)

    def session_finished(self, session):
        """Fold a finished session's byte and frame counts into the totals (live ones are read at scrape)."""
        for name, by_direction in session.relayed().items():
            for direction, count in by_direction.items():
                self._completed[name][direction] += count

    def render(self):
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


def _dial_ok(metrics, fields):
    metrics.handshakes.labels("101").inc()
    metrics.dial_seconds.observe(fields.get("dial_ms", 0) / 1000.0)


def _dial_failed(metrics, fields):
    metrics.dial_failures.labels(str(fields.get("code"))).inc()


def _refused(metrics, fields):
    metrics.handshakes.labels(str(fields.get("status"))).inc()


def _ping_ok(metrics, fields):
    metrics.pings.labels("ok").inc()
    metrics.pong_rtt.observe(fields.get("rtt_ms", 0) / 1000.0)


def _first_exit(metrics, fields):
    metrics.exits.labels(str(fields.get("cause")), str(fields.get("side"))).inc()


def _usage(metrics, fields):
    metrics.turns.labels(str(fields.get("terminal_event"))).inc()
    model = str(fields.get("model") or "unknown")
    for kind in TOKEN_KINDS:
        value = fields.get(kind)
        if value:
            metrics.tokens.labels(model, kind).inc(value)


def _http_request(metrics, fields):
    metrics.http_requests.labels(str(fields.get("route")), str(fields.get("status"))).inc()
    for kind, name in (("comment", "keepalives"), ("app", "app_keepalives")):
        if fields.get(name):
            metrics.http_keepalives.labels(kind).inc(fields[name])


def _account_dial(metrics, fields):
    account, outcome = str(fields.get("account")), str(fields.get("outcome"))
    metrics.account_dials.labels(account, outcome).inc()
    if fields.get("failover"):
        metrics.account_failovers.labels(account).inc()
    if outcome == "rate_limited":
        metrics.account_cooldowns.labels(account).inc()


def _resume(outcome):
    def count(metrics, fields):
        label = outcome if outcome != "miss" else "miss_%s" % fields.get("reason")
        metrics.resume_turns.labels(str(fields.get("transport")), label).inc()

    return count


_HANDLERS = {
    "dial_ok": _dial_ok,
    "dial_failed": _dial_failed,
    "handshake_refused": _refused,
    "downstream_ping_ok": _ping_ok,
    "downstream_ping_failed": lambda m, f: m.pings.labels("failed").inc(),
    "downstream_ping_unsupported": lambda m, f: m.pings.labels("unsupported").inc(),
    "drain_terminal": lambda m, f: m.drains.labels("terminal").inc(),
    "drain_timeout": lambda m, f: m.drains.labels("timeout").inc(),
    "drain_upstream_lost": lambda m, f: m.drains.labels("upstream_lost").inc(),
    "first_exit": _first_exit,
    "handshake_timeout": lambda m, f: m.handshake_timeouts.labels(str(f.get("request_line")).lower()).inc(),
    "accept_failed": lambda m, f: m.accept_pauses.labels(str(f.get("error"))).inc(),
    "usage_recorded": _usage,
    "http_request": _http_request,
    "account_dial": _account_dial,
    "account_quota_exhausted": lambda m, f: m.account_cooldowns.labels(str(f.get("account"))).inc(),
    "resume_held": _resume("held"),
    "resume_hit": _resume("hit"),
    "resume_miss": _resume("miss"),
    "resume_expired": _resume("expired"),
    "lingering_close": lambda m, f: m.lingering_closes.labels(str(f.get("side")), str(f.get("outcome"))).inc(),
}


class _LiveCollector:
    """What is read at scrape time: live sessions, bytes and frames (finished plus live), the usage store."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        metrics = self.metrics
        sessions = list(metrics.app.sessions) if metrics.app is not None else []
        yield GaugeMetricFamily("wsrelay_sessions", "Live relay sessions", value=len(sessions))
        guard = getattr(metrics.app, "handshake_guard", None)
        if guard is not None:
            yield GaugeMetricFamily("wsrelay_pending_handshakes", "Connections whose request head is awaited",
                                    value=guard.pending)
        live = {"bytes": dict.fromkeys(DIRECTIONS, 0), "frames": dict.fromkeys(DIRECTIONS, 0)}
        for session in sessions:
            for name, by_direction in session.relayed().items():
                for direction, count in by_direction.items():
                    live[name][direction] += count
        for name, doc in (("bytes", "Bytes relayed by direction"), ("frames", "Frames relayed by direction")):
            family = CounterMetricFamily("wsrelay_relayed_" + name, doc, labels=["direction"])
            for direction in DIRECTIONS:
                family.add_metric([direction], metrics._completed[name][direction] + live[name][direction])
            yield family
        pool = getattr(metrics.app, "pool", None)
        if pool is not None:
            now = time.monotonic()
            live = GaugeMetricFamily("wsrelay_account_live_sessions", "Live sessions and HTTP requests in flight, "
                                     "by upstream account", labels=["account"])
            states = GaugeMetricFamily("wsrelay_account_state", "Each upstream account's state (1 for the "
                                       "current one)", labels=["account", "state"])
            for account in pool.accounts.values():
                live.add_metric([account.name], account.live)
                current = account.state(now)
                for state in ACCOUNT_STATES:
                    states.add_metric([account.name, state], 1 if state == current else 0)
            yield live
            yield states
        limits = getattr(metrics.app, "limits", None)
        if limits is not None and limits.shared:
            yield GaugeMetricFamily("wsrelay_limits_redis_up", "1 while per-key limits and account state are "
                                    "shared through Redis; 0 while Redis is unreachable and this process counts "
                                    "alone", value=1 if limits.redis.up else 0)
            yield CounterMetricFamily("wsrelay_limits_redis_outages", "Times Redis became unreachable (each one "
                                      "traced as limits_redis_unavailable)", value=limits.redis.outages)
            yield GaugeMetricFamily("wsrelay_limits_leases", "Per-key leases this process holds (its live "
                                    "sessions and HTTP requests in flight)", value=len(limits.live))
        registry = getattr(metrics.app, "resume", None)
        if registry is not None:
            yield GaugeMetricFamily("wsrelay_resume_held_bytes", "Bytes of responses held for a retry of their turn",
                                    value=registry.total_bytes)
        store = metrics.store
        if store is not None:
            yield GaugeMetricFamily("wsrelay_usage_store_queue_depth", "Usage records not yet durable",
                                    value=store.queue_depth)
            yield CounterMetricFamily("wsrelay_usage_store_failures", "Failed usage database batch writes",
                                      value=store.failures)
