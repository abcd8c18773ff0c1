"""Profiling wsrelay with py-spy during an extra run of a scenario, and a summary of where its time goes."""

import collections
import json
import os
import shutil
import subprocess
import sys

from .procs import ROOT, VENV, BenchError
from .scenarios import RUNNERS



def py_spy():
    candidate = os.path.join(VENV, "bin", "py-spy")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("py-spy")


# Leaf frames of threads that wait, which py-spy does not always see as idle: gevent's thread pool (the DNS
# resolver, the usage store) blocks in a lock acquire.
IDLE_LEAVES = frozenset(("acquire_with_timeout (gevent/_threading.py)",))


def summarize_collapsed(path, top=25):
    """Self and inclusive sample shares per function from py-spy's raw (collapsed stack) output."""
    self_ = collections.Counter()
    incl = collections.Counter()
    by_file = collections.Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count)
            frames = [_frame_name(fr) for fr in stack.split(";")]
            if not frames:
                continue
            if frames[-1] in IDLE_LEAVES:
                idle += count
                continue
            total += count
            self_[frames[-1]] += count
            by_file[frames[-1].split(" ")[-1].split(":")[0].strip("()")] += count
            for fr in set(frames):
                incl[fr] += count
    pct = (lambda c: 100.0 * c / total) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "idle_thread_samples_dropped": idle,
        "self": [(name, round(pct(c), 1)) for name, c in self_.most_common(top)],
        "inclusive": [(name, round(pct(c), 1)) for name, c in incl.most_common(top)],
        "self_by_file": [(name, round(pct(c), 1)) for name, c in by_file.most_common(top)],
    }


def _strip_local_paths(path):
    """Profiles name source files by where they are installed; keep only the part that means something."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return
    prefixes = sorted({p for p in sys.path if p.startswith("/") and len(p) > 1} | {ROOT}, key=len, reverse=True)
    for prefix in prefixes:
        text = text.replace(prefix.rstrip("/") + "/", "")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


def _frame_name(frame):
    # "function (path/to/file.py:123)" -> "function (file.py)"; the line varies within one function
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] in ("wsrelay", "gevent", "websocket",
                                                                    "geventwebsocket") else parts[-1]
    return "%s (%s)" % (name, short)


def profile_run(ctx, scenario, out_dir):
    """One extra WSRELAY run of ``scenario`` with py-spy sampling the relay; its figures are not reported."""
    spy = py_spy()
    if not spy:
        raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    target = ctx.stack.target("WSRELAY")
    os.makedirs(out_dir, exist_ok=True)
    raw = os.path.join(out_dir, "wsrelay-%s.collapsed.txt" % scenario)
    svg = os.path.join(out_dir, "wsrelay-%s.svg" % scenario)
    duration = max(3, int(ctx.duration))
    spies = []

    def attach():
        # Two samplers at once: collapsed stacks (for the summary, speedscope, flamegraph.pl) and an SVG.
        # --nonblocking reads the relay's memory without stopping it.  Not --gil: time in system calls (the
        # GIL released) is the relay's time too; idle waits are dropped by py-spy or by summarize_collapsed.
        base = [spy, "record", "--pid", str(ctx.stack.wsrelay.pid), "--rate", "250", "--duration", str(duration),
                "--nonblocking"]
        for fmt_, path in (("raw", raw), ("flamegraph", svg)):
            spies.append(subprocess.Popen(base + ["--format", fmt_, "-o", path], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))

    saved = ctx.duration
    ctx.duration = duration + 1.0
    ctx.on_measure = attach
    try:
        RUNNERS[scenario](ctx, target, -1)
    finally:
        ctx.on_measure = None
        ctx.duration = saved
        for p in spies:
            try:
                p.wait(duration + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if not os.path.exists(raw):
        raise BenchError("py-spy wrote no profile (is ptrace allowed here?)")
    for path in (raw, svg):
        _strip_local_paths(path)
    summary = summarize_collapsed(raw)
    with open(os.path.join(out_dir, "wsrelay-%s.summary.json" % scenario), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
