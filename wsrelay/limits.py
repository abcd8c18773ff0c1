"""Per-key limits: how many WebSocket sessions and HTTP requests in flight one relay key may hold at once
(``gateway.openai_ws.max_ingress_connections_per_api_key``).

One interface, two implementations.  ``acquire(key_id, limit)`` returns ``(lease, held)``: a :class:`Lease` to
give back with ``release(lease)`` when the session or request ends, or None when the key already holds ``limit``
(``held`` is the count the decision saw, for the refusal).  ``start()``, ``close()`` and ``state()`` (the
``/readyz`` detail) complete it.

* :class:`LocalLimits` counts in this process: each instance has its own limit.
* :class:`RedisLimits` (``limits.redis_url``) holds a lease in Redis per session: a sorted set per key id whose
  members are leases scored by their expiry (Redis's own clock, so instances' clocks do not matter).  A Lua
  script drops the expired members, counts the rest and adds the new one only under the limit — one atomic
  step, so two instances can never both take the last slot.  One keeper greenlet per process renews all of its
  live leases every third of ``limits.lease_ttl_seconds`` in one pipeline and takes released ones out; an
  instance killed without a word stops renewing, and its leases expire by themselves within the TTL.
  When Redis fails (see :mod:`wsrelay.redisstate`) the same instance goes on counting locally — its local count
  includes the sessions it admitted through Redis — until the keeper reconnects, hands every live lease back to
  Redis and only then makes acquires shared again.

The keeper is the only writer besides ``acquire``: renewals, removals and the re-registration after an outage go
through it in order, so a lease released during a renewal can never be written back after its removal.
"""

import collections
import importlib.util
import itertools
import os
import time
import uuid

import gevent
import gevent.event

from .redisstate import SharedRedis, Unavailable

RETRY_INTERVAL = 1.0  # while Redis is down, the keeper tries to reconnect this often (or every third of the TTL)

# KEYS[1]: the key's lease set; ARGV: the lease, the limit, the TTL in ms.  Returns {admitted (0/1), held}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {1, held + 1}
"""

# KEYS[1]: the key's lease set; ARGV: the TTL in ms, then the leases this instance holds on it (written back if
# they had expired meanwhile: the sessions are alive).  The set itself expires with its last lease.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return #ARGV - 1
"""


class Lease:
    """One admitted session or request: its key id, and its member in Redis (None for a local limit)."""

    __slots__ = ("key_id", "member")

    def __init__(self, key_id, member=None):
        self.key_id = key_id
        self.member = member


class LocalLimits:
    """Counters in this process."""

    shared = False

    def __init__(self):
        self.per_key = collections.Counter()

    def acquire(self, key_id, limit):
        held = self.per_key[key_id]
        if held >= limit:
            return None, held
        self.per_key[key_id] += 1
        return Lease(key_id), held + 1

    def release(self, lease):
        self.per_key[lease.key_id] -= 1
        if self.per_key[lease.key_id] <= 0:
            del self.per_key[lease.key_id]

    def start(self):
        pass

    def close(self):
        pass

    def state(self):
        return {"limits": "local"}


class RedisLimits(LocalLimits):
    """Leases in Redis with a TTL, renewed by one keeper greenlet; local counting while Redis is down."""

    shared = True

    def __init__(self, redis, ttl, tracer):
        super().__init__()
        self.redis = redis
        self.ttl = ttl
        self.ttl_ms = max(1, int(ttl * 1000))
        self.tracer = tracer
        self._pid = None
        self._keeper = None
        self._reset()

    def _reset(self):
        """This process's own state: after a fork the child holds no lease and renews nothing of its parent's."""
        self.instance = "%s-%d" % (uuid.uuid4().hex[:12], os.getpid())
        self._seq = itertools.count(1)
        self.live = {}  # member -> Lease
        self.per_key = collections.Counter()
        self._removals = []  # (set key, member, when queued): to take out of Redis
        self._wake = gevent.event.Event()
        self._keeper = None
        self._scripts = (None, None, None)
        self._pid = os.getpid()

    def start(self):
        if self._pid != os.getpid():
            self._reset()
        if self._keeper is None or self._keeper.dead:
            self._keeper = gevent.spawn(self._keep)

    def _key(self, key_id):
        return self.redis.key("lease", key_id or "-")

    def _script(self, client, which):
        if self._scripts[0] is not client:
            self._scripts = (client, client.register_script(ACQUIRE), client.register_script(RENEW))
        return self._scripts[1 if which == "acquire" else 2]

    # -- the interface ----------------------------------------------------------------------------------------

    def acquire(self, key_id, limit):
        self.start()
        if self.redis.up:
            member = self._member()
            key = self._key(key_id)
            try:
                admitted, held = self.redis.run(lambda client: self._script(client, "acquire")(
                    keys=[key], args=[member, limit, self.ttl_ms], client=client))
            except Unavailable:
                self._queue_removal(key, member)  # the script may have run before its answer was lost
            else:
                if not admitted:
                    return None, int(held)
                self._hold(Lease(key_id, member))
                return self.live[member], int(held)
        held = self.per_key[key_id]
        if held >= limit:
            return None, held
        lease = Lease(key_id, self._member())
        self._hold(lease)
        return lease, held + 1

    def release(self, lease):
        if self.live.pop(lease.member, None) is None:
            return  # not this process's (taken before a fork)
        self.per_key[lease.key_id] -= 1
        if self.per_key[lease.key_id] <= 0:
            del self.per_key[lease.key_id]
        self._queue_removal(self._key(lease.key_id), lease.member)

    def state(self):
        state = {"limits": "redis" if self.redis.up else "local", "leases": len(self.live)}
        state.update(self.redis.state())
        return state

    def close(self):
        """Stop the keeper and take this process's leases out of Redis (bounded: a dead Redis expires them)."""
        if self._pid != os.getpid():
            return
        if self._keeper is not None:
            self._keeper.kill()
            self._keeper = None
        for lease in list(self.live.values()):
            self.release(lease)
        if self._removals and self.redis.up:
            try:
                self._sync(renew=False)
            except Unavailable:
                pass
        self.redis.close()

    # -- the keeper ---------------------------------------------------------------------------------------------

    def _member(self):
        return "%s:%d" % (self.instance, next(self._seq))

    def _hold(self, lease):
        self.live[lease.member] = lease
        self.per_key[lease.key_id] += 1

    def _queue_removal(self, key, member):
        self._removals.append((key, member, time.monotonic()))
        self._wake.set()

    def _keep(self):
        interval = self.ttl / 3.0
        due = time.monotonic()  # a first sync at once: it finds out whether Redis answers
        while True:
            if self.redis.up:
                self._wake.wait(max(0.0, due - time.monotonic()))
            else:
                gevent.sleep(min(interval, RETRY_INTERVAL))
            self._wake.clear()
            try:
                if not self.redis.up:
                    held = self._sync(renew=True, reconnect=True)
                    self.redis.mark_up(held)
                    due = time.monotonic() + interval
                elif time.monotonic() >= due:
                    self._sync(renew=True)
                    due = time.monotonic() + interval
                elif self._removals:
                    self._sync(renew=False)
            except Unavailable:
                pass
            except Exception as exc:  # a bug must not end the renewals: they are what keeps the leases
                self.tracer.emit("limits_keeper_error", error="%s: %s" % (type(exc).__name__, exc))
                gevent.sleep(min(interval, RETRY_INTERVAL))

    def _sync(self, renew, reconnect=False):
        """One pipeline: the queued removals, then (``renew``) every live lease with a fresh expiry.  Returns the
        number of leases renewed.  Raises :class:`Unavailable`, the removals kept for the next try."""
        removals, self._removals = self._removals, []
        by_key = collections.defaultdict(list)
        if renew:
            for lease in list(self.live.values()):
                by_key[self._key(lease.key_id)].append(lease.member)
        gone = collections.defaultdict(list)
        for key, member, _ in removals:
            gone[key].append(member)

        def send(client):
            pipe = client.pipeline(transaction=False)
            for key, members in gone.items():
                pipe.zrem(key, *members)
            for key, members in by_key.items():
                self._script(client, "renew")(keys=[key], args=[self.ttl_ms] + members, client=pipe)
            if not gone and not by_key:
                pipe.ping()
            pipe.execute()

        try:
            (self.redis.attempt if reconnect else self.redis.run)(send)
        except BaseException:
            # Lost removals would stay in Redis until their TTL: keep the ones that have not expired by now.
            cutoff = time.monotonic() - self.ttl
            self._removals[:0] = [removal for removal in removals if removal[2] > cutoff]
            raise
        return sum(len(members) for members in by_key.values())


def check_settings(values):
    """Problems with the ``limits.*`` settings (``config.values``), one message each; never the URL itself."""
    problems = []
    url = values["limits.redis_url"]
    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("limits.redis_url: must start with redis://, rediss:// or unix://")
        elif importlib.util.find_spec("redis") is None:
            problems.append("limits.redis_url: needs the redis package: pip install 'wsrelay[redis]'")
    ttl, timeout = values["limits.lease_ttl_seconds"], values["limits.redis_timeout_seconds"]
    if timeout * 3 >= ttl:
        problems.append("limits.redis_timeout_seconds: must be under a third of limits.lease_ttl_seconds (%s), "
                        "or a slow renewal would let leases expire, got %s" % (ttl, timeout))
    if not values["limits.redis_key_prefix"]:
        problems.append("limits.redis_key_prefix: must not be empty")
    return problems


def make(config, tracer):
    """``(limits, redis)`` for a configuration: :class:`RedisLimits` and its :class:`SharedRedis` when
    ``limits.redis_url`` is set, else :class:`LocalLimits` and None."""
    settings = config.limits
    if not settings.redis_url:
        return LocalLimits(), None
    redis = SharedRedis(settings.redis_url, settings.redis_timeout_seconds, settings.redis_key_prefix, tracer)
    return RedisLimits(redis, settings.lease_ttl_seconds, tracer), redis
