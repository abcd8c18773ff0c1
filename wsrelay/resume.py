"""Turn resume, the pure part: which cut turn a retried request is, and the registry of held turns.

When a client's connection breaks mid-turn, Codex retries the turn on a new connection: same ``session-id`` /
``thread-id`` headers, the same ``turn_id`` in ``client_metadata["x-codex-turn-metadata"]``, no
``previous_response_id`` and the full input — of which the cut request's input is a suffix (items keep their
ids).  The relay holds the cut turn (its upstream and the frames or events of its response) for a short window;
a retry that matches it in every one of those respects gets the held turn instead of a second run upstream.

Nothing here touches a socket or a clock: the caller passes ``now``.  A :class:`HeldTurn`'s ``payload`` is the
transport's (a WebSocket session to adopt, an HTTP stream to replay); the registry only keys, matches, bounds
and expires them.
"""

import json
from dataclasses import dataclass, field

TURN_METADATA = "x-codex-turn-metadata"
# Why a request that could have resumed a held turn did not (the trace's ``resume_miss reason=``).
MISS_NONE_HELD = "none_held"
MISS_EXPIRED = "expired"
MISS_TURN = "other_turn"
MISS_INPUT = "input_changed"
MISS_NO_TURN_ID = "no_turn_id"
MISS_DEAD = "upstream_gone"
MISS_OVERFLOW = "buffer_overflowed"
MISS_ACCOUNT = "other_account"
MISS_TRANSPORT = "other_transport"
MISS_UNREADABLE = "request_unreadable"  # the retry's first message could not be read as a response.create


def turn_id(request, header=None):
    """The ``turn_id`` of a ``response.create`` (a dict): from ``client_metadata["x-codex-turn-metadata"]`` (a
    JSON string), else from the handshake's ``x-codex-turn-metadata`` header; None when absent or empty (the
    prewarm's is "")."""
    metadata = request.get("client_metadata") if isinstance(request, dict) else None
    raw = metadata.get(TURN_METADATA) if isinstance(metadata, dict) else None
    for source in (raw, header):
        if not isinstance(source, str) or not source:
            continue
        try:
            parsed = json.loads(source)
        except ValueError:
            continue
        value = parsed.get("turn_id") if isinstance(parsed, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


def input_items(request):
    """A request's input as a list of items (a plain string input is one user message)."""
    value = request.get("input") if isinstance(request, dict) else None
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    return []


def is_suffix(held, retried):
    """Whether the ``held`` request's input items end the ``retried`` request's input, item for item."""
    if not held or len(held) > len(retried):
        return False
    return retried[len(retried) - len(held):] == held


def conversation(key_id, headers):
    """The identity a held turn is filed under: the relay key's id and the ``session-id`` (else ``thread-id``)
    header; None without either (such a client cannot be recognised on its retry)."""
    for name in ("session-id", "thread-id"):
        value = headers.get(name)
        if value:
            return (key_id, name, value[:256])
    return None


@dataclass(eq=False)
class HeldTurn:
    """A cut turn waiting for its retry: who (``conversation``, ``account``), which (``turn_id``, ``input``),
    until when (``expires``), how much memory (``size``, kept current by the holder), and the transport's
    ``payload``."""

    conversation: tuple
    account: str
    turn_id: str
    input: list
    expires: float
    payload: object = None
    size: int = 0
    alive: bool = True  # False once its upstream died: a retry must then run the turn anew
    overflowed: bool = False
    transport: str = None  # "websocket" or "http": a held turn is resumed on the transport that holds it


@dataclass
class ResumeRegistry:
    """The held turns, one per conversation, within ``max_total_bytes`` in all."""

    max_total_bytes: int
    held: dict = field(default_factory=dict)  # conversation -> HeldTurn

    @property
    def total_bytes(self):
        return sum(turn.size for turn in self.held.values())

    def room_for(self, size):
        return self.total_bytes + size <= self.max_total_bytes

    def hold(self, turn):
        """File ``turn``; returns the turn it replaces for the same conversation (to be released), or None."""
        previous = self.held.get(turn.conversation)
        self.held[turn.conversation] = turn
        return previous if previous is not turn else None

    def match(self, conversation_id, request, header, now, account=None, transport=None):
        """``(turn, None)`` when ``request`` (a ``response.create`` as a dict; ``header``: the handshake's
        ``x-codex-turn-metadata``) resumes the turn held for ``conversation_id`` — removed from the registry, the
        caller now owns it — else ``(None, reason)``; a held turn that did not match stays until it expires or
        is released.  The conversation includes the relay key: a resume never crosses keys.  ``account`` (the
        retry's upstream account) and ``transport``, when given, must be the held turn's too (when it has
        one): a resume never crosses accounts, and only the transport that holds a turn can replay it."""
        turn = self.held.get(conversation_id) if conversation_id is not None else None
        if turn is None:
            return None, MISS_NONE_HELD
        if turn.expires <= now:
            return None, MISS_EXPIRED
        wanted = turn_id(request, header)
        if wanted is None:
            return None, MISS_NO_TURN_ID
        if wanted != turn.turn_id:
            return None, MISS_TURN
        if not is_suffix(turn.input, input_items(request)):
            return None, MISS_INPUT
        if account is not None and account != turn.account:
            return None, MISS_ACCOUNT
        if transport is not None and turn.transport is not None and transport != turn.transport:
            return None, MISS_TRANSPORT
        if not turn.alive:
            return None, MISS_DEAD
        if turn.overflowed:
            return None, MISS_OVERFLOW
        del self.held[conversation_id]
        return turn, None

    def release(self, turn):
        """Forget ``turn`` (it resumed elsewhere, expired, or its conversation moved on)."""
        if self.held.get(turn.conversation) is turn:
            del self.held[turn.conversation]

    def expired(self, now):
        """Remove and return the turns whose window has passed."""
        gone = [turn for turn in self.held.values() if turn.expires <= now]
        for turn in gone:
            del self.held[turn.conversation]
        return gone
