"""The account pool's state shared between relay instances through Redis (``limits.redis_url`` with
``upstream.accounts``): cooldowns, disables and the account each conversation sticks to.

What one instance learns — an account answered 429 (cooldown) or refused its credential (disable), or a
conversation was given an account — is written to Redis, and every choice of every instance reads it back first,
so an account cooled down through one instance is not chosen by the others, and a conversation keeps its account
whichever instance it reaches.  The pool (:mod:`wsrelay.accounts`) stays pure: this module does the I/O and feeds
it (:meth:`~wsrelay.accounts.AccountPool.learn`, :meth:`~wsrelay.accounts.AccountPool.learn_sticky`).

Keys, under ``limits.redis_key_prefix``; each expires when what it says ends, and times travel as the time left
(``PX``/``PTTL``), never as a clock reading, so the instances' clocks do not matter:

* ``account:<name>:cooldown`` and ``account:<name>:disabled`` — the reason (``429``, ``401``, ...), only ever
  extended (a shorter cooldown never cuts a longer one);
* ``sticky:<digest>`` — the account's name; the digest is of the conversation's identity (the relay key's id and
  its ``session-id``/... value), so neither appears in Redis.

A choice reads all of it in one pipelined round trip, bounded by ``limits.redis_timeout_seconds``.  While Redis
is down (:mod:`wsrelay.redisstate`) nothing is read or written: each instance goes on with what it learnt itself.
"""

import hashlib
import json
import time

from .redisstate import Unavailable

KINDS = ("cooldown", "disabled")

# KEYS[1]; ARGV: the value, the time left in ms.  Sets the key unless it already lasts longer.
EXTEND = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return false
"""


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class AccountSync:
    """Reads and writes the pool's shared state; every method is a no-op while Redis is down."""

    def __init__(self, pool, redis):
        self.pool = pool
        self.redis = redis
        self._extend = (None, None)

    def sharing_sticky(self):
        return self.pool.sticky_ttl > 0 and len(self.pool.accounts) > 1

    def sticky_key(self, identity):
        digest = hashlib.sha256(json.dumps(list(identity)).encode("utf-8")).hexdigest()[:32]
        return self.redis.key("sticky", digest)

    def pull(self, identity=None):
        """Feed the pool the accounts' shared cooldowns and disables, and ``identity``'s shared account.  Returns
        whether Redis answered."""
        if not self.redis.up:
            return False
        names = list(self.pool.accounts)
        keys = [self.redis.key("account", name, kind) for name in names for kind in KINDS]
        if identity is not None and self.sharing_sticky():
            keys.append(self.sticky_key(identity))
        else:
            identity = None

        def read(client):
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            return pipe.execute()

        try:
            replies = self.redis.run(read)
        except Unavailable:
            return False
        now = time.monotonic()
        found = {}
        for index, key in enumerate(keys):
            value, left = replies[2 * index], replies[2 * index + 1]
            if value is not None and left is not None and left > 0:
                found[key] = (_text(value), now + left / 1000.0)
        for name in names:
            for kind in KINDS:
                hit = found.get(self.redis.key("account", name, kind))
                if hit is not None:
                    why, until = hit
                    self.pool.learn(name, why=why, **{kind + "_until": until})
        if identity is not None and keys[-1] in found:
            name, until = found[keys[-1]]
            self.pool.learn_sticky(identity, name, until)
        return True

    def cooled_down(self, account, seconds, why="429"):
        self._extend_key(self.redis.key("account", account.name, "cooldown"), why, seconds)

    def disabled(self, account, seconds, why="401"):
        self._extend_key(self.redis.key("account", account.name, "disabled"), why, seconds)

    def stuck(self, identity, account):
        """``identity`` went to ``account``: every instance sends it there for ``sticky_ttl`` from now."""
        if identity is None or not self.sharing_sticky():
            return
        key, ttl_ms = self.sticky_key(identity), int(self.pool.sticky_ttl * 1000)
        self._write(lambda client: client.set(key, account.name, px=ttl_ms))

    def _extend_key(self, key, value, seconds):
        ms = int(seconds * 1000)
        if ms <= 0:
            return

        def extend(client):
            if self._extend[0] is not client:
                self._extend = (client, client.register_script(EXTEND))
            return self._extend[1](keys=[key], args=[value, ms], client=client)

        self._write(extend)

    def _write(self, fn):
        if not self.redis.up:
            return
        try:
            self.redis.run(fn)
        except Unavailable:
            pass
