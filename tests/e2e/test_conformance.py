"""RFC 6455 conformance through the relay: Autobahn|Testsuite's quick case set, directly against a `websockets` echo
and through wsrelay in front of the same echo, must never come out worse through the relay.

``conformance/run quick`` does the work (it sets up Autobahn's Python 2.7 virtualenv itself on a fresh clone); this
test runs it as a subprocess and shows its side-by-side summary when it fails.  A missing Python 2.7.18 is a
failure, not a skip: these machines have it under pyenv, and a conformance check that silently stops running is
worse than none.
"""

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "conformance", "run")
RUN_TIMEOUT = 840  # seconds: a first run builds the Autobahn virtualenv (about a minute), the cases take about one
EXIT_PYTHON2_MISSING = 3


def _tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_relay_is_never_worse_than_direct_on_autobahn_quick_cases(tmp_path):
    outdir = tmp_path / "reports"
    env = dict(os.environ)
    env.setdefault("CONFORMANCE_PYTHON3", sys.executable)  # this interpreter has `websockets` (the test extras)
    # Its own session: on a timeout the whole group (script, echo, relay, wstest) is signalled, and the script's
    # trap still stops what it started.
    proc = subprocess.Popen([RUN, "quick", "--outdir", str(outdir)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail("conformance/run quick did not finish within %ds\n%s"
                    % (RUN_TIMEOUT, _tail(output.decode("utf-8", "replace"))))
    output = output.decode("utf-8", "replace")

    if proc.returncode == EXIT_PYTHON2_MISSING:
        pytest.fail("Autobahn|Testsuite needs Python 2.7.18 (pyenv), which is missing on this machine:\n%s"
                    % _tail(output, 10))
    summary_file = outdir / "summary.txt"
    summary = summary_file.read_text() if summary_file.exists() else "(no summary was written)"
    if proc.returncode != 0:
        print(summary)
    assert proc.returncode == 0, (
        "conformance/run quick exited %d: wsrelay did worse than the direct echo, or the run itself failed.\n\n"
        "%s\n--- conformance/run output (last lines) ---\n%s" % (proc.returncode, summary, _tail(output)))
    assert "RESULT: wsrelay is never worse than direct" in summary, summary
