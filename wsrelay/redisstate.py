"""The Redis connection behind the state relay instances share: key leases (:mod:`wsrelay.limits`) and the account
pool's cooldowns, disables and sticky conversations (:mod:`wsrelay.accountsync`).

Redis is an aid, never a dependency of a request: every call is bounded by ``limits.redis_timeout_seconds``
(connect, pool wait and reply together, whatever the client library would retry), and the first failure marks
Redis *down*: one ``limits_redis_unavailable`` trace line, and from then on request paths do not call it at all
(:class:`Unavailable` at once) and go on with local state, until the lease keeper has reconnected and handed its
leases back (``limits_redis_recovered``).  redis-py is pure Python over ``socket``: under gevent's patching a call
waiting on Redis lets every other greenlet run.

A URL's password never leaves this module: traces, ``/readyz`` and errors show :func:`redact` ed URLs only.
"""

import os
import re
import time
import urllib.parse

import gevent

POOL_SIZE = 16  # connections to Redis per process; more calls at once wait (within the timeout) for one


class Unavailable(Exception):
    """Redis cannot be used now: the caller goes on with local state."""


class _Deadline(Exception):
    pass


def redact(url):
    """``url`` with its password (in the userinfo, or redis-py's ``?password=``) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        url = url.replace("//" + parts.netloc, "//%s:***@%s" % (userinfo.partition(":")[0], host), 1)
    if "password" in urllib.parse.parse_qs(parts.query):
        base, _, query = url.partition("?")
        query = [(k, "***" if k == "password" else v) for k, v in urllib.parse.parse_qsl(query, True)]
        url = base + "?" + urllib.parse.urlencode(query, safe="*")
    return url


def _describe(exc, url):
    """A short error text for traces and ``/readyz``, with anything password-like taken out."""
    if isinstance(exc, _Deadline):
        return "timeout"
    text = "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__
    parts = urllib.parse.urlsplit(url)
    passwords = [parts.password] + urllib.parse.parse_qs(parts.query).get("password", [])
    for password in filter(None, passwords):
        text = text.replace(password, "***").replace(urllib.parse.unquote(password), "***")
    return re.sub(r"(rediss?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)[:200]


class SharedRedis:
    """One process's Redis client and whether Redis is usable now (``up``).

    ``run(fn)`` calls ``fn(client)`` when Redis is up, within the timeout; ``attempt(fn)`` does so even when it is
    down (the keeper's reconnect).  Both raise :class:`Unavailable` on any failure, having marked Redis down.
    The client is made on first use in each process: after a fork the child makes its own (sockets are never
    shared between processes)."""

    def __init__(self, url, timeout, prefix, tracer):
        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self.tracer = tracer
        self.up = True  # until a call fails: the first handshakes do not wait for a probe
        self.error = None
        self.down_since = None
        self.outages = 0
        self._client = None
        self._pid = None

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            self._client = self._connect()
            self._pid = os.getpid()
        return self._client

    def _connect(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside redis-py: the relay's answer to a failure is to go local at once, not to try again.
        pool = redis.BlockingConnectionPool.from_url(
            self.url, max_connections=POOL_SIZE, timeout=self.timeout, socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return redis.Redis(connection_pool=pool)

    def key(self, *parts):
        return self.prefix + ":".join(parts)

    def run(self, fn):
        if not self.up:
            raise Unavailable(self.error)
        return self.attempt(fn)

    def attempt(self, fn):
        import redis

        try:
            with gevent.Timeout(self.timeout, _Deadline()):
                return fn(self.client)
        except (_Deadline, redis.RedisError, OSError, ValueError) as exc:
            self.mark_down(exc)
            raise Unavailable(self.error) from None

    def mark_down(self, exc):
        self.error = _describe(exc, self.url)
        if self.up:
            self.up = False
            self.down_since = time.monotonic()
            self.outages += 1
            self.tracer.emit("limits_redis_unavailable", redis=redact(self.url), error=self.error,
                             fallback="local")

    def mark_up(self, leases):
        if not self.up:
            down = time.monotonic() - self.down_since
            self.up, self.error, self.down_since = True, None, None
            self.tracer.emit("limits_redis_recovered", redis=redact(self.url), down_s=round(down, 3),
                             leases=leases)

    def state(self):
        """For ``/readyz``: ``{"redis": "ok"}``, or ``"unreachable"`` with the error and for how long."""
        if self.up:
            return {"redis": "ok"}
        return {"redis": "unreachable", "redis_error": self.error,
                "redis_down_s": round(time.monotonic() - self.down_since, 3)}

    def close(self):
        if self._client is not None and self._pid == os.getpid():
            try:
                self._client.connection_pool.disconnect()
            except Exception:
                pass
        self._client = None
