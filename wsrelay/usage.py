"""Turn upstream Responses events into exactly one usage record per response.

Pure bookkeeping: no sockets, no gevent.  The relay feeds it the client's ``response.create`` messages
(:meth:`TurnLedger.start_turn`) and the upstream's ``response.created`` and terminal events
(:meth:`TurnLedger.on_event`), and hands the returned :class:`UsageRecord` objects to the store.
"""

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

TERMINAL_EVENTS = frozenset({
    "response.completed",
    "response.done",
    "response.failed",
    "response.incomplete",
    "response.cancelled",
    "response.canceled",
    "error",
})

# The events the ledger reads: a terminal event settles a response, ``response.created`` tells its id (which is
# how the terminal events of pipelined responses find their requests).
LEDGER_EVENTS = TERMINAL_EVENTS | {"response.created"}

RELAY_UPSTREAM_LOST = "wsrelay.upstream_lost"
RELAY_DRAIN_TIMEOUT = "wsrelay.drain_timeout"
RELAY_SESSION_CLOSED = "wsrelay.session_closed"
RELAY_READ_TIMEOUT = "wsrelay.read_timeout"

_TYPE_KEY = b'"type"'
_LEDGER_QUOTED = frozenset(b'"' + t.encode("ascii") + b'"' for t in LEDGER_EVENTS)
_JSON_WS = b" \t\r\n"


def may_be_event_of(prefix, quoted=_LEDGER_QUOTED):
    """False only when ``prefix`` (the first bytes of a message) proves the message's top-level ``type`` is none
    of ``quoted`` (the types as JSON strings, quotes included; by default :data:`LEDGER_EVENTS`).

    Runs on every upstream message, so it sticks to a few ``bytes.find`` calls and short slices.
    """
    start = prefix.find(b"{")
    pos = prefix.find(_TYPE_KEY)
    while pos >= 0:
        # A "type" behind a nested "{" may belong to an inner object (an output item); the top-level type
        # is then unknown, and a missed terminal event would lose the turn's usage.
        if start < 0 or prefix.find(b"{", start + 1, pos) >= 0:
            return True
        rest = prefix[pos + len(_TYPE_KEY):].lstrip(_JSON_WS)
        if not rest:
            return True
        if rest[0] != 0x3A:  # not followed by ":" -> it was a string value, not the key
            pos = prefix.find(_TYPE_KEY, pos + 1)
            continue
        rest = rest[1:].lstrip(_JSON_WS)
        if not rest:
            return True
        if rest[0] != 0x22:  # a non-string type is never one of ours
            return False
        end = rest.find(b'"', 1)
        if end < 0:
            # The value is cut off by the prefix: it may still grow into a terminal type.
            return any(t.startswith(rest) for t in quoted)
        return rest[:end + 1] in quoted
    return True


# False only when a message's first bytes prove it is none of LEDGER_EVENTS (a terminal event or
# response.created).
may_be_ledger_event = may_be_event_of


def parse_event(payload):
    """The JSON object in ``payload`` (bytes or str), or None if it is not one."""
    try:
        event = json.loads(payload)
    except (ValueError, TypeError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


def _count(value):
    """A token count: a non-negative int, 0 for anything unusable (upstream bugs must not break billing)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value > 0 else 0
    if isinstance(value, float) and math.isfinite(value) and value > 0 and value.is_integer():
        return int(value)
    return 0


def _valid_count(value):
    return not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 0)
        or (isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer()))


def _pick(mapping, *names):
    """The first of ``names`` that holds a usable count (the Responses name wins over its Chat alias)."""
    for name in names:
        value = mapping.get(name)
        if _valid_count(value):
            return _count(value), True
    return 0, False


def _dict(value):
    return value if isinstance(value, dict) else {}


def _usage_block(event):
    usage = _dict(event.get("response")).get("usage")
    if not isinstance(usage, dict):
        usage = event.get("usage")
    return usage if isinstance(usage, dict) else None


def extract_usage(event):
    """The normalised token counts of ``event``; every key is present and an int >= 0.

    ``output_tokens`` always includes reasoning tokens and ``total_tokens`` is never missing.
    """
    usage = _usage_block(event) if isinstance(event, dict) else None
    usage = usage or {}
    input_tokens, _ = _pick(usage, "input_tokens", "prompt_tokens")
    output_tokens, _ = _pick(usage, "output_tokens", "completion_tokens")
    total_tokens, has_total = _pick(usage, "total_tokens")
    in_details = _dict(usage.get("input_tokens_details")) or _dict(usage.get("prompt_tokens_details"))
    out_details = _dict(usage.get("output_tokens_details")) or _dict(usage.get("completion_tokens_details"))
    cached_tokens, _ = _pick(in_details, "cached_tokens")
    reasoning_tokens, _ = _pick(out_details, "reasoning_tokens")
    image_tokens, _ = _pick(out_details, "image_tokens")
    # Reasoning is part of output by contract; an upstream that counts it separately shows it only through
    # a total that exceeds input + output by exactly the reasoning count.
    if has_total and reasoning_tokens > 0 and total_tokens == input_tokens + output_tokens + reasoning_tokens:
        output_tokens += reasoning_tokens
    if not has_total or (total_tokens == 0 and input_tokens + output_tokens > 0):
        total_tokens = input_tokens + output_tokens
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": total_tokens,
        "cached_tokens": cached_tokens,
        "reasoning_tokens": reasoning_tokens,
        "image_tokens": image_tokens,
    }


def _new_id():
    return uuid.uuid4().hex


_instance = (None, None)  # (pid, its name): the host name is read once per process


def current_instance():
    """This process as its records name it: ``host:pid``.  A forked worker names itself, not its parent."""
    global _instance
    pid = os.getpid()
    cached = _instance
    if cached[0] != pid:
        cached = _instance = (pid, "%s:%d" % (os.uname().nodename, pid))
    return cached[1]


def _nullable(f):
    return f.default is None or f.metadata.get("nullable", False)


@dataclass
class UsageRecord:
    record_id: str = field(default_factory=_new_id)
    session_id: str = ""
    response_id: str = None
    model: str = None
    key_id: str = None
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    image_tokens: int = 0
    terminal_event: str = ""
    client_disconnected: bool = False
    started_at: float = 0.0
    duration_ms: int = 0
    transport: str = "websocket"  # how the client reached the relay: "websocket" or "http"
    account: str = None  # the upstream account that served it
    resumed: bool = False  # reached its client through a resume (the client's retry of a cut turn)
    # The relay process that wrote it; None for a record from before wsrelay kept it.
    instance: str = field(default_factory=current_instance, metadata={"nullable": True})

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild a record, coercing types so a hand-edited or older fallback line still imports."""
        data = dict(d)
        values = {}
        for f in fields(cls):
            value = data.get(f.name)
            if f.type is int:
                values[f.name] = _count(value)
            elif f.type is bool:
                values[f.name] = bool(value)
            elif f.type is float:
                try:
                    values[f.name] = float(value or 0.0)
                except (TypeError, ValueError):
                    values[f.name] = 0.0
            elif _nullable(f):
                values[f.name] = None if value is None else str(value)
            else:
                values[f.name] = str(value) if value else f.default  # (an older record lacks newer fields)
        values["record_id"] = values["record_id"] or _new_id()
        return cls(**values)


# The record's fields are declared once, above: the store's table, the fallback file, the usage report, the
# usage_recorded trace line and the token metrics all derive from them.
FIELD_TYPES = {f.name: f.type for f in fields(UsageRecord)}
RECORD_FIELDS = tuple(FIELD_TYPES)
NULLABLE_FIELDS = frozenset(f.name for f in fields(UsageRecord) if _nullable(f))
TOKEN_FIELDS = tuple(name for name in RECORD_FIELDS if name.endswith("_tokens"))
# What a person reads of a record (``wsrelay usage``, the trace): all but the relay's own identifiers.
REPORT_FIELDS = tuple(name for name in RECORD_FIELDS if name not in ("record_id", "session_id"))


class _Turn:
    """One request in flight: when it reached the upstream, its model hint, and its response id once known."""

    __slots__ = ("started_at", "model_hint", "response_id", "resumed")

    def __init__(self, started_at, model_hint):
        self.started_at = started_at
        self.model_hint = model_hint
        self.response_id = None
        self.resumed = False


def _response_field(event, name):
    value = _dict(event.get("response")).get(name)
    return value if isinstance(value, str) and value else None


class TurnLedger:
    """Per-session accounting of the responses in flight, one usage record each.

    A client may send the next ``response.create`` before the previous response's terminal event (pipelining),
    so several responses can be in flight at once.  Requests are kept in the order they reached the upstream;
    ``response.created`` binds the oldest request without an id to that response id, and a terminal event
    settles the request bound to its id — or, for an id not seen before (or none), the oldest request without
    one.  A bare ``error`` is held until the next event: a ``response.failed`` for the same response merges
    into it, so the response is billed once.
    """

    def __init__(self, session_id, key_id=None, clock=time.time, transport="websocket", account=None):
        self.session_id = session_id
        self.key_id = key_id
        self.transport = transport
        self.account = account
        self._clock = clock
        self._open = []  # _Turn, in request order
        self._pending_error = None

    @property
    def in_flight(self):
        """A response is in flight (requested, no terminal event yet)."""
        return bool(self._open)

    @property
    def open_responses(self):
        return len(self._open)

    def start_turn(self, model_hint=None):
        """A ``response.create`` reached the upstream; returns records settled meanwhile (a held error)."""
        out = self._flush_pending()
        self._open.append(_Turn(self._clock(), model_hint))
        return out

    def on_event(self, event, client_disconnected=False):
        """Take one upstream event; returns the records it settles (none for most events)."""
        if not isinstance(event, dict):
            return []
        kind = event.get("type")
        if not isinstance(kind, str):
            return []
        response_id = _response_field(event, "id")
        if kind == "response.created":
            if response_id is not None and self._bound(response_id) is None:
                turn = self._oldest_unbound()
                if turn is not None:
                    turn.response_id = response_id
            return []
        if kind not in TERMINAL_EVENTS:
            return []
        now = self._clock()
        if kind == "response.failed" and self._continues_pending_error(response_id):
            return [self._merge_failed(event, client_disconnected, now)]
        out = self._flush_pending()
        record = self._settle(self._take(response_id), event, kind, client_disconnected, now)
        if kind == "error":
            # The upstream may follow with response.failed for the same response; hold the record so the
            # response is billed once.
            self._pending_error = record
        else:
            out.append(record)
        return out

    def mark_resumed(self):
        """The responses in flight (and a held ``error``) now reach a client through a resume: their records
        will say ``resumed``."""
        for turn in self._open:
            turn.resumed = True
        if self._pending_error is not None:
            self._pending_error.resumed = True

    def abandon(self, terminal_event, client_disconnected):
        """Settle every response still in flight without its terminal event (zero tokens, ``terminal_event``
        says why), and any held error."""
        out = self._flush_pending()
        turns, self._open = self._open, []
        now = self._clock()
        for turn in turns:
            out.append(UsageRecord(
                session_id=self.session_id, response_id=turn.response_id, model=turn.model_hint,
                key_id=self.key_id, terminal_event=terminal_event, client_disconnected=bool(client_disconnected),
                started_at=turn.started_at, duration_ms=_elapsed_ms(turn.started_at, now),
                transport=self.transport, account=self.account, resumed=turn.resumed))
        return out

    def close(self):
        # A response still in flight here would otherwise vanish from the books; the relay normally calls
        # abandon() first with a precise reason.
        return self.abandon(RELAY_SESSION_CLOSED, False)

    def _bound(self, response_id):
        for turn in self._open:
            if turn.response_id == response_id:
                return turn
        return None

    def _oldest_unbound(self):
        for turn in self._open:
            if turn.response_id is None:
                return turn
        return None

    def _take(self, response_id):
        """Remove and return the request a terminal event for ``response_id`` settles (None: an unprompted one)."""
        turn = self._bound(response_id) if response_id is not None else None
        if turn is None:
            turn = self._oldest_unbound()
        if turn is None and response_id is None and self._open:
            turn = self._open[0]  # no id to go by: the oldest response is the one that ends
        if turn is not None:
            self._open.remove(turn)
        return turn

    def _continues_pending_error(self, response_id):
        pending = self._pending_error
        if pending is None:
            return False
        if response_id is None or pending.response_id == response_id:
            return True
        # A failed response the held error was not bound to: the same one unless another request owns its id.
        return pending.response_id is None and self._bound(response_id) is None

    def _flush_pending(self):
        record, self._pending_error = self._pending_error, None
        return [record] if record is not None else []

    def _settle(self, turn, event, kind, client_disconnected, now):
        started = turn.started_at if turn is not None else now
        hint = turn.model_hint if turn is not None else None
        return UsageRecord(
            session_id=self.session_id,
            response_id=_response_field(event, "id") or (turn.response_id if turn is not None else None),
            model=_response_field(event, "model") or hint,
            key_id=self.key_id,
            terminal_event=kind,
            client_disconnected=bool(client_disconnected),
            started_at=started,
            duration_ms=_elapsed_ms(started, now),
            transport=self.transport,
            account=self.account,
            resumed=turn is not None and turn.resumed,
            **extract_usage(event))

    def _merge_failed(self, event, client_disconnected, now):
        record, self._pending_error = self._pending_error, None
        record.terminal_event = "response.failed"
        record.response_id = _response_field(event, "id") or record.response_id
        record.model = _response_field(event, "model") or record.model
        record.client_disconnected = bool(client_disconnected)
        record.duration_ms = _elapsed_ms(record.started_at, now)
        usage = extract_usage(event)
        if any(usage.values()):
            for name, value in usage.items():
                setattr(record, name, value)
        return record


def _elapsed_ms(started, now):
    try:
        return max(0, int(round((now - started) * 1000)))
    except (TypeError, ValueError, OverflowError):
        return 0
