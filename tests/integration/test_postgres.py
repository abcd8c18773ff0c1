"""The relay with its usage records in PostgreSQL (``usage.database_url``), against a private server: every turn, on
both transports, lands in the database exactly once, the ones relayed while the server was down included (they
wait in the fallback file and are replayed once it is back); and a slow write never delays a frame."""

import json
import os
import subprocess
import sys
import time

import gevent
import pytest
import yaml

from tests.helpers import REPO, connect, free_port, http_turn, read_events, send_create, ws_turn
from wsrelay import config as config_mod
from wsrelay import server
from wsrelay.frames import OP_TEXT
from wsrelay.store import UsageStore
from wsrelay.trace import NullTracer

pytestmark = pytest.mark.timeout(90)


def wait_for_line(path, stage, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8") as fh:
                if any(" stage=%s " % stage in line for line in fh):
                    return
        except FileNotFoundError:
            pass
        gevent.sleep(0.05)
    raise AssertionError("no %s trace line within %ss" % (stage, timeout))


def pending_lines(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def test_every_turn_lands_in_postgresql_once_including_those_replayed_after_a_restart_of_the_server(
        tmp_path, fake, serve, postgres):
    pg, url = postgres
    _, upstream_url = fake()
    port = free_port()
    trace_path, fallback = str(tmp_path / "trace.log"), str(tmp_path / "usage.pending.jsonl")
    config_path = tmp_path / "wsrelay.yaml"
    config_path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
        "upstream": {"url": upstream_url, "connect_timeout_seconds": 2},
        "usage": {"database_url": url, "fallback_path": fallback, "sqlite_path": str(tmp_path / "unused.db")},
        "trace": {"path": trace_path},
    }))
    relay = serve("--config", config_path)
    wait_for_line(trace_path, "server_listening")

    relayed = [ws_turn(port), http_turn(port), ws_turn(port)]
    pg.stop()
    try:
        while_down = [ws_turn(port), http_turn(port), ws_turn(port), ws_turn(port)]
        wait_for_line(trace_path, "usage_store_failed")
        deadline = time.monotonic() + 10
        while len(pending_lines(fallback)) < len(while_down) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert sorted(r["response_id"] for r in pending_lines(fallback)) == sorted(while_down)
    finally:
        pg.start()
    wait_for_line(trace_path, "usage_store_recovered")
    after = [http_turn(port), ws_turn(port)]
    assert relay.terminate(timeout=10) == 0, relay.stderr()

    everything = relayed + while_down + after
    rows = pg.execute(url.rsplit("/", 1)[1], "SELECT response_id, transport, instance FROM usage")
    assert sorted(r[0] for r in rows) == sorted(everything), "every turn once, none twice"
    assert sorted(r[1] for r in rows) == ["http"] * 3 + ["websocket"] * 6
    assert {r[2] for r in rows} == {"%s:%d" % (os.uname().nodename, relay.proc.pid)}
    assert pending_lines(fallback) == []
    shown = subprocess.run([sys.executable, "-m", "wsrelay", "usage", "--config", str(config_path), "--format",
                            "json"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert sorted(r["response_id"] for r in json.loads(shown.stdout)) == sorted(everything)


@pytest.fixture
def store_on_postgres(postgres, tmp_path):
    store = UsageStore(postgres[1], fallback_path=str(tmp_path / "pending.jsonl"), retry_interval=0.1,
                       trace=NullTracer())
    store.start()
    yield store
    store.close(timeout=5)


def test_a_slow_usage_write_does_not_delay_a_concurrent_frame(scripted, store_on_postgres, postgres):
    pg, url = postgres
    database = url.rsplit("/", 1)[1]
    pg.execute(database, "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                         "$$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$")
    pg.execute(database, "CREATE TRIGGER slow BEFORE INSERT ON usage FOR EACH ROW EXECUTE FUNCTION slow()")
    app, upstream_url = scripted()
    cfg = config_mod.load(None, {"upstream.url": upstream_url,
                                 "gateway.openai_ws.passthrough_downstream_ping_interval_seconds": 0})
    relay = server.make_server(cfg, NullTracer(), store_on_postgres, listener=("127.0.0.1", 0))
    relay.start()
    try:
        url = "ws://127.0.0.1:%d/v1/responses" % relay.server_port
        billed, watched = connect(url), connect(url)
        send_create(billed)
        send_create(watched)
        billed_up, watched_up = app.next(), app.next()
        billed_up.read_frame()
        watched_up.read_frame()
        # The first session's turn ends: its record goes to PostgreSQL, where the insert sleeps 1.5 s.
        billed_up.send(OP_TEXT, json.dumps({"type": "response.completed", "response": {
            "id": "resp_billed", "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}}).encode())
        read_events(billed, until="response.completed")
        gevent.sleep(0.1)
        assert store_on_postgres.queue_depth == 1  # the write is under way
        delays = []
        for i in range(40):
            sent = time.monotonic()
            watched_up.send(OP_TEXT, json.dumps({"type": "response.output_text.delta", "delta": str(i)}).encode())
            watched.read_frame()
            delays.append(time.monotonic() - sent)
            gevent.sleep(0.01)
        assert store_on_postgres.queue_depth == 1, "the slow write ended before the frames were measured"
        assert max(delays) < 0.05, "a frame took %.1f ms while the usage write was slow" % (max(delays) * 1000)
        assert store_on_postgres.flush(10)
        assert [r["response_id"] for r in store_on_postgres.query()] == ["resp_billed"]
        for peer in (billed_up, watched_up):
            peer.done.set()
    finally:
        relay.stop(timeout=1)
