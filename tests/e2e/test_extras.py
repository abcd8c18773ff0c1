"""Every way to install wsrelay serves a turn from a clean venv: ``pip install .`` and ``pip install '.[EXTRA]'``
for each extra in setup.cfg's ``[options.extras_require]`` except ``test``.

Each case creates a fresh venv (``python -m venv``: no system site-packages, no test dependencies), installs a
copy of the repository with that extra only, and then, with the venv's own executables and from a directory
outside the repository (so nothing is imported from the checkout), runs a real session on 127.0.0.1: the venv's
``wsrelay fake-upstream``, the relay the install is for (the redis extra's with its per-key lease in a private
redis-server), one client turn through the venv's websocket-client, the relay stopped with SIGTERM, and the
turn's record read back with the venv's ``wsrelay usage --format json`` (for an install with several relays,
each in turn). With the ``postgres`` extra the record goes to a private PostgreSQL server
(``usage.database_url``) and is read back from there.

A dependency that an install needs but does not declare fails here, not on a user's machine: the suite itself
runs in a venv with the test extras, which pull in more than any install declares (pytest brings ``packaging``).
"""

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.timeout(300)

NOT_AN_INSTALL = {"test"}  # the suite's own dependencies: no relay runs on them alone
BASE = ""  # the install without an extra: ``pip install .``

# What a user's client does: one response.create, read to the terminal event.  Run by the venv's python, so
# websocket-client (a core dependency) must come with the install.
CLIENT = """\
import json, sys
import websocket

ws = websocket.create_connection(sys.argv[1], timeout=15)
ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": []}))
while True:
    event = json.loads(ws.recv())
    if event.get("type") in ("response.completed", "response.failed", "error"):
        break
ws.close()
print(json.dumps(event))
"""

# Run by the venv's python before the session: the install is the venv's own and carries no test dependency.
PROBE = """\
import importlib.util, json, wsrelay
print(json.dumps({"wsrelay": wsrelay.__file__,
                  "test_dependencies": [m for m in ("pytest", "websockets") if importlib.util.find_spec(m)]}))
"""

# Left out of the copy that is installed: what a checkout accumulates, never part of the package.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".venv-*", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.so", ".pytest_cache", "*.db", "*.db-journal", "*.pending.jsonl")


def declared_extras():
    """The extras setup.cfg declares, except the test one: each is an install this module checks."""
    parser = configparser.ConfigParser(interpolation=None)
    with open(os.path.join(REPO, "setup.cfg"), encoding="utf-8") as f:
        parser.read_file(f)
    return sorted(set(parser["options.extras_require"]) - NOT_AN_INSTALL)


def serve_relay(venv, config, port):
    """The base install's relay: ``wsrelay serve``."""
    return [executable(venv, "wsrelay"), "serve", "--config", config, "--port", str(port)], {}


def gunicorn_relay(venv, config, port):
    """The gunicorn extra's relay: gunicorn with wsrelay's worker class, configured through ``$WSRELAY_CONFIG``."""
    return ([executable(venv, "gunicorn"), "-k", "wsrelay.gunicorn.Worker", "-w", "1",
             "-b", "127.0.0.1:%d" % port, "--graceful-timeout", "10", "wsrelay.wsgi:application"],
            {"WSRELAY_CONFIG": config})


def redis_relay(venv, config, port):
    """The redis extra's relay: ``wsrelay serve`` with ``limits.redis_url`` (see :data:`SETTINGS`)."""
    return serve_relay(venv, config, port)


def workers_relay(venv, config, port):
    """The gunicorn extra's other relay: ``wsrelay serve --workers 2`` (gunicorn's arbiter, wsrelay's settings)."""
    return [executable(venv, "wsrelay"), "serve", "--config", config, "--port", str(port), "--workers", "2"], {}


# How to run the relays of each install, one after the other: ``(venv, config, port) -> (argv, extra
# environment)``.  A new extra in setup.cfg fails its case until it is given one here.
RELAYS = {BASE: [serve_relay], "gunicorn": [gunicorn_relay, workers_relay], "redis": [redis_relay],
          "postgres": [serve_relay]}


def redis_settings(request):
    """A private redis-server for the relay's leases (the suite's fixture); the check, after the turn, that the
    relay took its lease there and gave it back."""
    server = request.getfixturevalue("redis_server")
    url = request.getfixturevalue("redis_url")

    def stats():
        client = server.client()
        try:
            return client.info("commandstats")
        finally:
            client.close()

    def check(relay):
        acquired = stats().get("cmdstat_evalsha", {})
        assert acquired.get("calls", 0) > acquired.get("failed_calls", 0), (stats(), relay.output())
        # Given back when the session's handler ends, a moment after the client's close.
        relay.wait_until(lambda: stats().get("cmdstat_zrem", {}).get("calls", 0) >= 1, "the lease's release",
                         timeout=10)

    return {"limits": {"redis_url": url, "redis_timeout_seconds": 2}}, check


# Settings an install's relay needs besides the common ones, and what to check once its turn is done:
# ``request -> (settings, check(relay_process))``.
SETTINGS = {"redis": redis_settings}


def usage_settings(extra, request, tmp_path):
    """The ``usage`` section of each install's configuration: SQLite, or for the postgres extra a database of its
    own on the private PostgreSQL server (then also returned, to be read back directly)."""
    settings = {"sqlite_path": str(tmp_path / "usage.db"), "fallback_path": str(tmp_path / "pending.jsonl")}
    if extra != "postgres":
        return settings, None
    postgres = request.getfixturevalue("postgres")
    settings["database_url"] = postgres[1]
    return settings, postgres


def executable(venv, name):
    return os.path.join(venv, "bin", name)


def venv_environment(venv):
    """The environment of the clean venv's processes: nothing that would point Python at another install."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "WSRELAY_")) and k != "VIRTUAL_ENV"}
    env["VIRTUAL_ENV"] = venv
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
    return env


def run(argv, cwd, env, timeout, what):
    """Run ``argv`` to its end within ``timeout`` seconds; its output, or a failure that shows it."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("%s did not finish within %ss:\n%s%s" % (what, timeout, exc.stdout or "", exc.stderr or ""))
    if proc.returncode != 0:
        pytest.fail("%s exited %d:\n%s%s" % (what, proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:]))
    return proc.stdout


class Process:
    """A long-running process of the session; its output goes to ``log`` (read back on failure)."""

    def __init__(self, argv, cwd, env, log):
        self.log = log
        with open(log, "wb") as out:
            # In a session of its own, so that a kill takes gunicorn's worker with its arbiter.
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def wait_until(self, ready, what, timeout=30.0):
        """Until ``ready()`` is true; fails if the process exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail("%s exited %s before it was ready:\n%s" % (what, self.proc.returncode, self.output()))
            if ready():
                return
            time.sleep(0.1)
        pytest.fail("%s was not ready within %ss:\n%s" % (what, timeout, self.output()))

    def stop(self, timeout=20.0):
        """SIGTERM, then the exit status; killed (and None) if it is still running after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            return None


@pytest.fixture
def processes():
    """Starts :class:`Process` es; every one still running is stopped at teardown."""
    started = []

    def start(*args):
        process = Process(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(timeout=5)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the repository to install from: pip builds a local directory in place, and a build left in
    the checkout (``build/lib``) would be installed again by the next build, stale modules included."""
    copy = tmp_path_factory.mktemp("source") / "wsrelay"
    shutil.copytree(REPO, copy, ignore=NOT_SOURCE)
    return str(copy)


# Straight to 127.0.0.1, whatever proxy the environment names (pip may need it; these requests must not take it).
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers(port, path):
    try:
        with DIRECT.open("http://127.0.0.1:%d%s" % (port, path), timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def accepts(port):
    try:
        with DIRECT.open("http://127.0.0.1:%d/" % port, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # the fake upstream answers plain HTTP with 426: it is listening
    except OSError:
        return False


def serve_a_turn(relay, processes, venv, work, env, upstream_port, tmp_path, extra, request):
    """Run ``relay`` from the venv, a client's turn through it, a SIGTERM; then read the turn's record back."""
    python = executable(venv, "python")
    relay_port = free_port()  # now that the upstream holds its port, never the same one
    tmp_path.mkdir()

    config = tmp_path / "wsrelay.yaml"
    settings, check = SETTINGS[extra](request) if extra in SETTINGS else ({}, None)
    usage_section, postgres = usage_settings(extra, request, tmp_path)
    config.write_text(json.dumps(dict({  # JSON is YAML
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2},  # the port is each relay's flag
        "upstream": {"url": "ws://127.0.0.1:%d/v1/responses" % upstream_port},
        "usage": usage_section,
    }, **settings)))
    argv, relay_env = relay(venv, str(config), relay_port)
    relay_process = processes(argv, str(work), dict(env, **relay_env), str(tmp_path / "relay.log"))
    relay_process.wait_until(lambda: answers(relay_port, "/healthz"), os.path.basename(argv[0]))

    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    completed = json.loads(run([python, str(client), "ws://127.0.0.1:%d/v1/responses" % relay_port],
                               str(work), env, 60, "the client's turn"))
    assert completed["type"] == "response.completed", completed
    if check is not None:
        check(relay_process)

    status = relay_process.stop()
    assert status == 0, "the relay exited %s on SIGTERM:\n%s" % (status, relay_process.output())
    records = json.loads(run([executable(venv, "wsrelay"), "usage", "--config", str(config), "--format", "json"],
                             str(work), env, 30, "wsrelay usage"))
    assert [(r["response_id"], r["terminal_event"], r["client_disconnected"]) for r in records] == \
        [(completed["response"]["id"], "response.completed", False)], records
    usage = completed["response"]["usage"]
    assert (records[0]["input_tokens"], records[0]["output_tokens"], records[0]["total_tokens"]) == \
        (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]), records
    if postgres is not None:
        server, url = postgres
        stored = server.execute(url.rsplit("/", 1)[1], "SELECT response_id FROM usage")
        assert stored == [(completed["response"]["id"],)], stored
        assert not os.path.exists(usage_section["fallback_path"]) and not os.path.exists(usage_section["sqlite_path"])


@pytest.mark.parametrize("extra", [BASE] + declared_extras(), ids=lambda extra: extra or "base")
def test_install_serves_a_turn_from_a_clean_venv(extra, source, processes, tmp_path, request):
    if extra not in RELAYS:
        pytest.fail("setup.cfg declares the extra %r but this test has no relay to run with it: add one to RELAYS"
                    % extra)
    venv = str(tmp_path / "venv")
    work = tmp_path / "work"  # the cwd of every process: outside the checkout, so its wsrelay is never imported
    work.mkdir()
    python = executable(venv, "python")
    env = venv_environment(venv)

    run([sys.executable, "-m", "venv", venv], str(work), env, 60, "python -m venv")
    requirement = source + ("[%s]" % extra if extra else "")
    run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", requirement],
        str(work), env, 240, "pip install %s" % ("'.[%s]'" % extra if extra else "."))
    probe = json.loads(run([python, "-c", PROBE], str(work), env, 30, "the venv's python"))
    assert probe["wsrelay"].startswith(venv + os.sep), probe
    assert probe["test_dependencies"] == [], probe

    upstream_port = free_port()
    upstream = processes([executable(venv, "wsrelay"), "fake-upstream", "--host", "127.0.0.1",
                          "--port", str(upstream_port)], str(work), env, str(tmp_path / "fake-upstream.log"))
    upstream.wait_until(lambda: accepts(upstream_port), "wsrelay fake-upstream")
    for relay in RELAYS[extra]:
        serve_a_turn(relay, processes, venv, work, env, upstream_port, tmp_path / relay.__name__,
                     extra, request)
    assert upstream.stop() == 0, upstream.output()
