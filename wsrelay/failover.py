"""One client request's way through the account pool: which account to try next, and what a failure does.

Both transports dial the same way: ask :meth:`Attempts.next` for an account, try it, and on a failure ask
:meth:`Attempts.failed` whether another account may be tried — before anything has been sent to the client.
A 429 cools the account down for its ``Retry-After`` and a 401/403 disables it, both only when the credential is
the relay's (in passthrough they are the client's own); 429, 401/403, 500-504 and connect failures move the
request on, at most ``upstream.max_failover_attempts`` times.  Every decision is one trace line
(``account_dial``), which the metrics count per account.
"""

import time

from .accounts import retry_after_seconds
from .httproutes import Refusal

FAILOVER_UPSTREAM_STATUSES = frozenset((429, 401, 403, 500, 501, 502, 503, 504))
# The relay's own statuses for an upstream it could not reach or that was too slow, or busy (HTTP pool).
FAILOVER_RELAY_STATUSES = frozenset((502, 503, 504))


def outcome_of(status, upstream_status):
    if upstream_status == 429:
        return "rate_limited"
    if upstream_status in (401, 403):
        return "auth_failed"
    if upstream_status is not None and 500 <= upstream_status <= 504:
        return "server_error"
    if upstream_status is None and status == 504:
        return "timeout"
    if upstream_status is None and status in FAILOVER_RELAY_STATUSES:
        return "unreachable"
    return "refused"


class Attempts:
    """The accounts tried for one session or request (``app``: the RelayApp; ``identity``: the conversation's)."""

    def __init__(self, app, key_id, identity, relay_credentials, transport):
        self.app = app
        self.pool = app.pool
        self.sync = app.account_sync  # None unless the pool's state is shared through Redis
        self.upstream = app.config.upstream
        self.key_id = key_id
        self.identity = identity
        self.relay_credentials = relay_credentials  # False in passthrough: a 401 is the client's, not ours
        self.transport = transport
        self.tried = []
        self.left = 1 + self.upstream.max_failover_attempts
        self.reserved = None  # the account counted for this session or request (see release)

    def next(self):
        """The account to try now, or None when none is left (see :meth:`refusal`)."""
        if self.left <= 0:
            return None
        self.release()
        if self.sync is not None:
            self.sync.pull(self.identity)  # what other instances learnt, before choosing
        account = self.pool.choose(time.monotonic(), self.identity, {a.name for a in self.tried})
        if account is not None:
            self.left -= 1
            self.tried.append(account)
            # Counted from the choice, not from the dial's success: concurrent dials must see it (max_sessions).
            self.pool.acquire(account)
            self.reserved = account
        return account

    def release(self):
        """End the current account's count (the session or request is over, or its attempt failed)."""
        if self.reserved is not None:
            self.pool.release(self.reserved)
            self.reserved = None

    def failed(self, account, status, upstream_status=None, retry_after=None, error=None, can_retry=True):
        """The attempt on ``account`` failed: ``status`` is what the client would get, ``upstream_status`` the
        upstream's answer (None: not reached); ``can_retry`` False when the request cannot be sent again (a
        streamed body).  Returns True when another account may be tried."""
        now = time.monotonic()
        self.release()
        outcome = outcome_of(status, upstream_status)
        fields = {}
        if outcome == "rate_limited" and self.relay_credentials:
            # In passthrough the limit is the client's own credential's: other clients must still get through.
            seconds = retry_after_seconds(retry_after, self.upstream.default_cooldown_seconds)
            self.pool.cool_down(account, now, seconds, "429")
            if self.sync is not None:
                self.sync.cooled_down(account, seconds, "429")
            fields["cooldown_s"] = round(seconds, 3)
        elif outcome == "auth_failed" and self.relay_credentials:
            if self.sync is not None:
                self.sync.disabled(account, self.upstream.auth_failure_disable_seconds, str(upstream_status))
            if self.pool.disable(account, now, self.upstream.auth_failure_disable_seconds, str(upstream_status)):
                self.app.tracer.emit("account_disabled", account=account.name, status=upstream_status,
                                     disabled_s=self.upstream.auth_failure_disable_seconds)
        movable = outcome != "refused" and (outcome != "auth_failed" or self.relay_credentials)
        again = (movable and can_retry and self.left > 0
                 and self.pool.any_usable(now, {a.name for a in self.tried}))
        self.app.tracer.emit("account_dial", account=account.name, outcome=outcome, status=status,
                             upstream_status=upstream_status, transport=self.transport, failover=again,
                             key_id=self.key_id, error=error, **fields)
        return again

    def succeeded(self, account):
        self.pool.stick(self.identity, account, time.monotonic())
        if self.sync is not None:
            self.sync.stuck(self.identity, account)
        self.app.tracer.emit("account_dial", account=account.name, outcome="ok", transport=self.transport,
                             key_id=self.key_id, attempt=len(self.tried))

    def refusal(self):
        """What the client gets when no account could even be tried: 503 with the time until one may be."""
        retry = self.pool.retry_after(time.monotonic())
        self.app.tracer.emit("account_unavailable", key_id=self.key_id, transport=self.transport,
                             tried=len(self.tried), retry_after_s=retry)
        return Refusal(503, "no_upstream_account", "no upstream account is usable now; retry later",
                       [("Retry-After", str(retry))])


def credential_header(account, passthrough_authorization):
    """The Authorization the upstream gets: the client's own in passthrough, else the account's key.  Raises
    :class:`Refusal` (503) when the account has no credential."""
    if passthrough_authorization is not None:
        return passthrough_authorization or None
    key = account.spec.credential()
    if not key:
        raise Refusal(503, "upstream_credential_missing", "the relay has no upstream credential configured")
    return "Bearer " + key
