"""Upstream accounts: the pool the relay chooses from at every dial, with cooldowns, disables and stickiness.

Pure: no socket, no timer, no gevent — the time is passed in (``now``, monotonic seconds), so every decision is
tested by calling methods.  The relay asks :meth:`AccountPool.choose` for an account before each upstream dial or
HTTP request, tells it how the attempt went (:meth:`cool_down` on a 429, :meth:`disable` on a 401/403, nothing on a
5xx or a connect failure: those only move the attempt on), and counts live sessions with :meth:`acquire` /
:meth:`release`.

The choice among usable accounts is nginx's smooth weighted round robin: over any run of picks each account gets
its share by weight, evenly interleaved, deterministically.  An account at its ``max_sessions`` is not usable until
a session ends.  A conversation — its ``session-id``, ``thread-id`` or ``x-client-request-id`` header, or its
``prompt_cache_key`` — sticks to the account it was given for ``sticky_ttl`` seconds after its last use, because
``previous_response_id`` and the prompt cache live in one organisation; when that account is not usable, the
conversation moves and the new choice sticks.
"""

import email.utils
import math
import os
import time
from dataclasses import dataclass, field

ACCOUNT_FIELDS = ("name", "url", "http_base_url", "api_key", "api_key_env", "weight", "max_sessions")
DEFAULT = "default"
USABLE, COOLING, DISABLED, FULL = "usable", "cooling_down", "disabled", "full"
STATES = (USABLE, COOLING, DISABLED, FULL)
STICKY_HEADERS = ("session-id", "thread-id", "x-client-request-id")
STICKY_MAX = 100000  # conversations remembered at most (the oldest are forgotten first)


@dataclass
class AccountSpec:
    """One configured account (see ``upstream.accounts``)."""

    name: str
    url: str
    http_base_url: str
    api_key: str = field(default=None, repr=False)
    api_key_env: str = None
    weight: int = 1
    max_sessions: int = None

    def credential(self):
        """The account's key: ``api_key``, else the environment variable ``api_key_env`` names (None if unset)."""
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


@dataclass(eq=False)
class Account:
    """An account's live state in the pool."""

    spec: AccountSpec
    live: int = 0
    cooldown_until: float = 0.0
    disabled_until: float = 0.0
    last_failure: str = None
    current: float = 0.0  # smooth weighted round robin
    removed: bool = False  # dropped by a reload; its live sessions go on

    @property
    def name(self):
        return self.spec.name

    def state(self, now):
        if self.disabled_until > now:
            return DISABLED
        if self.cooldown_until > now:
            return COOLING
        if self.spec.max_sessions is not None and self.live >= self.spec.max_sessions:
            return FULL
        return USABLE


@dataclass
class AccountPool:
    specs: list
    sticky_ttl: float = 3600.0
    accounts: dict = field(default_factory=dict)
    sticky: dict = field(default_factory=dict)  # identity -> (account name, expiry)
    retired: dict = field(default_factory=dict)  # removed accounts with live sessions, by name

    def __post_init__(self):
        self.reload(self.specs)

    def reload(self, specs):
        """Take a new list: accounts that keep their name keep their state (live sessions, cooldowns); removed
        ones stop being chosen, their live sessions go on; conversations stuck to them move at their next use."""
        old = self.accounts
        self.accounts = {}
        for spec in specs:
            account = old.pop(spec.name, None) or self.retired.pop(spec.name, None) or Account(spec)
            account.spec = spec
            account.removed = False
            self.accounts[spec.name] = account
        for account in old.values():
            account.removed = True
            if account.live:
                self.retired[account.name] = account  # re-added later, it keeps counting these sessions
        self.specs = list(specs)

    # -- the choice ----------------------------------------------------------------------------------------

    def choose(self, now, identity=None, exclude=()):
        """The account for a new session or request (None: none is usable).  ``identity`` is the conversation's
        (see :func:`identity`); ``exclude`` the names already tried for this one."""
        if identity is not None:
            stuck = self.sticky.get(identity)
            if stuck is not None and stuck[1] > now:
                account = self.accounts.get(stuck[0])
                if account is not None and account.name not in exclude and account.state(now) == USABLE:
                    return account
        candidates = [a for a in self.accounts.values() if a.name not in exclude and a.state(now) == USABLE]
        if not candidates:
            return None
        total = 0
        best = None
        for account in candidates:
            account.current += account.spec.weight
            total += account.spec.weight
            if best is None or account.current > best.current:
                best = account
        best.current -= total
        return best

    def any_usable(self, now, exclude=()):
        """Whether :meth:`choose` would find an account (without moving the round robin)."""
        return any(a.name not in exclude and a.state(now) == USABLE for a in self.accounts.values())

    def stick(self, identity, account, now):
        """``identity`` goes to ``account`` from now on (for ``sticky_ttl`` after its last use)."""
        if identity is None or self.sticky_ttl <= 0:
            return
        self.sticky.pop(identity, None)  # re-inserted last: the dict's order is the order of last use
        self.sticky[identity] = (account.name, now + self.sticky_ttl)
        if len(self.sticky) > STICKY_MAX:
            self.expire(now)
            while len(self.sticky) > STICKY_MAX:
                del self.sticky[next(iter(self.sticky))]

    def expire(self, now):
        for identity in [i for i, (_, until) in self.sticky.items() if until <= now]:
            del self.sticky[identity]

    # -- what happened -------------------------------------------------------------------------------------

    def acquire(self, account):
        account.live += 1

    def release(self, account):
        account.live = max(0, account.live - 1)

    def cool_down(self, account, now, seconds, why="429"):
        """The account hit a rate limit: not chosen for ``seconds``."""
        account.cooldown_until = max(account.cooldown_until, now + max(0.0, seconds))
        account.last_failure = why

    def disable(self, account, now, seconds, why="401"):
        """The account's credential was refused: not chosen for ``seconds``.  Returns True the first time (the
        caller logs it once), False while it is already disabled."""
        first = account.disabled_until <= now
        account.disabled_until = now + max(0.0, seconds)
        account.last_failure = why
        return first

    # -- what other relay instances learnt (see wsrelay.accountsync) ----------------------------------------

    def learn(self, name, cooldown_until=None, disabled_until=None, why=None):
        """Another instance cooled ``name`` down or disabled it until then (monotonic, like ``now``): the later
        end wins, so what this instance learnt itself is never shortened."""
        account = self.accounts.get(name)
        if account is None:
            return
        if cooldown_until is not None and cooldown_until > account.cooldown_until:
            account.cooldown_until = cooldown_until
            account.last_failure = why or account.last_failure
        if disabled_until is not None and disabled_until > account.disabled_until:
            account.disabled_until = disabled_until
            account.last_failure = why or account.last_failure

    def learn_sticky(self, identity, name, until):
        """Another instance (or this one) last gave ``identity`` to ``name``; it sticks there until ``until``."""
        if identity is None or self.sticky_ttl <= 0:
            return
        self.sticky.pop(identity, None)
        self.sticky[identity] = (name, until)
        if len(self.sticky) > STICKY_MAX:
            del self.sticky[next(iter(self.sticky))]

    # -- what the operator sees ----------------------------------------------------------------------------

    def ready(self, now):
        return any(a.state(now) in (USABLE, FULL) for a in self.accounts.values())

    def retry_after(self, now):
        """Seconds until an account may be usable again (at least 1)."""
        ends = [until for a in self.accounts.values() for until in (a.cooldown_until, a.disabled_until)
                if until > now]
        return max(1, int(round(min(ends) - now))) if ends else 1

    def status(self, now, wall=None):
        """Each account's state for ``GET /accounts``: never a credential."""
        wall = time.time() if wall is None else wall
        out = []
        for account in self.accounts.values():
            spec = account.spec
            until = max(account.cooldown_until, account.disabled_until)
            out.append({
                "name": spec.name, "state": account.state(now), "live_sessions": account.live,
                "max_sessions": spec.max_sessions, "weight": spec.weight,
                "until": round(wall + until - now, 3) if until > now else None,
                "last_failure": account.last_failure, "url": spec.url, "http_base_url": spec.http_base_url,
                "credential": "set" if spec.credential() else "missing",
            })
        return out


def identity(key_id, headers, body=None):
    """A conversation's identity for stickiness: the relay key's id with the first of ``session-id``,
    ``thread-id``, ``x-client-request-id`` (``headers`` maps lower-case names to values), else with the
    request body's ``prompt_cache_key`` (``body``: the value, already found); None when there is none."""
    for name in STICKY_HEADERS:
        value = headers.get(name)
        if value:
            return (key_id, name, value[:256])
    if body:
        return (key_id, "prompt_cache_key", body[:256])
    return None


def retry_after_seconds(value, default, now_wall=None):
    """A ``Retry-After`` value — delay seconds or an HTTP date — as seconds from now; ``default`` when absent
    or unreadable (``inf`` and ``nan`` included: an upstream's header must not bench an account for ever)."""
    if value is None:
        return default
    value = str(value).strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else default
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return default
    if when is None:
        return default
    now_wall = time.time() if now_wall is None else now_wall
    return max(0.0, when.timestamp() - now_wall)


def parse_specs(values):
    """``(specs, problems)`` from validated settings (``config.values``): ``upstream.accounts``, or the implicit
    ``default`` account.  Problems name the account and the field, never a credential's value."""
    from .config import http_base_url

    top_url = values["upstream.url"]
    top_base = values["upstream.http_base_url"]
    raw = values["upstream.accounts"]
    if not raw:
        return [AccountSpec(DEFAULT, top_url, (top_base or http_base_url(top_url)).rstrip("/"),
                            values["upstream.api_key"], values["upstream.api_key_env"])], []
    problems, specs, names = [], [], set()
    if not values["auth.keys"]:
        problems.append("upstream.accounts: needs auth.keys (without relay keys each client's own credential "
                        "goes upstream, and the accounts' keys would be anyone's)")
    for index, item in enumerate(raw):
        where = "upstream.accounts[%d]" % index
        unknown = sorted(set(item) - set(ACCOUNT_FIELDS))
        if unknown:
            problems.append("%s: unknown field %s" % (where, ", ".join(map(str, unknown))))
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append("%s: needs a name" % where)
            continue
        where = "upstream.accounts[%s]" % name
        if name in names:
            problems.append("%s: the name is used twice" % where)
        names.add(name)
        texts = {}
        for key in ("url", "http_base_url", "api_key", "api_key_env"):
            value = item.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append("%s: %s must be a non-empty string" % (where, key))
                value = None
            texts[key] = value
        url = texts["url"] or top_url
        if not url.startswith(("ws://", "wss://")):
            problems.append("%s: url must start with ws:// or wss://" % where)
        base = texts["http_base_url"] or (http_base_url(url) if texts["url"] else top_base or http_base_url(url))
        if not base.startswith(("http://", "https://")):
            problems.append("%s: http_base_url must start with http:// or https://" % where)
        numbers = {}
        for key, default in (("weight", 1), ("max_sessions", None)):
            value = item.get(key, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append("%s: %s must be an integer of at least 1" % (where, key))
                value = default
            numbers[key] = value
        spec = AccountSpec(name, url, base.rstrip("/"), texts["api_key"], texts["api_key_env"], **numbers)
        if not spec.api_key and not spec.api_key_env:
            problems.append("%s: needs api_key or api_key_env" % where)
        elif not spec.credential():
            problems.append("%s: the environment variable %s is not set" % (where, spec.api_key_env))
        specs.append(spec)
    return specs, problems
