"""Medians, ratios, the table, and a description of the machine and the code measured."""

import collections
import hashlib
import os
import platform
import subprocess
import sys

from .procs import HARD_NOFILE, ROOT
from .scenarios import METRICS, SCENARIOS, TARGETS, median, ratio

def describe_env(ctx):
    def cmd(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    commit = cmd(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    digest = hashlib.sha1()
    package = os.path.join(ROOT, "wsrelay")
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    commit = "%s src:%s" % (commit, digest.hexdigest()[:10])
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "node": cmd([ctx.node, "--version"]),
        "nginx": cmd([ctx.stack.nginx_bin, "-v"]) if ctx.stack.nginx_bin else None,
        "wsrelay_commit": commit,
        "open_file_limit": HARD_NOFILE,
        "kernel": platform.release(),
    }


def summarize(scenario, runs):
    """Per metric: each target's median over the rounds, the ratios of those medians, and (``... paired``)
    the median over rounds of the ratio within a round, which a background load that comes and goes disturbs
    less (the runs of one round are seconds apart)."""
    by_target = collections.defaultdict(list)
    by_round = collections.defaultdict(dict)
    for run in runs:
        by_target[run["target"]].append(run["metrics"])
        by_round[run["round"]][run["target"]] = run["metrics"]
    keys = []
    for run in runs:
        for k, v in run["metrics"].items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    pairs = (("WSRELAY", "DIRECT"), ("WSRELAY", "NGINX"), ("NGINX", "DIRECT"))
    summary = {}
    for k in keys:
        meds = {t: median([m.get(k) for m in by_target[t]]) for t in TARGETS if by_target.get(t)}
        entry = dict(meds)
        for a, b in pairs:
            entry["%s/%s" % (a, b)] = ratio(meds.get(a), meds.get(b))
            entry["%s/%s paired" % (a, b)] = median([
                ratio(rnd[a].get(k), rnd[b].get(k)) for rnd in by_round.values() if a in rnd and b in rnd])
        summary[k] = entry
    return summary


# The project's goals for the HTTP transport, against nginx: (scenario, metric, "<=" or ">=", bound on
# WSRELAY/NGINX, what it says).  TTFB is a latency: "at least half nginx's" is at most twice its time.
GOALS = (
    ("sse_ttfb", "ttfb_p50_us", "<=", 2.0, "time to first byte p50 at most 2x nginx's"),
    ("sse_stream", "events_per_s", ">=", 0.5, "events/s at least 0.5x nginx's"),
    ("sse_latency", "delay_p50_us", "<=", 1.5, "per-event delivery delay p50 at most 1.5x nginx's"),
)


def check_goals(results):
    """The goals the results have figures for: [{scenario, metric, goal, ratio, paired, met}]."""
    out = []
    for scenario, metric, op, bound, text in GOALS:
        entry = results["scenarios"].get(scenario, {}).get("summary", {}).get(metric)
        if not entry:
            continue
        value = entry.get("WSRELAY/NGINX")
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out.append({"scenario": scenario, "metric": metric, "goal": "WSRELAY/NGINX %s %g" % (op, bound),
                    "text": text, "ratio": value, "paired": entry.get("WSRELAY/NGINX paired"), "met": met})
    return out


def print_goals(goals, results, out=sys.stdout):
    if not goals:
        return
    print("\ngoals (WSRELAY/NGINX, medians; paired in brackets):", file=out)
    for g in goals:
        verdict = {True: "met", False: "NOT MET", None: "-"}[g["met"]]
        line = "  %-12s %-14s %6s [%s]  %-16s %-7s  %s" % (g["scenario"], g["metric"], fmt(g["ratio"]),
                                                           fmt(g["paired"]), g["goal"], verdict, g["text"])
        if g["metric"] == "delay_p50_us":
            added = results["scenarios"]["sse_latency"]["summary"].get("added_p50_us", {})
            line += " (over DIRECT: wsrelay %s us, nginx %s us)" % (fmt(added.get("WSRELAY")), fmt(added.get("NGINX")))
        print(line, file=out)


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return "{:,.0f}".format(v)
        if abs(v) >= 100:
            return "%.0f" % v
        if abs(v) >= 10:
            return "%.1f" % v
        return "%.2f" % v if abs(v) >= 0.1 or v == 0 else "%.3f" % v
    return str(v)


def print_table(results, out=sys.stdout):
    head = ("scenario", "metric", "DIRECT", "NGINX", "WSRELAY", "ws/direct", "ws/nginx", "nginx/direct")
    rows = [head]
    for scenario in SCENARIOS:
        data = results["scenarios"].get(scenario)
        if not data:
            continue
        for key, unit, _better in METRICS[scenario]:
            entry = data["summary"].get(key)
            if entry is None:
                continue
            label = key + (" [%s]" % unit if unit else "")
            rows.append((scenario, label, fmt(entry.get("DIRECT")), fmt(entry.get("NGINX")),
                         fmt(entry.get("WSRELAY")),
                         fmt(entry.get("WSRELAY/DIRECT")), fmt(entry.get("WSRELAY/NGINX")),
                         fmt(entry.get("NGINX/DIRECT"))))
        entry = data["summary"].get("background_cpu_util")
        if entry:
            rows.append((scenario, "background_cpu_util [core]", fmt(entry.get("DIRECT")), fmt(entry.get("NGINX")),
                         fmt(entry.get("WSRELAY")), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(r)), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
