"""A private PostgreSQL server for the tests and the bench, never the system's service.

``PrivatePostgres`` runs Debian's ``initdb`` and ``pg_ctl`` (``/usr/lib/postgresql/<version>/bin``) on a data
directory of its own in a fresh temporary directory, listening on a free port of 127.0.0.1 with its Unix socket in
that directory, and removes it all at :meth:`PrivatePostgres.destroy`.  The server refuses to run as root, so as
root the directory is handed to the ``postgres`` user and the tools run as that user (``runuser -u postgres``).
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

from tests.helpers import free_port

INSTALL_HINT = ("PostgreSQL's server programs (initdb, pg_ctl) were not found under /usr/lib/postgresql/*/bin: "
                "install Debian's 'postgresql' package (bin/run-tests installs it when run as root)")


class PostgresMissing(RuntimeError):
    """No PostgreSQL server programs on this machine."""


def server_bin_dir():
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl``, else None."""
    found = []
    for bindir in glob.glob("/usr/lib/postgresql/*/bin"):
        version = os.path.basename(os.path.dirname(bindir))
        if all(os.access(os.path.join(bindir, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            try:
                found.append((float(version), bindir))
            except ValueError:
                continue
    return max(found)[1] if found else None


class PrivatePostgres:
    """One PostgreSQL server: :meth:`start`, :meth:`stop` (and :meth:`start` again, same data and port),
    :meth:`destroy`.  ``url`` reaches its ``postgres`` database as the superuser ``wsrelay`` (trust auth on
    127.0.0.1 only); :meth:`create_database` makes a database of one's own.

    ``durable=False`` (the tests) turns fsync off: the data need not survive a power cut, and the tests run
    faster; the bench keeps PostgreSQL's defaults.
    """

    user = "wsrelay"

    def __init__(self, durable=False, settings=None):
        self.bindir = server_bin_dir()
        if self.bindir is None:
            raise PostgresMissing(INSTALL_HINT)
        self.durable = durable
        self.settings = dict(settings or {})
        self.base = tempfile.mkdtemp(prefix="wsrelay-pg-")
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "sock")
        self.log = os.path.join(self.base, "postgres.log")
        os.mkdir(self.socket_dir)
        self.port = None
        self._as = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in (self.base, self.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._initialised = False

    @property
    def url(self):
        return self.url_for("postgres")

    def url_for(self, database, password=None):
        auth = self.user if password is None else "%s:%s" % (self.user, password)
        return "postgresql://%s@127.0.0.1:%d/%s" % (auth, self.port, database)

    def _run(self, tool, *args, timeout=60):
        argv = self._as + [os.path.join(self.bindir, tool)] + list(args)
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              cwd=self.base, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError("%s failed (exit %d):\n%s\n%s" % (tool, proc.returncode, proc.stdout[-3000:],
                                                                 self.log_tail()))
        return proc.stdout

    def log_tail(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def start(self):
        if not self._initialised:
            self._run("initdb", "-D", self.data, "-U", self.user, "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
            self._initialised = True
        if self.port is None:
            self.port = free_port()
        options = {"listen_addresses": "127.0.0.1", "port": self.port, "unix_socket_directories": self.socket_dir,
                   "max_connections": 200}
        if not self.durable:
            options.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        options.update(self.settings)
        opts = " ".join("-c %s=%s" % (k, v) for k, v in options.items())
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start", timeout=90)
        return self

    def running(self):
        return self._initialised and os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def stop(self, mode="fast"):
        """Stop the server (``fast``: sessions are ended, data kept); :meth:`start` brings it back."""
        if self.running():
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", timeout=90)

    def destroy(self):
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def create_database(self, name):
        """A fresh database ``name``; returns its URL."""
        self.execute("postgres", 'CREATE DATABASE "%s"' % name)
        return self.url_for(name)

    def execute(self, database, statement, args=None):
        """Run one statement on ``database`` (autocommit); its rows, if it returns any."""
        import psycopg

        with psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else None
