"""The real Codex CLI as a test client: where it is, a private ``CODEX_HOME`` for one provider, one ``codex exec``.

``bin/run-tests`` installs ``@openai/codex`` at :data:`CODEX_VERSION` into a cache outside the repository and
exports its path as ``WSRELAY_CODEX``; run by hand, pytest finds it in that cache too.  Without it the tests that
need Codex fail and say to run ``bin/run-tests``.

Codex talks to nothing but the given provider: its update check, analytics and plugins are off, the working
directory and ``HOME`` are fresh temporary directories, and its environment holds only what it needs (no proxy
variables, no OpenAI credentials of the machine).  Every run has a hard timeout; with nothing listening Codex would
retry for ever.
"""

import os
import signal
import subprocess
import time

import pytest

from wsrelay.fake_upstream import delta_texts

CODEX_VERSION = "0.169.0"
ENV_KEY = "WSRELAY_TEST_KEY"
RUN_TIMEOUT = 45.0
PROMPT = "Say hi"
MISSING = ("the Codex CLI %s was not found (%s); run bin/run-tests, which installs it with npm (and nodejs/npm "
           "with apt if they are missing) and then runs the tests" % (CODEX_VERSION, "%s"))

_checked = {}


def default_path():
    """Where ``bin/run-tests`` installs Codex: ``${XDG_CACHE_HOME:-~/.cache}/wsrelay-tests/codex-VERSION``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "wsrelay-tests", "codex-" + CODEX_VERSION, "node_modules", ".bin", "codex")


def codex_binary():
    """The path of the Codex CLI (``WSRELAY_CODEX``, else the cache), checked to be :data:`CODEX_VERSION`; fails
    the test when it is missing or another version."""
    path = os.environ.get("WSRELAY_CODEX") or default_path()
    if path not in _checked:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            _checked[path] = MISSING % ("no executable at %s" % path)
        else:
            try:
                done = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, timeout=30, env=_base_env())
                version = done.stdout.strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                version = "error: %s" % exc
            expected = "codex-cli " + CODEX_VERSION
            _checked[path] = None if version == expected else MISSING % ("%s says %r, not %r"
                                                                         % (path, version, expected))
    if _checked[path]:
        pytest.fail(_checked[path], pytrace=False)
    return path


def config_toml(base_url, env_key=ENV_KEY, supports_websockets=None, stream_max_retries=0,
                request_max_retries=0, stream_idle_timeout_ms=None):
    """A ``config.toml`` whose one provider is ``base_url`` (``http://host:port/v1``).  ``supports_websockets``
    None leaves it unset (Codex's default for a custom provider: HTTP/SSE only).  The retries default to 0 so a
    failed stream fails the run instead of being hidden by a retry."""
    lines = [
        'model = "gpt-fake"',
        'model_provider = "wsrelay"',
        'approval_policy = "never"',
        "check_for_update_on_startup = false",
        "",
        "[features]",
        "plugins = false",
        "",
        "[analytics]",
        "enabled = false",
        "",
        "[model_providers.wsrelay]",
        'name = "wsrelay"',
        "base_url = %s" % _toml_string(base_url),
        'wire_api = "responses"',
        "env_key = %s" % _toml_string(env_key),
        "stream_max_retries = %d" % stream_max_retries,
        "request_max_retries = %d" % request_max_retries,
    ]
    if supports_websockets is not None:
        lines.append("supports_websockets = %s" % ("true" if supports_websockets else "false"))
    if stream_idle_timeout_ms is not None:
        lines.append("stream_idle_timeout_ms = %d" % stream_idle_timeout_ms)
    return "\n".join(lines) + "\n"


def write_codex_home(directory, base_url, **options):
    """Create ``directory`` as a ``CODEX_HOME`` with :func:`config_toml` (``options`` are its keywords)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.toml"), "w", encoding="utf-8") as fh:
        fh.write(config_toml(base_url, **options))
    return directory


class CodexRun:
    """What one ``codex exec`` did: ``rc`` (None if it was killed at the timeout), ``stdout``, ``stderr``,
    ``elapsed`` seconds."""

    def __init__(self, rc, stdout, stderr, elapsed, timed_out):
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed
        self.timed_out = timed_out

    def describe(self):
        return ("codex exec: rc=%s%s after %.1fs\n--- stdout\n%s\n--- stderr (end)\n%s"
                % (self.rc, " (killed at the timeout)" if self.timed_out else "", self.elapsed,
                   self.stdout[-2000:], self.stderr[-4000:]))

    def assert_completed(self, deltas=3):
        """The turn completed: Codex exited 0 and printed the fake upstream's text (its deltas joined)."""
        text = "".join(delta_texts(deltas)).strip()
        assert self.rc == 0 and text in self.stdout, self.describe()


def run_codex(tmp_path, base_url, key, prompt=PROMPT, timeout=RUN_TIMEOUT, **options):
    """Run ``codex exec --skip-git-repo-check --ephemeral PROMPT`` against ``base_url`` with ``key`` in the
    provider's ``env_key`` variable; ``options`` go to :func:`config_toml`.  Codex, its own children included, is
    killed at ``timeout``.  Returns a :class:`CodexRun`."""
    binary = codex_binary()
    root = tmp_path / ("codex-%d" % time.monotonic_ns())
    home, workdir, user_home = root / "codex-home", root / "work", root / "home"
    for directory in (workdir, user_home):
        directory.mkdir(parents=True)
    env_key = options.get("env_key", ENV_KEY)
    write_codex_home(str(home), base_url, **options)
    env = _base_env()
    env.update({"HOME": str(user_home), "CODEX_HOME": str(home), env_key: key})
    started = time.monotonic()
    proc = subprocess.Popen([binary, "exec", "--skip-git-repo-check", "--ephemeral", prompt], cwd=str(workdir),
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    return CodexRun(None if timed_out else proc.returncode, stdout, stderr, time.monotonic() - started, timed_out)


def _kill_group(proc):
    """Kill Codex and what it started (the npm launcher runs the native binary as its child)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _base_env():
    """The environment Codex runs in: the PATH (node, which the npm launcher needs, is on it) and a locale; no
    proxy, no credential, nothing else of the caller's."""
    return {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "NO_PROXY": "*", "no_proxy": "*"}


def _toml_string(value):
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')
