"""A private Redis for the tests: Debian's ``redis-server`` on a free 127.0.0.1 port with a temporary directory,
no persistence (``--save '' --appendonly no``), never the system service.  ``bin/run-tests`` installs the package
when it is missing; without it the tests that need Redis fail with :data:`REDIS_MISSING_MESSAGE`.

A test can take Redis away the two ways production does: :meth:`RedisServer.pause` (SIGSTOP: connections are
accepted and never answered, so only timeouts save the caller) and :meth:`RedisServer.stop` (the port refuses);
:meth:`RedisServer.resume` and :meth:`RedisServer.start` bring it back on the same port.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.helpers import free_port

REDIS_MISSING_MESSAGE = ("redis-server was not found (neither on PATH nor at /usr/bin/redis-server); run "
                         "bin/run-tests, which installs Debian's redis-server and then runs the tests")


def redis_binary():
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK)
                                            else None)


class RedisServer:
    def __init__(self, password=None):
        self.binary = redis_binary()
        if self.binary is None:
            raise RuntimeError(REDIS_MISSING_MESSAGE)
        self.dir = tempfile.mkdtemp(prefix="wsrelay-redis-")
        self.port = free_port()
        self.password = password
        self.proc = None
        self.paused = False

    @property
    def url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

    def start(self, timeout=10.0):
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited %s: %s" % (self.proc.returncode, self.log()))
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer on port %d: %s" % (self.port, self.log()))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout=1.0):
        """A redis-py client of its own (for the test to look at or change what the relay wrote)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def ping(self):
        import redis

        client = self.client()
        try:
            return client.ping()
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def flush(self):
        client = self.client()
        client.flushall()
        client.close()

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self):
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
