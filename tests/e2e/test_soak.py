"""A short soak of the relay: ``soak/run`` with a CI-sized load must end with a passing verdict.

200 concurrent sessions for 20 s (after a 5 s warm-up) on 127.0.0.1: turns with Pings, churn, half the clients
dropping mid-turn (FIN or RST).  The verdict (see ``soak/run``): no lost or duplicated usage record, every dropped
turn billed with ``client_disconnected``, open fds and greenlets back to the post-warm-up baseline, RSS within 10 %.
The full run (1 000 sessions, 2 minutes) is documented in ``soak/README.md`` and run by hand.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "soak", "run")
CI_ARGS = ["--sessions", "200", "--duration", "20", "--warmup", "5", "--clients", "2", "--quiet-wait", "5"]

pytestmark = pytest.mark.timeout(170)


def test_short_soak_passes(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, RUN] + CI_ARGS + ["--out", str(out)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=160)
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, "soak/run exited %d:\n%s" % (proc.returncode, output[-6000:])
    report = json.loads(out.read_text())
    assert report["pass"] is True
    records = report["records"]
    assert records["expected"] > 0 and records["missing_ids"] == 0 and records["duplicates"] == 0
    assert records["dropped_turns"] > 0 and records["dropped_without_record"] == 0
    churn = report["phases"]["churn"]["stats"]
    assert churn.get("turns_dropped_fin", 0) > 0 and churn.get("turns_dropped_rst", 0) > 0
    assert churn.get("pings", 0) > 0
