"""The usage store's PostgreSQL backend (psycopg 3): one database for several workers and hosts.

psycopg 3.1.14 and later wait through the ``select`` module when gevent has patched it, so a query waits on the
hub like any socket read and the store calls this backend on the hub (``cooperative = True``): a slow query or a
slow network stalls the writer greenlet only.  psycopg must be imported after the patching (wsrelay's entry points
patch first); :meth:`PostgresBackend.open` refuses to run on a psycopg that would block the hub.  Every call is
bounded by ``timeout``; past it the connection is dropped and the batch goes to the fallback file.

A batch is one statement: the records as one JSON array, unpacked by ``json_populate_recordset`` and inserted with
``ON CONFLICT (record_id) DO NOTHING``, which keeps the work done on the hub small (one ``json.dumps``; batches
are small, see ``batch_size``) and makes every insert idempotent.  The table is created, and the columns of
newer record fields added, under an advisory lock, so workers starting together do not race on the DDL.
"""

import json
import os

import gevent
import gevent.lock
import psycopg
from psycopg import waiting
from psycopg.conninfo import conninfo_to_dict

from . import dburl
from .usage_table import COLUMNS, create_table, missing_columns


class DatabaseTimeout(Exception):
    """A PostgreSQL call took longer than the backend's timeout."""


_COLUMN_LIST = ", ".join(COLUMNS)
_INSERT = ("INSERT INTO usage (%s) SELECT %s FROM json_populate_recordset(NULL::usage, %%s::json) "
           "ON CONFLICT (record_id) DO NOTHING" % (_COLUMN_LIST, _COLUMN_LIST))
_SELECT = "SELECT %s FROM usage" % _COLUMN_LIST
_SCHEMA_LOCK = 0x77737265  # the advisory lock wsrelay's DDL takes (any constant of its own)

# Connections made before a fork: the child must neither use nor close them (closing tells the server to end the
# parent's session), so they are kept referenced here for the life of the process.
_inherited = []


def _blocks_the_hub():
    wait_c = getattr(waiting, "wait_c", None)
    return wait_c is not None and waiting.wait is wait_c


class PostgresBackend:
    cooperative = True
    # The records of a batch are turned into one JSON text on the hub: 64 cost about 1 ms of its CPU (256 about
    # 2 ms, which a busy machine stretches towards the 5 ms a frame may wait), and still make over 10 000 a second.
    batch_size = 64
    errors = (psycopg.Error, OSError, DatabaseTimeout)

    def __init__(self, url, timeout=10.0, connect_timeout=5):
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conn = None
        self._pid = None
        self._lock = gevent.lock.RLock()  # one call at a time: the writer, a query and close() share the connection

    def describe(self):
        return dburl.redact(self.url)

    def redact(self, text):
        return dburl.scrub(text, self.url)

    def default_fallback_path(self):
        return None

    def _bounded(self, fn, *args):
        with self._lock:
            try:
                with gevent.Timeout(self.timeout, DatabaseTimeout("no answer from PostgreSQL within %gs"
                                                                   % self.timeout)):
                    return fn(*args)
            except self.errors:
                self._drop()  # a connection cut short mid-exchange cannot be trusted with the next one
                raise

    def open(self):
        """Connect, then create or migrate the table."""
        return self._bounded(self._open)

    def _open(self):
        if self._conn is not None and self._pid != os.getpid():
            _inherited.append(self._conn)
            self._conn = None
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if _blocks_the_hub():
            raise RuntimeError("psycopg was imported before gevent patched the standard library: its waits would "
                               "block every session (import wsrelay's entry point first)")
        conn = psycopg.connect(self.url, autocommit=True, **self.connect_defaults())
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in create_table("postgresql").split(";"):
                    if statement.strip():
                        conn.execute(statement)
                have = {row[0] for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = 'usage'")}
                for statement in missing_columns(have, "postgresql"):
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def connect_defaults(self):
        """What the connection gets unless the URL says otherwise: ``connect_timeout`` and ``application_name``."""
        given = conninfo_to_dict(self.url)
        defaults = {"connect_timeout": self.connect_timeout, "application_name": "wsrelay"}
        return {k: v for k, v in defaults.items() if k not in given}

    def _drop(self):
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pid != os.getpid():
            _inherited.append(conn)
            return
        try:
            conn.close()
        except Exception:
            pass

    def close(self):
        with self._lock:
            self._drop()

    def write(self, records):
        """Insert ``records`` (dicts) in one statement; a record_id already stored is skipped."""
        payload = json.dumps(records, separators=(",", ":"))
        self._bounded(lambda: self._open().execute(_INSERT, (payload,)))

    def query(self, since=None):
        """The stored records (dicts) started at or after ``since``."""
        def run():
            if since is None:
                rows = self._open().execute(_SELECT).fetchall()
            else:
                rows = self._open().execute(_SELECT + " WHERE started_at >= %s", (float(since),)).fetchall()
            return [dict(zip(COLUMNS, row)) for row in rows]

        return self._bounded(run)
