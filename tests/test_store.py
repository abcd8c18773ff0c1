import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest
from gevent.monkey import get_original

from tests.helpers import REPO, wait_until
from wsrelay.fallback import FallbackFile
from wsrelay.store import UsageStore
from wsrelay.trace import NullTracer
from wsrelay.usage import UsageRecord

pytestmark = pytest.mark.timeout(30)

native_sleep = get_original("time", "sleep")


class TraceLog:
    """Collects trace events and lets a test wait for one without sleeping blindly."""

    def __init__(self):
        self.tracer = NullTracer()
        self.events = []
        self._seen = {}
        self.tracer.listeners.append(self._on_event)

    def _on_event(self, stage, fields):
        self.events.append((stage, fields))
        self._seen.setdefault(stage, gevent.event.Event()).set()

    def wait_for(self, stage, timeout=5.0):
        assert self._seen.setdefault(stage, gevent.event.Event()).wait(timeout), "no %s trace" % stage

    def stages(self):
        return [stage for stage, _ in self.events]

    def fields(self, stage):
        return [f for s, f in self.events if s == stage]


@pytest.fixture
def trace():
    return TraceLog()


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "data" / "usage.db"), str(tmp_path / "data" / "usage.db.pending.jsonl")


@pytest.fixture
def make_store(paths, trace):
    stores = []

    def factory(cls=UsageStore, **kwargs):
        kwargs.setdefault("retry_interval", 0.05)
        kwargs.setdefault("busy_timeout", 0.05)
        kwargs.setdefault("trace", trace.tracer)
        store = cls(paths[0], **kwargs)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close(timeout=2.0)


def rec(i, **overrides):
    fields = dict(session_id="s1", response_id="resp_%d" % i, model="gpt-test", key_id="k1", input_tokens=10 + i,
                  output_tokens=5, total_tokens=15 + i, terminal_event="response.completed",
                  started_at=1_000.0 + i, duration_ms=20)
    fields.update(overrides)
    return UsageRecord(**fields)


def db_ids(path):
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT record_id FROM usage")]
    finally:
        conn.close()


def fallback_ids(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line)["record_id"] for line in fh if line.strip()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def exclusive_lock(db_path):
    """A second connection holding the write lock: writes fail even for root, unlike chmod."""
    conn = sqlite3.connect(db_path, timeout=2.0, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_records_written_are_queried_back_in_start_order(make_store, paths):
    store = make_store()
    store.start()
    records = [rec(2), rec(0, client_disconnected=True), rec(1)]
    for r in records:
        store.put(r)
    assert store.flush(5.0)
    assert store.queue_depth == 0
    got = store.query()
    assert [d["response_id"] for d in got] == ["resp_0", "resp_1", "resp_2"]
    assert got[0] == records[1].to_dict()
    assert got[0]["client_disconnected"] is True and got[1]["client_disconnected"] is False
    assert [d["response_id"] for d in store.query(since=1_001.0)] == ["resp_1", "resp_2"]
    store.close()
    assert len(UsageStore(paths[0]).query()) == 3


# The table as wsrelay made it before records had a transport.
OLDER_TABLE = """CREATE TABLE usage (record_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, response_id TEXT,
model TEXT, key_id TEXT, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
total_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
reasoning_tokens INTEGER NOT NULL DEFAULT 0, image_tokens INTEGER NOT NULL DEFAULT 0, terminal_event TEXT NOT NULL,
client_disconnected INTEGER NOT NULL DEFAULT 0, started_at REAL NOT NULL, duration_ms INTEGER NOT NULL DEFAULT 0)"""


def test_a_database_made_before_a_field_existed_gains_its_column_and_keeps_its_rows(make_store, paths):
    os.makedirs(os.path.dirname(paths[0]))
    conn = sqlite3.connect(paths[0])
    conn.execute(OLDER_TABLE)
    conn.execute("INSERT INTO usage (record_id, session_id, response_id, terminal_event, started_at, input_tokens) "
                 "VALUES ('old', 's', 'resp_old', 'response.completed', 999.0, 7)")
    conn.commit()
    conn.close()
    store = make_store()
    store.start()
    store.put(rec(1, resumed=True))
    assert store.flush(5.0)
    old, new = store.query()
    assert (old["response_id"], old["input_tokens"], old["transport"]) == ("resp_old", 7, "websocket")
    assert old["resumed"] is False
    assert new["response_id"] == "resp_1" and new["transport"] == "websocket" and new["resumed"] is True
    store.close()


def test_a_fallback_line_from_before_a_field_existed_gets_its_default():
    record = UsageRecord.from_dict({"record_id": "r", "terminal_event": "response.completed", "input_tokens": 3})
    assert record.transport == "websocket" and record.input_tokens == 3


def test_database_and_its_directory_are_created_in_wal_mode(make_store, paths):
    store = make_store()
    store.start()
    store.put(rec(0))
    assert store.flush(5.0)
    conn = sqlite3.connect(paths[0])
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_put_returns_immediately_and_the_hub_keeps_running_while_the_disk_is_slow(make_store):
    writing = []
    store = make_store()
    write = store.backend.write

    def slow_write(records):
        writing.append(True)
        native_sleep(0.3)  # blocks the pool thread only
        return write(records)

    store.backend.write = slow_write
    store.start()
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    ticking = gevent.spawn(ticker)
    try:
        store.put(rec(0))
        wait_until(lambda: writing)
        before = len(ticks)
        started = time.monotonic()
        for i in range(1, 200):
            store.put(rec(i))
        assert time.monotonic() - started < 0.1
        assert store.flush(10.0)
        during = [t for t in ticks[before:]]
        assert len(during) >= 10
        assert max(b - a for a, b in zip(during, during[1:])) < 0.15
    finally:
        ticking.kill()
    assert len(store.query()) == 200


def test_put_never_raises_on_a_malformed_record(make_store, trace):
    store = make_store()
    store.start()
    store.put(object())
    store.put({"record_id": "from-dict", "session_id": "s", "input_tokens": "bad", "started_at": 5})
    assert store.flush(5.0)
    assert "usage_record_invalid" in trace.stages()
    [row] = store.query()
    assert row["record_id"] == "from-dict" and row["input_tokens"] == 0


def test_locked_database_loses_no_record_and_recovery_imports_each_once(make_store, paths, trace):
    db_path, fallback_path = paths
    store = make_store()
    store.start()
    store.put(rec(0))
    assert store.flush(5.0)
    locked = [rec(i) for i in range(1, 11)]
    with exclusive_lock(db_path):
        for r in locked:
            store.put(r)
        assert store.flush(5.0)  # durable in the fallback file while the database refuses writes
        trace.wait_for("usage_store_failed")
        assert sorted(fallback_ids(fallback_path)) == sorted(r.record_id for r in locked)
        assert store.failures >= 1
        failed = trace.fields("usage_store_failed")[0]
        assert failed["error"] == "OperationalError" and "locked" in failed["message"]
    trace.wait_for("usage_store_recovered")
    store.put(rec(11))
    assert store.flush(5.0)
    ids = db_ids(db_path)
    assert len(ids) == len(set(ids)) == 12
    assert fallback_ids(fallback_path) == []
    assert [d["response_id"] for d in store.query()] == ["resp_%d" % i for i in range(12)]


def test_database_path_that_cannot_be_opened_falls_back_until_it_can(make_store, paths, trace, tmp_path):
    db_path, fallback_path = paths
    (tmp_path / "data" / "usage.db").mkdir(parents=True)  # a directory where the database should be
    store = make_store()
    store.start()
    records = [rec(i) for i in range(5)]
    for r in records:
        store.put(r)
    assert store.flush(5.0)
    assert fallback_ids(fallback_path) == [r.record_id for r in records]
    (tmp_path / "data" / "usage.db").rmdir()
    trace.wait_for("usage_store_recovered")
    assert sorted(db_ids(db_path)) == sorted(r.record_id for r in records)
    assert fallback_ids(fallback_path) == []


def test_records_stay_in_memory_when_neither_database_nor_fallback_is_writable(make_store, paths, trace,
                                                                              tmp_path):
    db_path, _ = paths
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = make_store(fallback_path=str(blocker / "pending.jsonl"))
    store.start()
    store.put(rec(0))
    assert store.flush(5.0)
    with exclusive_lock(db_path):
        for i in range(1, 4):
            store.put(rec(i))
        trace.wait_for("usage_fallback_failed")
        assert not store.flush(0.1)
        assert store.queue_depth == 3
    assert store.flush(5.0)
    assert store.queue_depth == 0
    assert len(db_ids(db_path)) == 4


def test_close_hands_records_it_could_not_save_to_the_trace(make_store, paths, trace, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = make_store(fallback_path=str(blocker / "pending.jsonl"))
    store.start()
    lost = rec(1)
    with exclusive_lock(paths[0]):
        store.put(lost)
        trace.wait_for("usage_fallback_failed")
        store.close(timeout=0.2)
    [unsaved] = trace.fields("usage_records_unsaved")
    assert unsaved["count"] == 1
    assert json.loads(unsaved["records"])[0]["record_id"] == lost.record_id


def write_fallback(path, records, torn_tail=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict()) + "\n")
        if torn_tail:
            fh.write(torn_tail)


def test_fallback_left_by_an_earlier_run_is_imported_at_start(make_store, paths, trace):
    db_path, fallback_path = paths
    left = [rec(i) for i in range(3)]
    write_fallback(fallback_path, left, torn_tail='{"record_id":"torn","session_id":"s1","inpu')
    store = make_store()
    store.start()
    assert sorted(db_ids(db_path)) == sorted(r.record_id for r in left)
    assert fallback_ids(fallback_path) == []
    [skipped] = trace.fields("usage_fallback_line_skipped")
    assert skipped["reason"] == "torn last line" and skipped["line"] == 4
    assert trace.fields("usage_store_recovered")[0]["count"] == 3


def test_record_appended_after_a_torn_line_is_not_swallowed(make_store, paths, trace, tmp_path):
    db_path, fallback_path = paths
    earlier = rec(1)
    write_fallback(fallback_path, [earlier], torn_tail='{"record_id":"torn"')
    (tmp_path / "data" / "usage.db").mkdir()  # the import at start fails, so the torn line stays in place
    store = make_store()
    store.start()
    appended = rec(7)
    store.put(appended)
    assert store.flush(5.0)
    (tmp_path / "data" / "usage.db").rmdir()
    trace.wait_for("usage_store_recovered")
    assert sorted(db_ids(db_path)) == sorted([earlier.record_id, appended.record_id])
    [skipped] = trace.fields("usage_fallback_line_skipped")
    assert skipped["line"] == 2 and skipped["reason"].startswith("unreadable")
    assert skipped["text"] == '{"record_id":"torn"'


def test_importing_the_same_fallback_twice_is_idempotent(make_store, paths):
    db_path, fallback_path = paths
    left = [rec(i) for i in range(3)]
    write_fallback(fallback_path, left)
    first = make_store()
    first.start()
    first.close()
    write_fallback(fallback_path, left + [rec(3)])
    second = make_store()
    second.start()
    second.put(left[0])
    assert second.flush(5.0)
    ids = db_ids(db_path)
    assert len(ids) == len(set(ids)) == 4


def test_query_includes_records_still_waiting_in_the_fallback_file(paths):
    db_path, fallback_path = paths
    write_fallback(fallback_path, [rec(1), rec(0)])
    store = UsageStore(db_path)
    try:
        assert [d["response_id"] for d in store.query()] == ["resp_0", "resp_1"]
    finally:
        store.close()


def test_flush_and_close_are_safe_without_start(paths):
    store = UsageStore(paths[0])
    assert store.flush(0.1)
    store.put(rec(0))
    assert not store.flush(0.1)
    store.close(timeout=0.1)
    store.close(timeout=0.1)


APPEND_ONE = """\
import json, sys
from wsrelay.fallback import FallbackFile
FallbackFile(sys.argv[1]).append([json.loads(sys.argv[2])])
"""


def test_another_process_appending_during_an_import_waits_and_its_record_survives_the_truncation(paths):
    _, fallback_path = paths
    write_fallback(fallback_path, [rec(0)])
    claim = FallbackFile(fallback_path).claim()
    late = rec(1).to_dict()
    other = subprocess.Popen([sys.executable, "-c", APPEND_ONE, fallback_path, json.dumps(late)], cwd=REPO)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=0.5)  # held by the lock while the import is between its read and its truncation
        assert [r["record_id"] for r in claim.records] == [fallback_ids(fallback_path)[0]]
        claim.clear()
        claim.release()
        assert other.wait(timeout=10) == 0
    finally:
        if other.poll() is None:
            other.kill()
    assert fallback_ids(fallback_path) == [late["record_id"]]


def test_imports_back_off_while_the_database_stays_away_and_resume_at_once_after(make_store, paths, trace,
                                                                                 tmp_path):
    (tmp_path / "data" / "usage.db").mkdir(parents=True)  # a directory where the database should be
    attempts = []
    trace.tracer.listeners.append(
        lambda stage, fields: attempts.append(time.monotonic()) if stage == "usage_store_retry_failed" else None)
    store = make_store(retry_interval=0.02)
    store.start()
    store.put(rec(0))
    assert store.flush(5.0)
    wait_until(lambda: len(attempts) >= 6, timeout=10.0, what="six failed imports")
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[-1] >= 4 * 0.02 and gaps[-1] > 2 * gaps[0], gaps
    (tmp_path / "data" / "usage.db").rmdir()
    trace.wait_for("usage_store_recovered", timeout=5.0)
    assert store._import_wait == 0.02
