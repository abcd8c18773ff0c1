"""systemd integration against real AF_UNIX datagram sockets and systemd-analyze; SIGHUP reload with a live turn."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import gevent
import pytest
from gevent import monkey

from tests.helpers import CREATE, REPO, connect, free_port, raw_request, read_until_marker
from wsrelay import systemd
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket standing in for systemd's; yields (path, receive)."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)

    def receive(timeout=5.0):
        sock.settimeout(timeout)
        return sock.recv(4096).decode()

    yield path, receive
    sock.close()
    shutil.rmtree(directory)


def test_notify_sends_one_datagram_to_the_socket(notify_socket):
    path, receive = notify_socket
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert receive() == "READY=1"


def test_notify_reaches_an_abstract_namespace_socket():
    name = "wsrelay-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert systemd.notify("STATUS=x", {"NOTIFY_SOCKET": "@" + name}) is True
        sock.settimeout(5)
        assert sock.recv(100) == b"STATUS=x"
    finally:
        sock.close()


def test_notify_without_systemd_is_a_no_op():
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}) is False


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_a_blocked_event_loop_stops_the_watchdog_pings(notify_socket):
    path, receive = notify_socket
    notifier = systemd.Notifier(lambda: "ok", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    notifier.ready()
    assert receive().startswith("READY=1")
    assert receive() == "WATCHDOG=1"
    monkey.get_original("time", "sleep")(0.6)  # the hub is blocked: no greenlet runs
    before = time.monotonic()
    messages = [receive()]
    # Whatever was queued before the block arrives at once; then pings resume at their 50 ms pace.
    while time.monotonic() - before < 0.05:
        messages.append(receive())
    notifier.stopping()
    assert all(m == "WATCHDOG=1" for m in messages)
    assert len(messages) <= 3, "the watchdog kept pinging while the hub was blocked: %s" % messages


def test_serve_notifies_ready_watchdog_status_and_stopping(tmp_path, fake, serve, notify_socket):
    path, receive = notify_socket
    _, up_url = fake()
    port = free_port()
    config = tmp_path / "wsrelay.yaml"
    config.write_text("usage: {sqlite_path: %s}\n" % json.dumps(str(tmp_path / "usage.db")))
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    served = serve("--config", config, "--port", port, "--upstream", up_url, env=env)
    ready = receive(timeout=15)
    assert ready.startswith("READY=1\nSTATUS=0 live sessions, accepting")
    assert receive() == "WATCHDOG=1" and receive() == "WATCHDOG=1"
    served.wait_listening(port)
    served.proc.send_signal(15)
    while True:
        message = receive()
        if message.startswith("STOPPING=1"):
            break
        assert message == "WATCHDOG=1"
    assert served.proc.wait(timeout=10) == 0


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    with open(os.path.join(REPO, "etc", "systemd", "wsrelay.service")) as fh:
        unit = fh.read()
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    # The unit names the installed launcher; verify it against this checkout's.
    (tmp_path / "wsrelay.service").write_text(unit.replace("/opt/wsrelay/bin/wsrelay",
                                                           os.path.join(REPO, "bin", "wsrelay")))
    result = subprocess.run([analyze, "verify", str(tmp_path / "wsrelay.service")], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_sighup_reloads_keys_and_a_live_turn_survives(tmp_path, fake, serve):
    _, up_url = fake(silence=1.5)
    port = free_port()
    config = tmp_path / "wsrelay.yaml"

    def write(key):
        config.write_text("auth: {keys: [%s]}\nupstream: {api_key_env: WSRELAY_TEST_UPSTREAM}\n"
                          "usage: {sqlite_path: %s}\n" % (key, json.dumps(str(tmp_path / "usage.db"))))

    write("key-one")
    env = dict(os.environ, WSRELAY_TEST_UPSTREAM="sk-upstream")
    served = serve("--config", config, "--port", port, "--upstream", up_url, env=env)
    served.wait_listening(port)
    url = "ws://127.0.0.1:%d/v1/responses" % port
    client = connect(url, [("Authorization", "Bearer key-one")])
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b"delta")
    write("key-two")
    served.proc.send_signal(1)
    with gevent.Timeout(10):
        while not any("stage=config_reloaded" in line for line in served.lines):
            gevent.sleep(0.02)
    assert raw_request(url, [("Authorization", "Bearer key-one")])[1] == 401
    assert raw_request(url, [("Authorization", "Bearer key-two")])[1] == 101
    read_until_marker(client, b'"response.completed"')  # the turn begun before the reload ends normally
    write("[unclosed")
    served.proc.send_signal(1)
    with gevent.Timeout(10):
        while not any("stage=config_reload_failed" in line for line in served.lines):
            gevent.sleep(0.02)
    assert raw_request(url, [("Authorization", "Bearer key-two")])[1] == 101  # a bad file changes nothing
    client.sock.close()  # (a client that stays would be given close_timeout_seconds to answer the relay's 1001)
    assert served.terminate() == 0
