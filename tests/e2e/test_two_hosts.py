"""Two relay instances as two hosts would run them — each its own ``wsrelay serve`` process and port, one
PostgreSQL and one Redis between them (private servers): one per-key limit across both, every turn of both in
the database exactly once (with the instance that relayed it), the slots of an instance killed with ``kill -9``
free again within the lease TTL, and the other instance serving on."""

import json
import os
import signal
import time

import pytest
import yaml

from tests.helpers import free_port, http_turn, raw_request, wait_until, ws_turn
from tests.integration.test_postgres import wait_for_line

pytestmark = pytest.mark.timeout(120)

KEY = "relay-key-shared"
TTL = 2.0
AUTH = [("Authorization", "Bearer " + KEY)]


@pytest.fixture
def hosts(tmp_path, fake, serve, postgres, redis_url):
    """``(pg, database_url, [(process, port, trace_path)] * 2)``: two instances with the same settings."""
    pg, url = postgres
    _, upstream_url = fake()
    started = []
    for name in ("host-a", "host-b"):
        port = free_port()
        trace_path = str(tmp_path / (name + ".trace"))
        config_path = tmp_path / (name + ".yaml")
        config_path.write_text(yaml.safe_dump({
            "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
            "auth": {"keys": [KEY]},
            "upstream": {"url": upstream_url, "api_key": "sk-upstream", "connect_timeout_seconds": 2},
            "gateway": {"openai_ws": {"max_ingress_connections_per_api_key": 2}},
            "limits": {"redis_url": redis_url, "lease_ttl_seconds": TTL, "redis_timeout_seconds": 0.5},
            "usage": {"database_url": url, "fallback_path": str(tmp_path / (name + ".pending.jsonl")),
                      "sqlite_path": str(tmp_path / (name + ".unused.db"))},
            "trace": {"path": trace_path},
        }))
        process = serve("--config", config_path)
        wait_for_line(trace_path, "server_listening")
        started.append((process, port, trace_path))
    return pg, url, started


def handshake(port):
    return raw_request("ws://127.0.0.1:%d/v1/responses" % port, [("Authorization", "Bearer " + KEY)])


def test_two_instances_share_one_limit_and_one_database(hosts):
    pg, url, ((a, port_a, _), (b, port_b, _)) = hosts
    turns = [ws_turn(port_a, AUTH), ws_turn(port_b, AUTH), http_turn(port_a, dict(AUTH)), http_turn(port_b, dict(AUTH))]

    held = []
    for port in (port_a, port_b):  # the limit is 2 for the key, whichever instance counts
        sock, status, _, _ = handshake(port)
        assert status == 101
        held.append(sock)
    for port in (port_a, port_b):
        sock, status, _, body = handshake(port)
        assert status == 429 and "across the relay's instances" in json.loads(body)["error"]["message"]
        sock.close()

    os.kill(a.proc.pid, signal.SIGKILL)  # host A is lost with its lease: freed within the TTL
    a.proc.wait(timeout=5)
    started = time.monotonic()

    def admitted():
        sock, status, _, _ = handshake(port_b)
        if status == 101:
            held.append(sock)
            return True
        sock.close()
        return False

    wait_until(admitted, timeout=TTL + 3, interval=0.1, what="host A's slot freed")
    assert time.monotonic() - started <= TTL + 1.5
    for sock in held:
        sock.close()

    wait_until(lambda: _free_slot(port_b), timeout=TTL + 3, interval=0.1, what="the slots released")
    turns.append(ws_turn(port_b, AUTH))
    assert b.terminate(timeout=15) == 0, b.stderr()
    rows = pg.execute(url.rsplit("/", 1)[1], "SELECT response_id, instance FROM usage")
    assert sorted(r[0] for r in rows) == sorted(turns), "every turn of both hosts once"
    assert {r[1] for r in rows} == {"%s:%d" % (os.uname().nodename, p.proc.pid) for p in (a, b)}


def _free_slot(port):
    sock, status, _, _ = handshake(port)
    sock.close()
    return status == 101
