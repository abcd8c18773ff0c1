"""The usage store's SQLite backend: the embedded default, one file next to the relay.

Its calls block (the disk, a database locked by another writer for up to ``busy_timeout``), so the store runs
them in its thread, never on the hub (``cooperative = False``).
"""

import os
import sqlite3

from gevent.monkey import get_original

from .usage_table import BOOL_COLUMNS, COLUMNS, INSERT, SCHEMA, add_new_columns, as_row

# The store's thread must be told apart from others by its real identity, even when threading is monkey-patched.
_native_ident = get_original("_thread", "get_ident")


class SQLiteBackend:
    cooperative = False
    batch_size = 256
    errors = (sqlite3.Error, OSError)

    def __init__(self, path, busy_timeout=2.0):
        self.path = path
        self.busy_timeout = busy_timeout
        self._conn = None
        self._conn_thread = None

    def describe(self):
        return self.path

    def redact(self, text):
        return text

    def default_fallback_path(self):
        return self.path + ".pending.jsonl"

    def open(self):
        """Connect (creating the file and its directory), then create or migrate the table."""
        if self._conn is not None and self._conn_thread == _native_ident():
            return self._conn
        self.close()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
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

    def close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def write(self, records):
        """Insert ``records`` (dicts) in one transaction; a record_id already stored is skipped."""
        try:
            conn = self.open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(INSERT, [as_row(d) for d in records])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except self.errors:
            # Reopen next time: the file may have been replaced, or the handle may be broken.
            self.close()
            raise

    def query(self, since=None):
        """The stored records (dicts) started at or after ``since``; none if the database does not exist."""
        if self._conn is None and not os.path.exists(self.path):
            return []
        conn = self.open()
        sql = "SELECT %s FROM usage" % ", ".join(COLUMNS)
        args = ()
        if since is not None:
            sql += " WHERE started_at >= ?"
            args = (float(since),)
        out = []
        for values in conn.execute(sql, args):
            d = dict(zip(COLUMNS, values))
            for name in BOOL_COLUMNS:
                d[name] = bool(d[name])
            out.append(d)
        return out
