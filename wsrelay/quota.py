"""Quota hit mid-session: move a WebSocket client to another account instead of failing its turn.

An upstream account that runs out of quota mid-session says so with an ``error`` event — status 429, or code
``rate_limit_exceeded`` / ``insufficient_quota``.  Forwarded, that event ends the client's turn with a usage-limit
message.  When the pool has another account usable now, the session on the exhausted one does not forward it: it
records the turn (terminal event ``error``), cools the account down for the event's Retry-After (else
``upstream.default_cooldown_seconds``) and closes the client with 1013 "try again later", the upstream with 1000.
A client that reconnects — Codex resends a cut turn on a new connection — is dialled to another account.  With
no other account usable the event is forwarded unchanged.

The session gets an :class:`AccountSwitch` (or None) from the server; the switch is the session's one link to the
pool.  A session without one (a pool of one account, or the client's own credential in passthrough) holds
nothing back: its upstream stream runs exactly as it would without this module.
"""

import time

from .accounts import retry_after_seconds

STAGE = "account_quota_exhausted"  # the trace line, and the Exit's stage
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_REASON = "try again later"
QUOTA_CODES = frozenset(("rate_limit_exceeded", "insufficient_quota"))


def exhausted(event):
    """The code of an ``error`` event that says the account is out of quota (``"429"`` for a 429 without a code),
    else None.  ``event`` is a parsed event (a dict)."""
    if event.get("type") != "error":
        return None
    error = event.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, str) or not code:
        code = event.get("code") if isinstance(event.get("code"), str) and event.get("code") else None
    if code in QUOTA_CODES:
        return code
    status = event.get("status", event.get("status_code"))
    if status == 429 and not isinstance(status, bool):
        return code or "429"
    return None


def retry_after(event):
    """The event's Retry-After: its ``headers`` object's ``retry-after`` (any case; the headers an upstream's
    WebSocket error event carries, as Codex reads them), else None."""
    headers = event.get("headers")
    if not isinstance(headers, dict):
        return None
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == "retry-after":
            if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                return value
    return None


class AccountSwitch:
    """What a session on ``account`` may do about a quota error: ask whether another account of ``pool`` is
    usable now, and cool its own account down."""

    def __init__(self, pool, account, default_cooldown, clock=time.monotonic, sync=None):
        self.pool = pool
        self.account = account
        self.default_cooldown = default_cooldown
        self.clock = clock
        self.sync = sync  # the pool's state shared through Redis (wsrelay.accountsync), when it is

    def elsewhere(self):
        """Another account is usable now (a new connection would be dialled to it)."""
        return self.pool.any_usable(self.clock(), {self.account.name})

    def cool_down(self, event, code):
        """Leave the account out of the choice for the event's Retry-After (else the default); the seconds."""
        seconds = retry_after_seconds(retry_after(event), self.default_cooldown)
        self.pool.cool_down(self.account, self.clock(), seconds, code)
        if self.sync is not None:
            self.sync.cooled_down(self.account, seconds, code)  # other instances stop choosing it too
        return seconds


def account_switch(pool, account, relay_credentials, default_cooldown, sync=None):
    """The :class:`AccountSwitch` for a session on ``account``, or None when moving its client could not help:
    the pool has no other account, or the credential upstream is the client's own (``relay_credentials``
    False: every account would get the same one)."""
    if not relay_credentials or not any(a is not account for a in pool.accounts.values()):
        return None
    return AccountSwitch(pool, account, default_cooldown, sync=sync)
