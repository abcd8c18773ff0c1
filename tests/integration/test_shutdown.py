"""Stopping a real ``wsrelay serve`` process: SIGTERM lets live turns finish within the grace, then closes their
clients with 1001 and drains what is left so every turn is billed; SIGINT gives no grace.  New connections are
refused as soon as the stop begins, and the process exits 0.

The relay runs as a subprocess (its trace goes to ``trace.path``, its records to ``usage.sqlite_path``); the
upstream is an in-process fake upstream, and the records are read back with ``wsrelay usage``.
"""

import json
import signal
import socket
import subprocess
import sys
import time

import gevent
import pytest
import yaml

from tests.helpers import CREATE, HEAD_EVENTS, REPO, connect, free_port, raw_request
from wsrelay import frames
from wsrelay.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT
from wsrelay.trace import parse_line

pytestmark = pytest.mark.timeout(60)


class RelayProcess:
    def __init__(self, proc, port, config_path, trace_path, stderr_path):
        self.proc = proc
        self.stderr_path = stderr_path
        self.port = port
        self.config_path = config_path
        self.trace_path = trace_path
        self.url = "ws://127.0.0.1:%d/v1/responses" % port

    def trace(self):
        """The trace lines written so far, each as a dict of strings."""
        try:
            with open(self.trace_path, encoding="utf-8") as fh:
                return [parse_line(line.rstrip("\n")) for line in fh if line.strip()]
        except FileNotFoundError:
            return []

    def find(self, stage):
        return [line for line in self.trace() if line.get("stage") == stage]

    def stages(self):
        return [line["stage"] for line in self.trace()]

    def wait_for(self, stage, timeout=5.0):
        """Block until the relay has written a ``stage`` line (a file has no event to wait on: poll it)."""
        with gevent.Timeout(timeout, AssertionError("no %s trace line within %ss; saw %s"
                                                    % (stage, timeout, self.stages()))):
            while True:
                found = self.find(stage)
                if found:
                    return found[0]
                gevent.sleep(0.02)

    def usage(self):
        out = subprocess.run([sys.executable, "-m", "wsrelay", "usage", "--config", self.config_path,
                              "--format", "json"], cwd=REPO, capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def relay_process(tmp_path):
    """``relay_process(upstream_url, grace)`` starts ``wsrelay serve`` and returns once its port accepts."""
    started = []

    def start(upstream_url, grace):
        port = free_port()
        settings = {
            "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": grace},
            "upstream": {"url": upstream_url, "connect_timeout_seconds": 2},
            "gateway": {"openai_ws": {"passthrough_downstream_ping_interval_seconds": 0,
                                      "upstream_drain_timeout_seconds": 10, "close_timeout_seconds": 1}},
            "usage": {"sqlite_path": str(tmp_path / "usage.db")},
            "trace": {"path": str(tmp_path / "trace.log")},
        }
        config_path = str(tmp_path / "wsrelay.yaml")
        with open(config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(settings, fh)
        stderr = open(str(tmp_path / "stderr.log"), "wb")
        proc = subprocess.Popen([sys.executable, "-m", "wsrelay", "serve", "--config", config_path], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        relay = RelayProcess(proc, port, config_path, str(tmp_path / "trace.log"), str(tmp_path / "stderr.log"))
        started.append(relay)
        with gevent.Timeout(15, AssertionError("the relay never listened on %d" % port)):
            while True:
                assert proc.poll() is None, "the relay exited with %s" % proc.returncode
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except ConnectionRefusedError:
                    gevent.sleep(0.02)
        return relay

    yield start
    for relay in started:
        if relay.proc.poll() is None:
            relay.proc.kill()
        relay.proc.wait(timeout=5)


def read_until_close(client, timeout=10.0):
    """Events until the close frame: ``(event types, (code, reason), time the close arrived)``."""
    types = []
    with gevent.Timeout(timeout, AssertionError("no close frame within %ss; events %s" % (timeout, types))):
        while True:
            fin, opcode, payload = client.read_frame()
            if opcode == OP_PING:
                client.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                return types, frames.parse_close(payload), time.monotonic()
            else:
                types.append(json.loads(payload)["type"])


def read_head(client):
    with gevent.Timeout(5, AssertionError("the turn did not start")):
        for _ in range(HEAD_EVENTS):
            assert client.read_frame()[1] == OP_TEXT


def new_connection_refused(relay):
    """True if a new client is turned away: the port refuses it, or the relay answers 503."""
    try:
        sock, status, _, _ = raw_request(relay.url)
    except (ConnectionRefusedError, ConnectionResetError):
        return True  # (a reset: the connection sat in the backlog of the listener that was just closed)
    sock.close()
    return status == 503


def exit_code(relay, timeout):
    try:
        code = relay.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the relay did not exit within %ss; trace %s" % (timeout, relay.stages()))
    if code != 0:
        with open(relay.stderr_path, encoding="utf-8", errors="replace") as fh:
            print("relay stderr:\n" + fh.read())
    return code


def test_sigterm_lets_the_live_turn_finish_then_closes_its_client_with_1001_and_exits_0(fake, relay_process):
    _, url = fake(silence=1.5)
    relay = relay_process(url, grace=5)
    client = connect(relay.url)
    client.send(OP_TEXT, CREATE)
    read_head(client)
    signalled = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    relay.wait_for("server_stopping")
    assert new_connection_refused(relay)
    types, close, closed_at = read_until_close(client)
    assert types[-1] == "response.completed", types
    assert close[0] == frames.CLOSE_GOING_AWAY and close[1]
    assert closed_at - signalled >= 1.0, "the client was closed before its turn could finish"
    assert exit_code(relay, timeout=5) == 0
    assert time.monotonic() - signalled < 5
    assert relay.find("server_shutdown_forced") == []
    assert relay.wait_for("first_exit")["cause"] == "server_shutdown"
    assert relay.find("drain_start") == []
    stages = relay.stages()
    assert stages.index("usage_recorded") < stages.index("first_exit") < stages.index("server_stopped")
    [record] = relay.usage()
    assert record["terminal_event"] == "response.completed"
    assert record["client_disconnected"] is False and record["total_tokens"] == 150


def test_sigterm_with_a_turn_longer_than_the_grace_closes_the_client_then_drains_and_bills_the_turn(
        fake, relay_process):
    _, url = fake(silence=4.0)
    relay = relay_process(url, grace=0.5)
    client = connect(relay.url)
    client.send(OP_TEXT, CREATE)
    read_head(client)
    signalled = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    types, close, closed_at = read_until_close(client)
    assert types == [], "events reached the client after the grace: %s" % types
    assert close[0] == frames.CLOSE_GOING_AWAY and close[1]
    assert 0.4 <= closed_at - signalled < 2.0, closed_at - signalled
    assert exit_code(relay, timeout=10) == 0
    relay.wait_for("server_shutdown_forced")
    first = relay.wait_for("first_exit")
    assert (first["cause"], first["turn_in_flight"]) == ("server_shutdown", "true")
    relay.wait_for("drain_start")
    relay.wait_for("drain_terminal")
    [record] = relay.usage()
    assert record["terminal_event"] == "response.completed"
    assert record["client_disconnected"] is True and record["total_tokens"] == 150


def test_sigterm_closes_an_idle_session_with_1001_at_once_and_exits_0(fake, relay_process):
    _, url = fake()
    relay = relay_process(url, grace=5)
    client = connect(relay.url)
    client.send(OP_TEXT, CREATE)
    with gevent.Timeout(5):
        while b'"response.completed"' not in client.read_frame()[2]:
            pass
    relay.wait_for("usage_recorded")
    signalled = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    types, close, closed_at = read_until_close(client)
    assert types == [] and close[0] == frames.CLOSE_GOING_AWAY
    assert closed_at - signalled < 1.0, closed_at - signalled
    assert exit_code(relay, timeout=5) == 0
    assert time.monotonic() - signalled < 3
    first = relay.wait_for("first_exit")
    assert (first["cause"], first["turn_in_flight"]) == ("server_shutdown", "false")
    assert relay.find("server_shutdown_forced") == [] and relay.find("drain_start") == []
    [record] = relay.usage()
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is False


def test_sigint_closes_the_live_turns_client_at_once_and_still_drains_and_bills_the_turn(fake, relay_process):
    _, url = fake(silence=2.0)
    relay = relay_process(url, grace=5)
    client = connect(relay.url)
    client.send(OP_TEXT, CREATE)
    read_head(client)
    signalled = time.monotonic()
    relay.proc.send_signal(signal.SIGINT)
    types, close, closed_at = read_until_close(client)
    assert types == [] and close[0] == frames.CLOSE_GOING_AWAY
    assert closed_at - signalled < 1.0, closed_at - signalled
    assert exit_code(relay, timeout=10) == 0
    first = relay.wait_for("first_exit")
    assert (first["cause"], first["turn_in_flight"]) == ("server_shutdown", "true")
    relay.wait_for("drain_terminal")
    [record] = relay.usage()
    assert record["terminal_event"] == "response.completed"
    assert record["client_disconnected"] is True and record["total_tokens"] == 150
