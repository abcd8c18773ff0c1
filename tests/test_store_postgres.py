"""The usage store on PostgreSQL, against a private server: the table made and migrated from the record's fields,
idempotent batches, the fallback file while the server is down and its replay once it is back, and the hub left
free while a query is slow."""

import json
import os
import socket
import time

import gevent
import pytest
from psycopg import waiting

from tests.test_store import TraceLog, fallback_ids, rec, write_fallback
from wsrelay import usage_table
from wsrelay.store import UsageStore
from wsrelay.store_postgres import DatabaseTimeout, PostgresBackend

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def trace():
    return TraceLog()


@pytest.fixture
def fallback_path(tmp_path):
    return str(tmp_path / "usage.pending.jsonl")


@pytest.fixture
def make_store(postgres, fallback_path, trace):
    stores = []

    def factory(url=None, **kwargs):
        kwargs.setdefault("retry_interval", 0.05)
        kwargs.setdefault("trace", trace.tracer)
        kwargs.setdefault("fallback_path", fallback_path)
        store = UsageStore(url or postgres[1], **kwargs)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close(timeout=2.0)


def rows(postgres, sql="SELECT record_id FROM usage ORDER BY started_at"):
    server, url = postgres
    return server.execute(url.rsplit("/", 1)[1], sql)


def record_ids(postgres):
    return [r[0] for r in rows(postgres)]


def test_records_written_are_read_back_from_a_table_made_from_the_record_fields(make_store, postgres):
    store = make_store()
    store.start()
    records = [rec(2), rec(0, client_disconnected=True, account="acct-a"), rec(1, transport="http")]
    for r in records:
        store.put(r)
    assert store.flush(5.0)
    got = store.query()
    assert got == sorted((r.to_dict() for r in records), key=lambda d: d["started_at"])
    assert got[0]["client_disconnected"] is True and got[0]["instance"] == records[1].instance
    assert [d["response_id"] for d in store.query(since=1_001.0)] == ["resp_1", "resp_2"]
    columns = rows(postgres, "SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'usage' ORDER BY ordinal_position")
    assert [c for c, _ in columns] == list(usage_table.COLUMNS)
    types = dict(columns)
    assert (types["input_tokens"], types["client_disconnected"], types["started_at"], types["instance"]) == \
        ("bigint", "boolean", "double precision", "text")


# The table as an older wsrelay made it: before records had a transport, an account and an instance.
OLDER_TABLE = """CREATE TABLE usage (record_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, response_id TEXT,
model TEXT, key_id TEXT, input_tokens BIGINT NOT NULL DEFAULT 0, output_tokens BIGINT NOT NULL DEFAULT 0,
total_tokens BIGINT NOT NULL DEFAULT 0, cached_tokens BIGINT NOT NULL DEFAULT 0,
reasoning_tokens BIGINT NOT NULL DEFAULT 0, image_tokens BIGINT NOT NULL DEFAULT 0, terminal_event TEXT NOT NULL,
client_disconnected BOOLEAN NOT NULL DEFAULT false, started_at DOUBLE PRECISION NOT NULL,
duration_ms BIGINT NOT NULL DEFAULT 0)"""


def test_a_table_made_before_a_field_existed_gains_its_columns_and_keeps_its_rows(make_store, postgres):
    server, url = postgres
    database = url.rsplit("/", 1)[1]
    server.execute(database, OLDER_TABLE)
    server.execute(database, "INSERT INTO usage (record_id, session_id, response_id, terminal_event, started_at, "
                             "input_tokens) VALUES ('old', 's', 'resp_old', 'response.completed', 999.0, 7)")
    store = make_store()
    store.start()
    store.put(rec(1))
    assert store.flush(5.0)
    old, new = store.query()
    assert (old["response_id"], old["input_tokens"], old["transport"], old["instance"]) == \
        ("resp_old", 7, "websocket", None)
    assert new["response_id"] == "resp_1" and new["instance"] == rec(1).instance


def test_a_record_stored_twice_is_kept_once(make_store, postgres):
    store = make_store()
    store.start()
    r = rec(0)
    store.put(r)
    store.put(r)
    assert store.flush(5.0)
    store.put(r.to_dict())
    assert store.flush(5.0)
    assert record_ids(postgres) == [r.record_id]


def test_workers_starting_together_make_the_table_once(postgres):
    backends = [PostgresBackend(postgres[1]) for _ in range(8)]
    try:
        opened = [gevent.spawn(b.open) for b in backends]
        gevent.joinall(opened, timeout=30, raise_error=True)
        assert all(g.successful() for g in opened)
        backends[0].write([rec(0).to_dict()])
        assert len(backends[-1].query()) == 1
    finally:
        for b in backends:
            b.close()


def test_records_wait_in_the_fallback_file_while_postgresql_is_down_and_land_once_when_it_is_back(
        make_store, postgres, fallback_path, trace):
    server, _ = postgres
    store = make_store()
    store.start()
    before = [rec(i) for i in range(3)]
    for r in before:
        store.put(r)
    assert store.flush(5.0)
    server.stop()
    try:
        during = [rec(i) for i in range(3, 10)]
        for r in during:
            store.put(r)
        assert store.flush(10.0)  # durable in the fallback file while the server is down
        trace.wait_for("usage_store_failed")
        assert sorted(fallback_ids(fallback_path)) == sorted(r.record_id for r in during)
    finally:
        server.start()
    trace.wait_for("usage_store_recovered", timeout=15.0)
    after = rec(10)
    store.put(after)
    assert store.flush(5.0)
    ids = record_ids(postgres)
    assert ids == [r.record_id for r in before + during + [after]]
    assert fallback_ids(fallback_path) == []
    assert trace.fields("usage_store_recovered")[0]["count"] == len(during)


def test_a_fallback_left_by_an_earlier_run_is_replayed_at_start_and_again_without_duplicates(
        make_store, postgres, fallback_path, trace):
    left = [rec(i) for i in range(600)]  # more than a batch: replayed in several statements
    write_fallback(fallback_path, left, torn_tail='{"record_id":"torn","session_id":"s1","inpu')
    make_store().start()
    assert sorted(record_ids(postgres)) == sorted(r.record_id for r in left)
    assert fallback_ids(fallback_path) == []
    assert trace.fields("usage_fallback_line_skipped")[0]["reason"] == "torn last line"
    write_fallback(fallback_path, left[:10] + [rec(600)])  # as if a crash came between commit and truncation
    make_store().start()
    ids = record_ids(postgres)
    assert len(ids) == len(set(ids)) == 601


def test_a_slow_query_does_not_stall_the_hub(make_store, postgres):
    server, url = postgres
    database = url.rsplit("/", 1)[1]
    store = make_store()
    store.start()
    server.execute(database, "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN PERFORM pg_sleep(0.8); RETURN NEW; END $$")
    server.execute(database, "CREATE TRIGGER slow BEFORE INSERT ON usage FOR EACH ROW EXECUTE FUNCTION slow()")
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.005)

    ticking = gevent.spawn(ticker)
    try:
        started = time.monotonic()
        store.put(rec(0))
        assert store.flush(10.0)
        slow_write = time.monotonic() - started
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    finally:
        ticking.kill()
    assert slow_write >= 0.8
    # A 5 ms ticker kept ticking: on a blocked hub one gap would be the whole 800 ms.
    assert len(gaps) > 50 and max(gaps) < 0.1, "the hub stood still for %.1f ms" % (max(gaps) * 1000)
    assert len(store.query()) == 1


def test_a_database_that_hangs_is_given_up_after_the_timeout_and_the_batch_goes_to_the_fallback_file(
        make_store, postgres, fallback_path, trace):
    server, url = postgres
    database = url.rsplit("/", 1)[1]
    store = make_store()
    store.backend.timeout = 0.3
    store.start()
    server.execute(database, "CREATE FUNCTION hang() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$")
    server.execute(database, "CREATE TRIGGER hang BEFORE INSERT ON usage FOR EACH ROW EXECUTE FUNCTION hang()")
    r = rec(0)
    store.put(r)
    assert store.flush(5.0)
    failed = trace.fields("usage_store_failed")[0]
    assert failed["error"] == DatabaseTimeout.__name__
    assert fallback_ids(fallback_path) == [r.record_id]
    server.execute(database, "DROP TRIGGER hang ON usage")
    trace.wait_for("usage_store_recovered", timeout=10.0)
    assert record_ids(postgres) == [r.record_id]


def test_the_password_in_the_url_never_reaches_the_trace(make_store, postgres, trace):
    server, _ = postgres
    store = make_store("postgresql://wsrelay:s3cr%%23t-pw@127.0.0.1:%d/nowhere?password=s3cr%%23t-pw" % server.port)
    store.start()
    store.put(rec(0))
    assert store.flush(5.0)  # into the fallback file: that database does not exist
    trace.wait_for("usage_store_failed")
    text = json.dumps(trace.events)
    assert "nowhere" in text and "s3cr" not in text, text
    assert store.backend.describe() == "postgresql://wsrelay:***@127.0.0.1:%d/nowhere?password=***" % server.port


def test_a_server_that_does_not_answer_holds_the_start_up_for_one_connect_timeout_only(make_store, trace):
    with socket.socket() as silent:  # listening, never accepting: a connect hangs like one to a lost host
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        store = make_store("postgresql://wsrelay@127.0.0.1:%d/usage" % silent.getsockname()[1])
        store.backend.connect_timeout = 2  # libpq's least
        started = time.monotonic()
        store.start()
        elapsed = time.monotonic() - started
        assert 1.9 < elapsed < 3.5, elapsed
        assert trace.stages() == ["usage_store_failed"]
        store.close(timeout=0.5)


def test_the_urls_own_connect_timeout_and_application_name_win_over_the_defaults():
    assert PostgresBackend("postgresql://h/db").connect_defaults() == {"connect_timeout": 5,
                                                                       "application_name": "wsrelay"}
    assert PostgresBackend("postgresql://h/db?connect_timeout=20&application_name=billing").connect_defaults() == {}


def test_a_psycopg_that_would_block_the_hub_is_refused(postgres, monkeypatch):
    if not hasattr(waiting, "wait_c"):
        pytest.skip("this psycopg has no C wait function")
    monkeypatch.setattr(waiting, "wait", waiting.wait_c)
    backend = PostgresBackend(postgres[1])
    with pytest.raises(RuntimeError, match="block"):
        backend.open()


def test_a_store_started_in_a_forked_child_leaves_the_parents_connection_alone(postgres, monkeypatch):
    backend = PostgresBackend(postgres[1])
    try:
        parents = backend.open()
        monkeypatch.setattr(os, "getpid", lambda: -1)  # what a forked child sees
        childs = backend.open()
        assert childs is not parents and not parents.closed
        backend.write([rec(0).to_dict()])
        assert len(backend.query()) == 1
    finally:
        backend.close()
        monkeypatch.undo()
        parents.close()
