"""Prometheus metrics, derived from the trace.

Every life-cycle stage is already a trace event, so the metrics listen to the tracer instead of adding code to
the relay's paths; what is live (bytes and frames of open sessions, the usage store's queue) is read at scrape
time.  Served as ``GET /metrics`` (and on ``server.metrics_listen`` when set).

Under ``wsrelay serve --workers`` (``$PROMETHEUS_MULTIPROC_DIR`` set before the workers start) every worker
writes its metrics to files there and any worker's ``/metrics`` sums them all (prometheus-client's multiprocess
mode).  The live values are then written by each worker every :data:`SHARE_INTERVAL` seconds and at each of its
own scrapes, as gauges summed over the live workers and counters advanced by what was relayed since.
"""

import os
import time

import gevent
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               multiprocess)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .accounts import STATES as ACCOUNT_STATES
from .usage import TOKEN_FIELDS

TOKEN_KINDS = tuple(name for name in TOKEN_FIELDS if name != "total_tokens")  # total is their sum
DIRECTIONS = ("client_to_upstream", "upstream_to_client")
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
SHARE_INTERVAL = 1.0


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
                                    "one (hit), held turns that expired, misses (miss_<reason>), cut turns that "
                                    "could not be held (skipped_<reason>) and holds ended early "
                                    "(released_<reason>), by transport", ["transport", "outcome"],
                                    registry=registry)
        self._completed = {"bytes": dict.fromkeys(DIRECTIONS, 0), "frames": dict.fromkeys(DIRECTIONS, 0)}
        self.shared = None
        if os.environ.get(MULTIPROCESS_DIR):
            self.shared = _SharedLive(self, registry)
        else:
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
        if self.shared is None:
            return CONTENT_TYPE_LATEST, generate_latest(self.registry)
        self.shared.write()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return CONTENT_TYPE_LATEST, generate_latest(registry)

    def close(self):
        """Stop writing the live values of a worker (after a last write: what it relayed last is counted)."""
        if self.shared is not None:
            self.shared.close()


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
        label = outcome if outcome not in _WITH_REASON else "%s_%s" % (outcome, fields.get("reason"))
        metrics.resume_turns.labels(str(fields.get("transport")), label).inc()

    return count


_WITH_REASON = frozenset(("miss", "skipped", "released"))

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
    "resume_skipped": _resume("skipped"),
    "resume_released": _resume("released"),
    "lingering_close": lambda m, f: m.lingering_closes.labels(str(f.get("side")), str(f.get("outcome"))).inc(),
}


def _live(metrics):
    """What is read live: sessions, pending handshakes, bytes and frames relayed (finished sessions plus live
    ones), per-account sessions and states, the usage store's queue and failures (None where there is none)."""
    app = metrics.app
    sessions = list(app.sessions) if app is not None else []
    guard = getattr(app, "handshake_guard", None)
    relayed = {name: dict(by_direction) for name, by_direction in metrics._completed.items()}
    for session in sessions:
        for name, by_direction in session.relayed().items():
            for direction, count in by_direction.items():
                relayed[name][direction] += count
    pool = getattr(app, "pool", None)
    accounts = None
    if pool is not None:
        now = time.monotonic()
        accounts = [(account.name, account.live, account.state(now)) for account in pool.accounts.values()]
    store = metrics.store
    limits = getattr(app, "limits", None)
    resume = getattr(app, "resume", None)
    return {"sessions": len(sessions), "pending": guard.pending if guard is not None else None,
            "relayed": relayed, "accounts": accounts,
            "store": (store.queue_depth, store.failures) if store is not None else None,
            "limits": ((1 if limits.redis.up else 0, limits.redis.outages, len(limits.live))
                       if limits is not None and limits.shared else None),
            "resume_bytes": resume.total_bytes if resume is not None else None,
            "resume_turns": len(resume.held) if resume is not None else None,
            "resume_copies": sum(copy.size for copy in (getattr(session, "resume", None) for session in sessions)
                                 if copy is not None and copy.turn is None)}


_DOCS = {
    "sessions": "Live relay sessions",
    "pending": "Connections whose request head is awaited",
    "bytes": "Bytes relayed by direction",
    "frames": "Frames relayed by direction",
    "account_live": "Live sessions and HTTP requests in flight, by upstream account",
    "account_state": "Each upstream account's state (1 for the current one)",
    "queue": "Usage records not yet durable",
    "failures": "Failed usage database batch writes",
    "redis_up": "1 while per-key limits and account state are shared through Redis; 0 while Redis is unreachable "
                "and this process counts alone",
    "redis_outages": "Times Redis became unreachable (each one traced as limits_redis_unavailable)",
    "leases": "Per-key leases held (live sessions and HTTP requests in flight)",
    "resume_bytes": "Bytes of responses held for a retry of their turn",
    "resume_turns": "Cut turns held for their client's retry",
    "resume_copies": "Bytes the WebSocket sessions keep of their turns in flight, in case their client is cut "
                     "(resume.max_buffer_bytes each)",
}


class _LiveCollector:
    """One process's live values, read at scrape time."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        live = _live(self.metrics)
        yield GaugeMetricFamily("wsrelay_sessions", _DOCS["sessions"], value=live["sessions"])
        if live["pending"] is not None:
            yield GaugeMetricFamily("wsrelay_pending_handshakes", _DOCS["pending"], value=live["pending"])
        for name in ("bytes", "frames"):
            family = CounterMetricFamily("wsrelay_relayed_" + name, _DOCS[name], labels=["direction"])
            for direction in DIRECTIONS:
                family.add_metric([direction], live["relayed"][name][direction])
            yield family
        if live["accounts"] is not None:
            sessions = GaugeMetricFamily("wsrelay_account_live_sessions", _DOCS["account_live"], labels=["account"])
            states = GaugeMetricFamily("wsrelay_account_state", _DOCS["account_state"], labels=["account", "state"])
            for name, count, current in live["accounts"]:
                sessions.add_metric([name], count)
                for state in ACCOUNT_STATES:
                    states.add_metric([name, state], 1 if state == current else 0)
            yield sessions
            yield states
        if live["store"] is not None:
            depth, failures = live["store"]
            yield GaugeMetricFamily("wsrelay_usage_store_queue_depth", _DOCS["queue"], value=depth)
            yield CounterMetricFamily("wsrelay_usage_store_failures", _DOCS["failures"], value=failures)
        if live["limits"] is not None:
            up, outages, leases = live["limits"]
            yield GaugeMetricFamily("wsrelay_limits_redis_up", _DOCS["redis_up"], value=up)
            yield CounterMetricFamily("wsrelay_limits_redis_outages", _DOCS["redis_outages"], value=outages)
            yield GaugeMetricFamily("wsrelay_limits_leases", _DOCS["leases"], value=leases)
        if live["resume_bytes"] is not None:
            yield GaugeMetricFamily("wsrelay_resume_held_bytes", _DOCS["resume_bytes"], value=live["resume_bytes"])
            yield GaugeMetricFamily("wsrelay_resume_held_turns", _DOCS["resume_turns"], value=live["resume_turns"])
        yield GaugeMetricFamily("wsrelay_resume_copy_bytes", _DOCS["resume_copies"], value=live["resume_copies"])


class _SharedLive:
    """One worker's live values written for all workers' scrapes: gauges summed over the live workers (a dead
    worker's are dropped when the arbiter marks it dead), counters advanced by the difference since the last
    write (a dead worker's counts stay in the totals).  An account's state is per worker (each has its own
    pool), so it keeps a ``pid`` label."""

    def __init__(self, metrics, registry):
        self.metrics = metrics

        def gauge(name, doc, labels=(), mode="livesum"):
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

        self.sessions = gauge("wsrelay_sessions", _DOCS["sessions"])
        self.pending = gauge("wsrelay_pending_handshakes", _DOCS["pending"])
        self.relayed = {name: Counter("wsrelay_relayed_" + name, _DOCS[name], ["direction"], registry=registry)
                        for name in ("bytes", "frames")}
        self.account_live = gauge("wsrelay_account_live_sessions", _DOCS["account_live"], ["account"])
        self.account_state = gauge("wsrelay_account_state", _DOCS["account_state"], ["account", "state"],
                                   "liveall")
        self.queue = gauge("wsrelay_usage_store_queue_depth", _DOCS["queue"])
        self.failures = Counter("wsrelay_usage_store_failures", _DOCS["failures"], registry=registry)
        self.redis_up = gauge("wsrelay_limits_redis_up", _DOCS["redis_up"], mode="livemin")
        self.redis_outages = Counter("wsrelay_limits_redis_outages", _DOCS["redis_outages"], registry=registry)
        self.leases = gauge("wsrelay_limits_leases", _DOCS["leases"])
        self.resume_bytes = gauge("wsrelay_resume_held_bytes", _DOCS["resume_bytes"])
        self.resume_held = gauge("wsrelay_resume_held_turns", _DOCS["resume_turns"])
        self.resume_copies = gauge("wsrelay_resume_copy_bytes", _DOCS["resume_copies"])
        self._written = {"bytes": dict.fromkeys(DIRECTIONS, 0), "frames": dict.fromkeys(DIRECTIONS, 0),
                         "failures": 0, "outages": 0}
        self._greenlet = gevent.spawn(self._run)

    def _run(self):
        while True:
            self.write()
            gevent.sleep(SHARE_INTERVAL)

    def write(self):
        live = _live(self.metrics)
        self.sessions.set(live["sessions"])
        if live["pending"] is not None:
            self.pending.set(live["pending"])
        for name, counter in self.relayed.items():
            for direction in DIRECTIONS:
                total = live["relayed"][name][direction]
                if total > self._written[name][direction]:
                    counter.labels(direction).inc(total - self._written[name][direction])
                    self._written[name][direction] = total
        for name, count, current in live["accounts"] or ():
            self.account_live.labels(name).set(count)
            for state in ACCOUNT_STATES:
                self.account_state.labels(name, state).set(1 if state == current else 0)
        if live["store"] is not None:
            depth, failures = live["store"]
            self.queue.set(depth)
            if failures > self._written["failures"]:
                self.failures.inc(failures - self._written["failures"])
                self._written["failures"] = failures
        if live["limits"] is not None:
            up, outages, leases = live["limits"]
            self.redis_up.set(up)
            self.leases.set(leases)
            if outages > self._written["outages"]:
                self.redis_outages.inc(outages - self._written["outages"])
                self._written["outages"] = outages
        if live["resume_bytes"] is not None:
            self.resume_bytes.set(live["resume_bytes"])
            self.resume_held.set(live["resume_turns"])
        self.resume_copies.set(live["resume_copies"])

    def close(self):
        self._greenlet.kill()
        self.write()
