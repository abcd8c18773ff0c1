"""Usage persistence that never blocks the gevent hub and never loses a record.

Records go through an unbounded queue to one writer greenlet, which writes them in batches to SQLite.  Every
disk operation runs in a one-thread native pool, so a slow disk or a locked database stalls only the writer.
When the database cannot be written, batches are appended (and fsynced) to a JSON-lines fallback file, which is
imported back into the database as soon as it accepts writes again, and at the next start.

Several processes (``wsrelay serve --workers``) may share one database and one fallback file: SQLite's WAL and
busy timeout serialise their batches, record ids are random (a record is inserted once wherever it comes from),
and the fallback file is locked (``flock``) while a batch is appended or the file is imported and emptied.
"""

import fcntl
import json
import os
import sqlite3
import time

import gevent
import gevent.event
import gevent.queue
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from wsrelay.usage import UsageRecord
from wsrelay.usage_table import BOOL_COLUMNS, COLUMNS, INSERT, SCHEMA, add_new_columns, as_row

# The pool thread must be told apart from others by its real identity, even when threading is monkey-patched.
_native_ident = get_original("_thread", "get_ident")

_STOP = object()
_STORE_ERRORS = (sqlite3.Error, OSError)


def _capture(fn, args):
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


def _fsync_dir(path):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class UsageStore:
    """Queue-fed, batch-writing usage store; every public method is called from greenlets of one hub."""

    def __init__(self, sqlite_path, fallback_path=None, retry_interval=1.0, batch_size=256, trace=None,
                 busy_timeout=2.0):
        self.sqlite_path = sqlite_path
        self.fallback_path = fallback_path or sqlite_path + ".pending.jsonl"
        self.retry_interval = retry_interval
        self.batch_size = max(1, int(batch_size))
        self.busy_timeout = busy_timeout
        self.failures = 0
        self._trace = trace
        self._queue = gevent.queue.Queue()
        self._pool = None
        self._conn = None
        self._conn_thread = None
        self._writer = None
        self._closed = False
        self._put_count = 0
        self._durable_count = 0
        self._progress = gevent.event.Event()
        self._unsaved = []  # a batch neither the database nor the fallback file accepted
        self._current = None  # the batch being written, so close() can still report it if the write hangs
        self._fallback_dirty = False
        self._last_import_attempt = 0.0

    # -- greenlet side -------------------------------------------------------------------------------------

    @property
    def queue_depth(self):
        """Records accepted by put() that are not yet durable."""
        return self._put_count - self._durable_count

    def start(self):
        self._ensure_pool()
        try:
            self._call(self._open_db)
        except _STORE_ERRORS as exc:
            self._emit("usage_store_failed", error=type(exc).__name__, message=str(exc), count=0)
        self._fallback_dirty = True
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
                self._call(self._close_db)
            except _STORE_ERRORS:
                pass
            self._pool.kill()
            self._pool = None

    def query(self, since=None):
        """Every record (database and fallback file) started at or after ``since``, ordered by start time."""
        self._ensure_pool()
        return self._call(self._query, since)

    def _ensure_pool(self):
        if self._pool is None:
            self._pool = ThreadPool(1)

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
                self._emit("usage_store_error", error=type(exc).__name__, message=str(exc), count=len(batch))
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
            self._call(self._write_rows, [as_row(d) for d in batch])
        except _STORE_ERRORS as exc:
            self.failures += 1
            self._emit("usage_store_failed", error=type(exc).__name__, message=str(exc), count=len(batch),
                       failures=self.failures)
            return False
        return True

    def _store_in_fallback(self, batch):
        try:
            self._call(self._append_fallback, batch)
        except OSError as exc:
            self._emit("usage_fallback_failed", error=type(exc).__name__, message=str(exc), count=len(batch),
                       path=self.fallback_path)
            return False
        if not self._fallback_dirty:
            self._fallback_dirty = True
            self._last_import_attempt = time.monotonic()
        return True

    def _call(self, fn, *args):
        """Run ``fn`` in the pool thread; its exception is re-raised here instead of printed by the pool."""
        ok, value = self._pool.apply(_capture, (fn, args))
        if not ok:
            raise value
        return value

    def _try_import(self):
        """Move the fallback file into the database, at most once per retry interval."""
        now = time.monotonic()
        if not self._fallback_dirty or now - self._last_import_attempt < self.retry_interval:
            return
        self._last_import_attempt = now
        try:
            imported, skipped = self._call(self._import_fallback)
        except _STORE_ERRORS as exc:
            self._emit("usage_store_retry_failed", error=type(exc).__name__, message=str(exc),
                       path=self.fallback_path)
            return
        self._fallback_dirty = False
        for lineno, reason, text in skipped:
            # The raw text goes to the trace so a damaged record can still be recovered by hand.
            self._emit("usage_fallback_line_skipped", path=self.fallback_path, line=lineno, reason=reason,
                       text=text)
        if imported:
            self._emit("usage_store_recovered", count=imported, skipped=len(skipped), path=self.fallback_path)

    # -- pool-thread side: everything below touches the disk ------------------------------------------------

    def _open_db(self):
        if self._conn is not None and self._conn_thread == _native_ident():
            return self._conn
        self._close_db()
        directory = os.path.dirname(os.path.abspath(self.sqlite_path))
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.sqlite_path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives power loss, not only a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            add_new_columns(conn)
        except BaseException:
            conn.close()
            raise
        self._conn, self._conn_thread = conn, _native_ident()
        return conn

    def _close_db(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _write_rows(self, rows):
        try:
            conn = self._open_db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except _STORE_ERRORS:
            # Reopen next time: the file may have been replaced, or the handle may be broken.
            self._close_db()
            raise

    def _append_fallback(self, batch):
        directory = os.path.dirname(os.path.abspath(self.fallback_path))
        os.makedirs(directory, exist_ok=True)
        data = "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in batch).encode("utf-8")
        with open(self.fallback_path, "ab+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # not in the middle of another process's import (see below)
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    # A torn line from a crash must not swallow the first record appended after it.
                    data = b"\n" + data
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self.fallback_path)

    def _read_fallback(self):
        """(records, skipped) from the fallback file; skipped lists (line number, reason, text)."""
        try:
            with open(self.fallback_path, "rb") as fh:
                return _parse_fallback(fh.read())
        except (FileNotFoundError, NotADirectoryError):
            return [], []

    def _import_fallback(self):
        try:
            fh = open(self.fallback_path, "r+b")
        except (FileNotFoundError, NotADirectoryError):
            return 0, []
        with fh:
            # Held from the read to the truncation: a batch another process appended in between would be lost.
            fcntl.flock(fh, fcntl.LOCK_EX)
            records, skipped = _parse_fallback(fh.read())
            if records:
                self._write_rows([as_row(d) for d in records])
            if records or skipped:
                # Only after the commit: a crash before this point re-imports, and INSERT OR IGNORE dedups.
                fh.truncate(0)
                fh.flush()
                os.fsync(fh.fileno())
        return len(records), skipped

    def _query(self, since):
        rows = {}
        if self._conn is not None or os.path.exists(self.sqlite_path):
            conn = self._open_db()
            sql = "SELECT %s FROM usage" % ", ".join(COLUMNS)
            args = ()
            if since is not None:
                sql += " WHERE started_at >= ?"
                args = (float(since),)
            for values in conn.execute(sql, args):
                d = dict(zip(COLUMNS, values))
                for name in BOOL_COLUMNS:
                    d[name] = bool(d[name])
                rows[d["record_id"]] = d
        pending, _ = self._read_fallback()
        for d in pending:
            if since is None or d["started_at"] >= float(since):
                rows.setdefault(d["record_id"], d)
        return sorted(rows.values(), key=lambda d: (d["started_at"], d["record_id"]))


def _parse_fallback(raw):
    """(records, skipped) from the fallback file's bytes; skipped lists (line number, reason, text)."""
    records, skipped = [], []
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = lineno == len(lines)  # the last piece has no newline: a write cut short
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            records.append(UsageRecord.from_dict(data).to_dict())
        except (ValueError, TypeError) as exc:
            reason = "torn last line" if torn else "unreadable: %s" % exc
            skipped.append((lineno, reason, line[:4096].decode("utf-8", "replace")))
    return records, skipped
