"""Usage persistence that never blocks the gevent hub and never loses a record.

Records go through an unbounded queue to one writer greenlet, which writes them in batches to a database
backend: SQLite (:mod:`wsrelay.store_sqlite`, the embedded default) or PostgreSQL (:mod:`wsrelay.store_postgres`).
A backend whose calls block (SQLite's disk) runs in a one-thread native pool, so a slow disk or a locked database
stalls only the writer; a cooperative one (psycopg under gevent) waits on the hub, within its own timeouts.  When
the database cannot be written, batches are appended (and fsynced) to a JSON-lines fallback file
(:mod:`wsrelay.fallback`, always from the pool thread), which is imported back into the database as soon as it
accepts writes again, and at the next start.  Inserts are idempotent on ``record_id``, so a batch written twice
(an import cut short by a crash) is stored once.

The store belongs to the process that starts it: create it before a fork if need be, start it after (each
gunicorn worker starts its own).

Several processes (``wsrelay serve --workers``) may share one database and one fallback file: SQLite's WAL and
busy timeout serialise their batches (PostgreSQL its transactions), record ids are random (a record is inserted
once wherever it comes from), and the fallback file is locked (``flock``) while a batch is appended or the file
is imported and emptied.
"""

import json
import time

import gevent
import gevent.event
import gevent.queue
from gevent.threadpool import ThreadPool

from wsrelay import dburl
from wsrelay.fallback import FallbackFile
from wsrelay.usage import UsageRecord

_STOP = object()


def open_backend(target, busy_timeout=2.0):
    """The backend for ``target``: a ``postgresql://`` URL, a SQLite path, or a backend object as it is."""
    if not isinstance(target, str):
        return target
    if dburl.is_postgres(target):
        from .store_postgres import PostgresBackend

        return PostgresBackend(target)
    from .store_sqlite import SQLiteBackend

    return SQLiteBackend(target, busy_timeout=busy_timeout)


def _capture(fn, args):
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


class UsageStore:
    """Queue-fed, batch-writing usage store; every public method is called from greenlets of one hub."""

    def __init__(self, target, fallback_path=None, retry_interval=1.0, batch_size=None, trace=None,
                 busy_timeout=2.0):
        """``target``: a SQLite path, a ``postgresql://`` URL or a backend (see :func:`open_backend`);
        ``fallback_path`` defaults to ``<sqlite path>.pending.jsonl`` (a URL has no default: without one, records
        the database refuses wait in memory); ``batch_size``, the most records written at once, defaults to the
        backend's own."""
        self.backend = open_backend(target, busy_timeout)
        self.fallback = FallbackFile(fallback_path or self.backend.default_fallback_path())
        self.fallback_path = self.fallback.path
        self.retry_interval = retry_interval
        self.batch_size = max(1, int(batch_size or self.backend.batch_size))
        self.failures = 0
        self._trace = trace
        self._queue = gevent.queue.Queue()
        self._pool = None
        self._writer = None
        self._closed = False
        self._put_count = 0
        self._durable_count = 0
        self._progress = gevent.event.Event()
        self._unsaved = []  # a batch neither the database nor the fallback file accepted
        self._current = None  # the batch being written, so close() can still report it if the write hangs
        self._fallback_dirty = False
        self._last_import_attempt = 0.0
        self._import_wait = retry_interval  # doubles while the database stays away, up to 16 retry intervals

    # -- greenlet side -------------------------------------------------------------------------------------

    @property
    def queue_depth(self):
        """Records accepted by put() that are not yet durable."""
        return self._put_count - self._durable_count

    def start(self):
        self._ensure_pool()
        self._fallback_dirty = True
        try:
            self._db(self.backend.open)
        except self.backend.errors as exc:
            self._emit("usage_store_failed", error=type(exc).__name__, message=self._message(exc), count=0)
            # The writer imports the fallback file later: trying now would hold the start up for a second connect
            # timeout when the server does not answer.
            self._last_import_attempt = time.monotonic()
        else:
            self._try_import()
        if self._writer is None:
            self._writer = gevent.spawn(self._run)

    def put(self, record):
        try:
            data = record.to_dict() if isinstance(record, UsageRecord) else UsageRecord.from_dict(record).to_dict()
        except Exception as exc:  # a malformed record must not take the session down
            self._emit("usage_record_invalid", error=type(exc).__name__, message=str(exc), record=repr(record))
            return
        if self._closed:
            self._emit("usage_records_unsaved", reason="store_closed", count=1, records=json.dumps([data]))
            return
        self._put_count += 1
        self._queue.put_nowait(data)

    def flush(self, timeout=10.0):
        target = self._put_count
        deadline = time.monotonic() + timeout
        while self._durable_count < target:
            if self._writer is None or self._writer.dead:
                return False
            progress = self._progress
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            progress.wait(remaining)
        return True

    def close(self, timeout=10.0):
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._closed = True
        if self._writer is not None:
            self._queue.put_nowait(_STOP)
            self._writer.join(max(0.0, deadline - time.monotonic()))
            if not self._writer.dead:
                self._writer.kill(block=True, timeout=1.0)
        leftover = list(self._current or []) + list(self._unsaved)
        while True:
            try:
                item = self._queue.get_nowait()
            except gevent.queue.Empty:
                break
            if item is not _STOP:
                leftover.append(item)
        if leftover:
            # Last resort: the trace is the only place left that can still carry these records.
            self._emit("usage_records_unsaved", reason="close_timeout", count=len(leftover),
                       records=json.dumps(leftover))
        self._unsaved, self._current = [], None
        if self._pool is not None:
            try:
                self._db(self.backend.close)
            except self.backend.errors:
                pass
            self._pool.kill()
            self._pool = None

    def query(self, since=None):
        """Every record (database and fallback file) started at or after ``since``, ordered by start time."""
        self._ensure_pool()
        rows = {d["record_id"]: d for d in self._db(self.backend.query, since)}
        pending, _ = self._call(self.fallback.read)
        for d in pending:
            if since is None or d["started_at"] >= float(since):
                rows.setdefault(d["record_id"], d)
        return sorted(rows.values(), key=lambda d: (d["started_at"], d["record_id"]))

    def _ensure_pool(self):
        if self._pool is None:
            self._pool = ThreadPool(1)

    def _message(self, exc):
        return self.backend.redact(str(exc))  # a database URL's password must not reach the trace

    def _emit(self, stage, **fields):
        if self._trace is not None:
            try:
                self._trace.emit(stage, **fields)
            except Exception:
                pass  # tracing is best effort; the records matter more

    def _mark_durable(self, count):
        self._durable_count += count
        progress, self._progress = self._progress, gevent.event.Event()
        progress.set()

    def _run(self):
        while True:
            if self._unsaved:
                batch, self._unsaved = self._unsaved, []
                self._current = batch
                gevent.sleep(self.retry_interval)
            else:
                timeout = self.retry_interval if self._fallback_dirty else None
                try:
                    first = self._queue.get(timeout=timeout)
                except gevent.queue.Empty:
                    self._try_import()
                    continue
                if first is _STOP:
                    return
                batch = [first]
                while len(batch) < self.batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except gevent.queue.Empty:
                        break
                    if item is _STOP:
                        self._queue.put_nowait(_STOP)  # handled after this batch is durable
                        break
                    batch.append(item)
            self._current = batch
            try:
                self._store_batch(batch)
            except Exception as exc:  # the writer must outlive any surprise, holding on to its batch
                self._emit("usage_store_error", error=type(exc).__name__, message=self._message(exc),
                           count=len(batch))
                self._unsaved = batch + self._unsaved
            self._current = None

    def _store_batch(self, batch):
        if self._fallback_dirty:
            self._try_import()
        # While the fallback holds records the database was just failing: appending there first saves a busy
        # timeout per batch, and the import loop finds out when the database is back.
        attempts = (self._store_in_fallback, self._store_in_db) if self._fallback_dirty else \
            (self._store_in_db, self._store_in_fallback)
        for attempt in attempts:
            if attempt(batch):
                self._mark_durable(len(batch))
                return
        self._unsaved = batch + self._unsaved

    def _store_in_db(self, batch):
        try:
            self._db(self.backend.write, batch)
        except self.backend.errors as exc:
            self.failures += 1
            self._emit("usage_store_failed", error=type(exc).__name__, message=self._message(exc), count=len(batch),
                       failures=self.failures)
            return False
        return True

    def _store_in_fallback(self, batch):
        try:
            self._call(self.fallback.append, batch)
        except OSError as exc:
            self._emit("usage_fallback_failed", error=type(exc).__name__, message=str(exc), count=len(batch),
                       path=self.fallback_path)
            return False
        if not self._fallback_dirty:
            self._fallback_dirty = True
            self._last_import_attempt = time.monotonic()
        return True

    def _db(self, fn, *args):
        """Call the backend: on the hub if it is cooperative (it bounds its own waits), else in the pool thread."""
        if self.backend.cooperative:
            return fn(*args)
        return self._call(fn, *args)

    def _call(self, fn, *args):
        """Run ``fn`` in the pool thread; its exception is re-raised here instead of printed by the pool."""
        ok, value = self._pool.apply(_capture, (fn, args))
        if not ok:
            raise value
        return value

    def _try_import(self):
        """Move the fallback file into the database, at most once per retry interval (backing off while it fails:
        an attempt on an unreachable server holds the writer for the connect timeout, and the batches that come
        meanwhile wait in memory)."""
        now = time.monotonic()
        if not self._fallback_dirty or now - self._last_import_attempt < self._import_wait:
            return
        self._last_import_attempt = now
        try:
            imported, skipped = self._import_fallback()
        except self.backend.errors + (OSError,) as exc:
            self._import_wait = min(self._import_wait * 2, self.retry_interval * 16)
            self._emit("usage_store_retry_failed", error=type(exc).__name__, message=self._message(exc),
                       path=self.fallback_path)
            return
        self._fallback_dirty = False
        self._import_wait = self.retry_interval
        for lineno, reason, text in skipped:
            # The raw text goes to the trace so a damaged record can still be recovered by hand.
            self._emit("usage_fallback_line_skipped", path=self.fallback_path, line=lineno, reason=reason,
                       text=text)
        if imported:
            self._emit("usage_store_recovered", count=imported, skipped=len(skipped), path=self.fallback_path)

    def _import_fallback(self):
        """Write the fallback file's records to the database, then empty it: (records imported, lines skipped).

        The file stays locked throughout, so no other process's append is lost to the truncation.  Only after the
        last commit is it emptied: a crash before that imports it again, and the idempotent inserts dedup.
        """
        claim = self._call(self.fallback.claim)
        try:
            records = claim.records
            for i in range(0, len(records), self.batch_size):
                self._db(self.backend.write, records[i:i + self.batch_size])
            self._call(claim.clear)
        finally:
            claim.release()
        return len(claim.records), claim.skipped
