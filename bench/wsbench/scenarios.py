"""The scenarios: each runs once against one target and returns ``{metric: value}``."""

import collections
import json
import os
import statistics
import time

from .procs import HERE, BenchError, Proc, http_get_json, log, machine_busy

TARGETS = ("DIRECT", "NGINX", "WSRELAY")
SSE_SCENARIOS = ("sse_ttfb", "sse_stream", "sse_latency")
SCENARIOS = ("scaling", "latency", "small", "large", "connections", "keepalive", "fanout", "overhead") + SSE_SCENARIOS
GROUPS = {"sse": SSE_SCENARIOS}

# -- load generator ---------------------------------------------------------------------------------------------


class Clients:
    """``procs`` load-generator processes sharing ``conns`` sessions to ``port``."""

    def __init__(self, ctx, port, procs, conns, **spec):
        self.procs = []
        base = dict(spec, port=port)
        per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        for i, n in enumerate(per):
            s = dict(base, conns=n)
            if "concurrency" in s:
                s["concurrency"] = max(1, s["concurrency"] // procs)
            self.procs.append(Proc("loadgen", [ctx.node, os.path.join(HERE, "loadgen.js"), json.dumps(s)],
                                   ctx.tmp))

    def expect_all(self, event, timeout):
        return [p.expect(event, timeout) for p in self.procs]

    def send_all(self, line):
        for p in self.procs:
            p.send(line)

    def cpu_seconds(self):
        return sum(p.cpu_seconds() or 0.0 for p in self.procs)

    def close(self, timeout=30.0):
        self.send_all("close")
        for p in self.procs:
            try:
                p.expect("closed", timeout)
            except BenchError as exc:
                log("warning: %s" % exc)
            p.stop(timeout=3.0)


# -- statistics -------------------------------------------------------------------------------------------------


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- scenarios --------------------------------------------------------------------------------------------------
# Each returns {metric: value} for one run against one target.  METRICS says how to show them.

METRICS = {
    "scaling": [("msgs_per_s_1proc", "msg/s", True), ("msgs_per_s_split2", "msg/s", True),
                ("split2_over_1proc", "", None), ("client_cpu_util_1proc", "core", None),
                ("client_capacity_msgs_per_s", "msg/s", None), ("target_cpu_util_1proc", "core", None),
                ("machine_cpu_util_1proc", "core", None), ("msgs_per_s_double2", "msg/s", True),
                ("double2_over_1proc", "", None), ("machine_cpu_util_double2", "core", None)],
    "latency": [("p50_us", "us", False), ("p99_us", "us", False), ("mean_us", "us", False),
                ("target_cpu_us_per_msg", "us", False)],
    "small": [("msgs_per_s", "msg/s", True), ("target_cpu_us_per_msg", "us", False),
              ("target_cpu_util", "core", None), ("client_cpu_util", "core", None),
              ("client_capacity_msgs_per_s", "msg/s", None),
              ("upstream_cpu_util", "core", None), ("machine_cpu_util", "core", None)],
    "large": [("MB_per_s", "MB/s", True), ("target_cpu_util", "core", None), ("client_cpu_util", "core", None),
              ("upstream_cpu_util", "core", None), ("machine_cpu_util", "core", None)],
    "connections": [("handshakes_per_s", "hs/s", True), ("handshake_p50_ms", "ms", False),
                    ("handshake_p99_ms", "ms", False), ("rss_per_session_KiB", "KiB", False),
                    ("target_cpu_ms_per_handshake", "ms", False), ("failed", "", False)] + [
                    (key + "_%d" % n, unit, better) for n in (5000, 9000)
                    for key, unit, better in (("sessions", "", None), ("handshakes_per_s", "hs/s", True),
                                              ("rss_per_session_KiB", "KiB", False), ("failed", "", False))],
    "keepalive": [("sessions", "", None), ("pings_received", "", None), ("pongs_sent", "", None),
                  ("relay_ping_ok", "", None), ("relay_ping_failed", "", False),
                  ("lateness_p50_ms", "ms", False), ("lateness_p99_ms", "ms", False),
                  ("lateness_max_ms", "ms", False), ("alive_after", "", None),
                  ("relay_cpu_util_idle", "core", False), ("rss_per_session_KiB", "KiB", False)],
    "fanout": [("sessions", "", None), ("p50_ms", "ms", False), ("p99_ms", "ms", False), ("max_ms", "ms", False),
               ("delivered_frac", "", True)],
    "overhead": [("added_p99_ms", "ms", False), ("added_p50_ms", "ms", False),
                 ("probe_p99_ms_features", "ms", False), ("probe_p99_ms_bare", "ms", False),
                 ("probe_p50_ms_features", "ms", False), ("probe_p50_ms_bare", "ms", False),
                 ("sessions", "", None), ("turns_per_s", "turn/s", None), ("usage_recorded_per_s", "rec/s", None),
                 ("pings_per_s", "ping/s", None), ("relay_cpu_util_features", "core", None),
                 ("relay_cpu_util_bare", "core", None)],
    "sse_ttfb": [("ttfb_p50_us", "us", False), ("ttfb_p99_us", "us", False), ("ttfb_mean_us", "us", False),
                 ("requests_per_s", "req/s", True), ("target_cpu_us_per_request", "us", False),
                 ("client_connections", "", None), ("upstream_connections", "", None), ("failures", "", False)],
    "sse_stream": [("events_per_s", "ev/s", True), ("MB_per_s", "MB/s", True),
                   ("target_cpu_us_per_event", "us", False), ("target_cpu_util", "core", None),
                   ("client_cpu_util", "core", None), ("upstream_cpu_util", "core", None),
                   ("machine_cpu_util", "core", None), ("streams", "", None), ("failures", "", False)],
    "sse_latency": [("delay_p50_us", "us", False), ("delay_p99_us", "us", False),
                    ("added_p50_us", "us", False), ("added_p99_us", "us", False), ("delay_max_us", "us", False),
                    ("events", "", None), ("clock_skew_us", "us", None), ("failures", "", False)],
}


def _measure_window(ctx, clients, target_proc, warmup, duration):
    """Send "go", sample CPU over the measurement window, return (results, CPU use in cores).

    The CPU figures are, in order: the target process, the upstream, the load generators (all of them), and
    the whole machine (every process plus the kernel's softirq work, in cores out of os.cpu_count()).
    """
    clients.send_all("go")
    time.sleep(warmup)
    hook = getattr(ctx, "on_measure", None)
    if hook is not None:
        hook()                      # the profiler attaches here, after the warm-up
    t0 = time.monotonic()
    m0 = machine_busy()
    c0 = (target_proc.cpu_seconds(), ctx.stack.upstream.cpu_seconds(), clients.cpu_seconds())
    time.sleep(duration)
    c1 = (target_proc.cpu_seconds(), ctx.stack.upstream.cpu_seconds(), clients.cpu_seconds())
    m1 = machine_busy()
    wall = time.monotonic() - t0
    results = clients.expect_all("result", duration + warmup + 30)
    util = [(b - a) / wall if a is not None and b is not None else None for a, b in zip(c0, c1)]
    util.append((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * os.cpu_count())
    return results, util


def _pipeline_run(ctx, target, procs, conns, window, size, binary, warmup, duration, mode="throughput"):
    name, port, proc = target
    clients = Clients(ctx, port, procs, conns, mode=mode, window=window, size=size, binary=binary,
                      warmup=warmup, duration=duration, concurrency=200,
                      maxSeconds=int(warmup + duration + 90))
    try:
        ready = clients.expect_all("ready", 30)
        opened = sum(r["opened"] for r in ready)
        if opened < conns:
            raise BenchError("%s: only %d of %d sessions opened (%s)" % (
                name, opened, conns, next((r["failure_sample"] for r in ready if r["failure_sample"]), "")))
        results, util = _measure_window(ctx, clients, proc, warmup, duration)
    finally:
        clients.close()
    msgs = sum(r["msgs_per_s"] for r in results)
    out = {
        "msgs_per_s": msgs,
        "MB_per_s": sum(r["bytes_per_s"] for r in results) / 1e6,
        "target_cpu_util": util[0],
        "upstream_cpu_util": util[1],
        "machine_cpu_util": util[3],
        "client_cpu_util": sum(r["cpu_s"] / r["seconds"] for r in results),
        "client_procs": procs,
        "failures": sum(r["failures"] for r in results),
    }
    if util[0] is not None and msgs:
        out["target_cpu_us_per_msg"] = util[0] / msgs * 1e6
    if out["client_cpu_util"]:
        # Messages per second the load generator(s) could drive with a whole core each: far above the
        # measured rate means the load generator was not what limited it.
        out["client_capacity_msgs_per_s"] = msgs / out["client_cpu_util"] * procs
    return out, results


def sc_scaling(ctx, target, round_):
    """Is the load generator the limit?  The ``small`` load (8 connections) from one load-generator process,
    then the same 8 connections split over two processes: the same rate means one process was not what
    limited it.  Against DIRECT also twice the load from two processes (8 connections each): ~2x means the
    machine had room to spare, less with ``machine_cpu_util`` near the core count means the machine is full."""
    runs = [("1proc", 1, ctx.small_conns), ("split2", 2, ctx.small_conns)]
    if target[0] == "DIRECT":
        runs.append(("double2", 2, 2 * ctx.small_conns))
    out = {}
    for label, procs, conns in runs:
        m, _ = _pipeline_run(ctx, target, procs, conns, ctx.window, 256, False, ctx.warmup, ctx.scaling_duration)
        out["msgs_per_s_" + label] = m["msgs_per_s"]
        out["client_cpu_util_" + label] = m["client_cpu_util"]
        out["target_cpu_util_" + label] = m["target_cpu_util"]
        out["machine_cpu_util_" + label] = m["machine_cpu_util"]
    out["msgs_per_s"] = out["msgs_per_s_1proc"]
    out["split2_over_1proc"] = out["msgs_per_s_split2"] / out["msgs_per_s_1proc"]
    if "msgs_per_s_double2" in out:
        out["double2_over_1proc"] = out["msgs_per_s_double2"] / out["msgs_per_s_1proc"]
    # Messages per second one load-generator process could drive with a core to itself, at the cost measured.
    out["client_capacity_msgs_per_s"] = out["msgs_per_s_1proc"] / out["client_cpu_util_1proc"]
    return out


def sc_latency(ctx, target, round_):
    m, results = _pipeline_run(ctx, target, 1, 1, 1, 256, False, ctx.warmup, ctx.duration, mode="latency")
    r = results[0]
    m.update(p50_us=r["lat_p50_ns"] / 1e3, p99_us=r["lat_p99_ns"] / 1e3, mean_us=r["lat_mean_ns"] / 1e3,
             max_us=r["lat_max_ns"] / 1e3)
    return m


def sc_small(ctx, target, round_):
    m, _ = _pipeline_run(ctx, target, ctx.small_procs, ctx.small_conns, ctx.window, 256, False,
                         ctx.warmup, ctx.duration)
    return m


def sc_large(ctx, target, round_):
    m, _ = _pipeline_run(ctx, target, 1, 2, 2, 1 << 20, True, ctx.warmup, ctx.duration)
    return m


def sc_connections(ctx, target, round_):
    """Sessions opened 200 at a time and held idle: ``ctx.conn_sessions`` of them, then (``--full``) each size in
    ``ctx.conn_more`` on a fresh process again, reported with the size appended to the metric names."""
    out = _open_sessions(ctx, target, ctx.conn_sessions)
    for n in ctx.conn_more:
        more = _open_sessions(ctx, ctx.stack.target(target[0]), n)
        for key in ("sessions", "handshakes_per_s", "rss_per_session_KiB", "failed"):
            out["%s_%d" % (key, n)] = more[key]
    return out


def _open_sessions(ctx, target, n):
    name, port, proc = target
    ctx.stack.restart(name)                 # a fresh process: RSS before/after is then per-session memory
    name, port, proc = ctx.stack.target(name)
    ctx.baseline_fds = ctx.stack.fds()
    warm = Clients(ctx, port, 1, 20, concurrency=20, maxSeconds=60)
    warm.expect_all("ready", 30)
    warm.close()
    ctx.stack.settle(ctx.baseline_fds)
    time.sleep(0.3)
    hook = getattr(ctx, "on_measure", None)
    if hook is not None:
        hook()
    rss0, cpu0 = proc.rss_bytes(), proc.cpu_seconds()
    clients = Clients(ctx, port, 1, n, concurrency=200, maxSeconds=120)
    try:
        ready = clients.expect_all("ready", 90)[0]
        cpu1 = proc.cpu_seconds()
        time.sleep(0.5)
        rss1 = proc.rss_bytes()
    finally:
        clients.close()
    opened = ready["opened"]
    return {
        "sessions": opened,
        "failed": ready["failures"],
        "failure_sample": ready["failure_sample"],
        "handshakes_per_s": opened / ready["connect_seconds"] if ready["connect_seconds"] else None,
        "handshake_p50_ms": (ready["hs_p50_ns"] or 0) / 1e6,
        "handshake_p99_ms": (ready["hs_p99_ns"] or 0) / 1e6,
        "rss_per_session_KiB": (rss1 - rss0) / opened / 1024 if opened else None,
        "rss_before_MiB": rss0 / 2 ** 20,
        "rss_after_MiB": rss1 / 2 ** 20,
        "target_cpu_ms_per_handshake": (cpu1 - cpu0) / opened * 1e3 if opened else None,
    }


def _trace_counts(path, offset):
    counts = collections.Counter()
    rtts = []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                for stage in (b"stage=downstream_ping_ok ", b"stage=downstream_ping_failed ", b"stage=first_exit "):
                    if stage in line:
                        counts[stage.decode().split("=")[1].strip()] += 1
                        if stage == b"stage=downstream_ping_ok ":
                            i = line.find(b"rtt_ms=")
                            if i >= 0:
                                rtts.append(float(line[i + 7:].split()[0]))
    except OSError:
        pass
    return counts, rtts


def _trace_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def sc_keepalive(ctx, target, round_):
    name, port, proc = target
    n, interval, timeout, hold = ctx.ka_sessions, ctx.ka_interval, ctx.ka_timeout, ctx.ka_hold
    warm = Clients(ctx, port, 1, 20, concurrency=20, maxSeconds=60)
    warm.expect_all("ready", 30)
    warm.close()
    ctx.stack.settle(ctx.baseline_fds)
    time.sleep(0.3)
    offset = _trace_size(ctx.stack.trace_path)
    rss0 = proc.rss_bytes()
    clients = Clients(ctx, port, 2, n, concurrency=200, prime=True, maxSeconds=int(hold + 180))
    try:
        ready = clients.expect_all("ready", 120)
        primed = sum(r.get("primed", 0) for r in ready)
        rss1 = proc.rss_bytes()
        t_primed = max(r["t_ready_ns"] for r in ready)
        c0, t0 = proc.cpu_seconds(), time.monotonic()
        # Hold from the last session's first echo: every session then sees (hold // interval) Pings.
        time.sleep(max(0.0, hold - (time.monotonic_ns() - t_primed) / 1e9))
        c1 = proc.cpu_seconds()
        idle_util = (c1 - c0) / (time.monotonic() - t0)
        clients.send_all("report")
        reports = clients.expect_all("report", 60)
        clients.send_all("check")
        checked = clients.expect_all("checked", 60)
    finally:
        clients.close(60)
    gaps = [g for r in reports for g in r["ping_gaps_ns"]]
    lateness = [(g / 1e9 - interval) * 1e3 for g in gaps]
    time.sleep(0.2)
    counts, rtts = _trace_counts(ctx.stack.trace_path, offset)
    return {
        "sessions": primed,
        "ping_interval_s": interval,
        "ping_timeout_s": timeout,
        "hold_s": hold,
        "pings_received": sum(r["pings"] for r in reports),
        "pongs_sent": sum(r["pongs"] for r in reports),
        "expected_pings": primed * int(hold // interval),
        "relay_ping_ok": counts["downstream_ping_ok"],
        "relay_ping_failed": counts["downstream_ping_failed"],
        "relay_ping_rtt_p99_ms": percentile(rtts, 0.99),
        "lateness_p50_ms": percentile(lateness, 0.5),
        "lateness_p99_ms": percentile(lateness, 0.99),
        "lateness_max_ms": max(lateness) if lateness else None,
        "alive_after": sum(c["ok"] for c in checked),
        "relay_cpu_util_idle": idle_util,
        "rss_per_session_KiB": (rss1 - rss0) / primed / 1024 if primed and rss0 and rss1 else None,
    }


def sc_fanout(ctx, target, round_):
    name, port, proc = target
    n = ctx.fan_sessions
    group = "fan-%s-%d-%d" % (name.lower(), round_, time.monotonic_ns() % 1000000)
    clients = Clients(ctx, port, 2, n, concurrency=200, prime=True, record=True, group=group, maxSeconds=240)
    sends = []
    try:
        ready = clients.expect_all("ready", 150)
        primed = sum(r.get("primed", 0) for r in ready)
        time.sleep(0.3)
        for _ in range(ctx.fan_broadcasts):
            sends.append(http_get_json(ctx.stack.ctrl_port, "/broadcast?group=%s&bytes=200" % group))
            time.sleep(ctx.fan_spacing)
        clients.send_all("report")
        reports = clients.expect_all("report", 60)
    finally:
        clients.close(60)
    latencies = []
    per_broadcast_max = []
    delivered = 0
    for k, sent in enumerate(sends):
        worst = 0.0
        for r in reports:
            for arrivals in r["arrivals"]:
                if len(arrivals) > k:
                    ms = (arrivals[k] - sent["t0_ns"]) / 1e6
                    latencies.append(ms)
                    worst = max(worst, ms)
                    delivered += 1
        per_broadcast_max.append(worst)
    expected = primed * len(sends)
    return {
        "sessions": primed,
        "upstream_sent": sum(s["sent"] for s in sends),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else None,
        "last_delivery_median_ms": median(per_broadcast_max),
        "delivered_frac": delivered / expected if expected else None,
        "upstream_send_ms": median([(s["t1_ns"] - s["t0_ns"]) / 1e6 for s in sends]),
    }


def _count_stages(path, offset, stages):
    counts = collections.Counter()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                for stage in stages:
                    if b"stage=" + stage + b" " in line:
                        counts[stage.decode()] += 1
    except OSError:
        pass
    return counts


def _overhead_phase(ctx, features):
    """One phase of ``overhead``: a fresh relay (keepalive on or off), ``ctx.ov_sessions`` sessions each
    starting a turn every ``ctx.ov_turn_every`` seconds, and a latency probe on a session of its own."""
    if features:
        ctx.stack.restart_wsrelay(ctx.ov_interval, ctx.ov_timeout)
    else:
        ctx.stack.restart_wsrelay(0, ctx.ov_timeout)
    name, port, proc = ctx.stack.target("WSRELAY")
    offset = _trace_size(ctx.stack.trace_path)
    warmup, duration = ctx.ov_warmup, ctx.duration
    load = Clients(ctx, port, 1, ctx.ov_sessions, mode="turns", turn="create" if features else "noop",
                   turnEvery=ctx.ov_turn_every, warmup=warmup, duration=duration, concurrency=200,
                   maxSeconds=int(warmup + duration + 120))
    probe = None
    try:
        ready = load.expect_all("ready", 90)[0]
        if ready["opened"] < ctx.ov_sessions:
            raise BenchError("overhead: only %d of %d sessions opened (%s)" % (
                ready["opened"], ctx.ov_sessions, ready["failure_sample"]))
        probe = Clients(ctx, port, 1, 1, mode="latency", window=1, size=256, warmup=warmup, duration=duration,
                        maxSeconds=int(warmup + duration + 60))
        probe.expect_all("ready", 30)
        load.send_all("go")
        probe.send_all("go")
        time.sleep(warmup)
        c0, t0 = proc.cpu_seconds(), time.monotonic()
        time.sleep(duration)
        util = (proc.cpu_seconds() - c0) / (time.monotonic() - t0)
        turns = load.expect_all("result", duration + 60)[0]
        lat = probe.expect_all("result", duration + 60)[0]
    finally:
        if probe is not None:
            probe.close()
        load.close(60)
    time.sleep(0.3)  # the relay's last trace lines
    counts = _count_stages(ctx.stack.trace_path, offset, (b"usage_recorded", b"downstream_ping_ok"))
    return {"p50_ms": lat["lat_p50_ns"] / 1e6, "p99_ms": lat["lat_p99_ns"] / 1e6, "cpu": util,
            "turns_per_s": turns["turns_sent"] / turns["seconds"], "pings_per_s": turns["pings"] / turns["seconds"],
            "usage_recorded": counts["usage_recorded"], "failures": turns["failures"] + lat["failures"],
            "wall": warmup + duration}


def sc_overhead(ctx, target, round_):
    """What usage recording and keepalive Pings add to a frame's trip through the relay under load: the same
    traffic with both (turns are response.create, billed; Pings every ov_interval) and without (same-size
    requests nobody bills, keepalive off); the phases alternate in order from round to round."""
    order = (False, True) if round_ % 2 == 0 else (True, False)
    phases = {features: _overhead_phase(ctx, features) for features in order}
    on, off = phases[True], phases[False]
    return {
        "sessions": ctx.ov_sessions,
        "added_p99_ms": on["p99_ms"] - off["p99_ms"],
        "added_p50_ms": on["p50_ms"] - off["p50_ms"],
        "probe_p99_ms_features": on["p99_ms"], "probe_p99_ms_bare": off["p99_ms"],
        "probe_p50_ms_features": on["p50_ms"], "probe_p50_ms_bare": off["p50_ms"],
        "turns_per_s": on["turns_per_s"],
        # The trace holds the records of the whole phase, warm-up included: divided by warm-up + duration.
        "usage_recorded_per_s": on["usage_recorded"] / on["wall"],
        "pings_per_s": on["pings_per_s"],
        "pings_per_s_bare": off["pings_per_s"],
        "relay_cpu_util_features": on["cpu"], "relay_cpu_util_bare": off["cpu"],
        "failures": on["failures"] + off["failures"],
    }


# -- the Responses HTTP transport (Server-Sent Events) ----------------------------------------------------------
# Every target gets the same requests on its HTTP port (nginx: its HTTP server block; wsrelay: its one port).


def _sse_run(ctx, target, mode, conns=1, **spec):
    """One load-generator process in an ``sse_*`` mode against ``target``: (metrics common to all, its result)."""
    name, _port, proc = target
    port = ctx.stack.http_port(name)
    before = _upstream_http_connections(ctx)
    warmup, duration = ctx.warmup, ctx.duration
    clients = Clients(ctx, port, 1, conns, mode=mode, warmup=warmup, duration=duration,
                      maxSeconds=int(warmup + duration + 90), **spec)
    try:
        clients.expect_all("ready", 30)
        results, util = _measure_window(ctx, clients, proc, warmup, duration)
    finally:
        clients.close()
    r = results[0]
    if r["failures"]:
        log("%s %s: %d failed requests (%s)" % (mode, name, r["failures"], r["failure_sample"]))
    after = _upstream_http_connections(ctx)
    out = {
        "failures": r["failures"],
        "requests": r["requests"],
        "client_connections": r["sockets_opened"],
        "upstream_connections": after - before if before is not None and after is not None else None,
        "target_cpu_util": util[0],
        "upstream_cpu_util": util[1],
        "machine_cpu_util": util[3],
        "client_cpu_util": r["cpu_s"] / r["seconds"] if r["seconds"] else None,
        "clock_skew_us": (r["wall_minus_mono_ms"] - ctx.stack.upstream_clock) * 1e3
        if getattr(ctx.stack, "upstream_clock", None) is not None else None,
    }
    return out, r


def _upstream_http_connections(ctx):
    try:
        return http_get_json(ctx.stack.ctrl_port, "/stats")["http_connections"]
    except (OSError, ValueError, KeyError):
        return None


def sc_sse_ttfb(ctx, target, round_):
    """Short streamed turns (created, one delta, completed, written at once by the upstream), one after another
    on kept-alive connections: time from the request written to the first event bytes received."""
    m, r = _sse_run(ctx, target, "sse_ttfb", conns=ctx.sse_ttfb_conns, events=ctx.sse_ttfb_events,
                    bytes=ctx.sse_event_bytes)
    if r["measured"]:
        m.update(ttfb_p50_us=r["ttfb_p50_ns"] / 1e3, ttfb_p99_us=r["ttfb_p99_ns"] / 1e3,
                 ttfb_mean_us=r["ttfb_mean_ns"] / 1e3, ttfb_max_us=r["ttfb_max_ns"] / 1e3,
                 total_p50_us=r["total_p50_ns"] / 1e3, requests_per_s=r["requests_per_s"],
                 measured=r["measured"])
        if m["target_cpu_util"] is not None:
            m["target_cpu_us_per_request"] = m["target_cpu_util"] / r["requests_per_s"] * 1e6
    return m


def sc_sse_stream(ctx, target, round_):
    """Long streams (``ctx.sse_stream_events`` deltas of ``ctx.sse_event_bytes``), one after another, written by the
    upstream as fast as they are read: events/s and MB/s from the request written to the stream's end."""
    m, r = _sse_run(ctx, target, "sse_stream", events=ctx.sse_stream_events, bytes=ctx.sse_event_bytes)
    if r["measured"]:
        m.update(events_per_s=r["events_per_s"], MB_per_s=r["bytes_per_s"] / 1e6, streams=r["measured"],
                 stream_ttfb_p50_us=r["ttfb_p50_ns"] / 1e3, events_per_stream=r["events"] / r["measured"])
        if m["target_cpu_util"] is not None:
            m["target_cpu_us_per_event"] = m["target_cpu_util"] / r["events_per_s"] * 1e6
    return m


def sc_sse_latency(ctx, target, round_):
    """One stream whose deltas the upstream writes ``ctx.sse_interval_ms`` apart, each stamped with its wall clock:
    delivery delay per event.  ``added_*`` is the delay minus DIRECT's in the same round (the client's and the
    upstream's own share taken out): what the proxy in between adds."""
    m, r = _sse_run(ctx, target, "sse_latency", interval=ctx.sse_interval_ms, bytes=ctx.sse_event_bytes)
    if not r["measured"]:
        return m
    m.update(delay_p50_us=r["delay_p50_ms"] * 1e3, delay_p99_us=r["delay_p99_ms"] * 1e3,
             delay_mean_us=r["delay_mean_ms"] * 1e3, delay_max_us=r["delay_max_ms"] * 1e3,
             delay_min_us=r["delay_min_ms"] * 1e3, events=r["measured"], events_expected=r["expected"])
    floors = ctx.__dict__.setdefault("sse_direct_delay", {})
    if target[0] == "DIRECT":
        floors[round_] = (m["delay_p50_us"], m["delay_p99_us"])
    floor = floors.get(round_)
    if floor is not None:
        m.update(added_p50_us=m["delay_p50_us"] - floor[0], added_p99_us=m["delay_p99_us"] - floor[1])
    return m


RUNNERS = {"scaling": sc_scaling, "latency": sc_latency, "small": sc_small, "large": sc_large,
           "connections": sc_connections, "keepalive": sc_keepalive, "fanout": sc_fanout, "overhead": sc_overhead,
           "sse_ttfb": sc_sse_ttfb, "sse_stream": sc_sse_stream, "sse_latency": sc_sse_latency}
