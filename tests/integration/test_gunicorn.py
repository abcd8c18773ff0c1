"""wsrelay under a real gunicorn with its worker class: refusal before the 101, keepalive, drain, graceful TERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import gevent
import pytest

from tests.helpers import (CREATE, REPO, connect, free_port, port_of, raw_request, read_close, read_response,
                           read_until_marker)
from wsrelay.frames import OP_PING, OP_PONG, OP_TEXT
from wsrelay.store import UsageStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gunicorn(tmp_path):
    """``start(upstream_url, yaml_extra, workers=1)`` runs gunicorn -k wsrelay.gunicorn.Worker; returns
    (proc, url, db)."""
    procs = []

    def start(upstream_url, extra="", workers=1):
        port = free_port()
        db = str(tmp_path / "usage.db")
        config = tmp_path / "wsrelay.yaml"
        config.write_text("upstream: {url: %s, api_key_env: WSRELAY_TEST_UPSTREAM}\nusage: {sqlite_path: %s}\n"
                          "gateway:\n  openai_ws:\n    passthrough_downstream_ping_interval_seconds: 0.3\n"
                          "    passthrough_downstream_ping_timeout_seconds: 0.2\n"
                          "    upstream_drain_timeout_seconds: 5\n    close_timeout_seconds: 1\n"
                          "server: {shutdown_grace_seconds: 5}\n%s"
                          % (json.dumps(upstream_url), json.dumps(db), extra))
        env = dict(os.environ, WSRELAY_CONFIG=str(config), WSRELAY_TEST_UPSTREAM="sk-upstream")
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "wsrelay.gunicorn.Worker", "-w", str(workers),
                                 "-b", "127.0.0.1:%d" % port, "--graceful-timeout", "30",
                                 "wsrelay.wsgi:application"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        url = "ws://127.0.0.1:%d/v1/responses" % port
        with gevent.Timeout(20, AssertionError("gunicorn did not start")):
            while True:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                gevent.sleep(0.1)
        return proc, url, db

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def records(db):
    store = UsageStore(db)
    return store.query()


def test_gunicorn_worker_refuses_before_the_upgrade_and_relays_with_keepalive(fake, gunicorn):
    app, up_url = fake(silence=1.2)
    proc, url, db = gunicorn(up_url, "auth: {keys: [rk-gunicorn]}\n")
    sock, status, headers, body = raw_request(url, [("Authorization", "Bearer wrong")])
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert app.handshakes == []
    client = connect(url, [("Authorization", "Bearer rk-gunicorn")])
    client.send(OP_TEXT, CREATE)
    pings = 0
    with gevent.Timeout(10):
        while True:
            fin, opcode, payload = client.read_frame()
            if opcode == OP_PING:
                pings += 1
                client.send(OP_PONG, payload)
            elif b'"response.completed"' in payload:
                break
    assert pings >= 2
    assert app.handshakes[0]["authorization"] == "Bearer sk-upstream"
    client.close(1000)
    assert read_close(client) == (1000, "")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    rows = records(db)
    assert [r["terminal_event"] for r in rows] == ["response.completed"]


def test_gunicorn_worker_drains_a_turn_whose_client_left(fake, gunicorn):
    _, up_url = fake(silence=1.0)
    proc, url, db = gunicorn(up_url)
    client = connect(url)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b"delta")
    client.sock.close()
    with gevent.Timeout(15):
        while not records(db):  # written by the worker's store once the drain reached the terminal event
            gevent.sleep(0.1)
    row = records(db)[0]
    assert row["terminal_event"] == "response.completed" and row["client_disconnected"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_gunicorn_sigterm_lets_a_live_turn_finish_then_closes_1001(fake, gunicorn):
    _, up_url = fake(silence=1.5)
    proc, url, db = gunicorn(up_url)
    client = connect(url)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b"delta")
    proc.send_signal(signal.SIGTERM)
    read_until_marker(client, b'"response.completed"')
    assert read_close(client) == (1001, "server shutting down")
    assert proc.wait(timeout=20) == 0
    row = records(db)[0]
    assert row["terminal_event"] == "response.completed" and not row["client_disconnected"]


def test_gunicorn_worker_answers_a_half_sent_head_with_408_after_the_deadline(fake, gunicorn):
    _, up_url = fake()
    proc, url, db = gunicorn(up_url, "server.handshake_timeout_seconds: 1\n")
    sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=5)
    sock.sendall(b"GET /v1/responses HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    with gevent.Timeout(1 + 2, AssertionError("the worker still holds a half-sent head")):
        status, headers, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 <= time.monotonic() - started <= 1 + 2
    client = connect(url)  # and serves WebSocket clients as before
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')


def test_gunicorn_workers_share_one_per_key_limit_through_redis(fake, gunicorn, redis_server, redis_url):
    _, up_url = fake()
    proc, url, db = gunicorn(up_url, "limits: {redis_url: %s}\n" % json.dumps(redis_url)
                             + "gateway: {openai_ws: {max_ingress_connections_per_api_key: 3}}\n", workers=2)
    held, statuses = [], []
    for _ in range(6):  # whichever worker accepts each one, the key holds 3 at most
        sock, status, headers, body = raw_request(url, [("Authorization", "Bearer key-alice")])
        statuses.append(status)
        if status == 101:
            held.append(sock)
        else:
            sock.close()
    assert statuses == [101] * 3 + [429] * 3
    client = redis_server.client()
    members = [m.decode() for key in client.scan_iter("wsrelay:lease:*") for m in client.zrange(key, 0, -1)]
    client.close()
    # Each lease names the worker that holds it (made after the fork), never the arbiter.
    assert len(members) == 3 and proc.pid not in {int(m.split(":")[0].rsplit("-", 1)[1]) for m in members}
    for sock in held:
        sock.close()
