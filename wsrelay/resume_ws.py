"""Turn resume on the WebSocket transport: hold a cut turn's upstream, and hand it to the client's retry.

A session whose client names its conversation (a ``session-id`` or ``thread-id`` header) gets a :class:`TurnCopy`
when ``resume.enabled`` is on (others get none and pay nothing).  While exactly one response is in flight the
copy keeps that response's upstream frames from its request on (one bytearray, appended as they are forwarded;
dropped at the turn's end, or past ``resume.max_buffer_bytes``) and the client frames that carried the request.

When the client leaves without a clean close (end of stream, reset, failed write or Ping) mid-turn, the session
*holds* the turn (:meth:`TurnCopy.hold`): it files a :class:`~wsrelay.resume.HeldTurn` in the app's registry,
reads the upstream into the copy up to the terminal event, then keeps the upstream connection open, idle, until
``resume.window_seconds`` after the cut.  A new connection is dialled and answered as any; when its relay key,
conversation and upstream account are the held turn's and its first ``response.create`` carries the held
``turn_id`` with an input that ends with the held request's (:func:`lend`), the connection is *lent* to the held
session: the request does not go upstream, the held frames are written to the new client from the response's
start (Codex renders the retry's stream from its start), the live rest follows, and the session goes on with the
new client on the held upstream (whose ``previous_response_id`` cache stays valid).  The fresh upstream, never
used, is closed.  Anything else is a new session as without resume, and the held turn is released: drained,
billed and closed as without resume.

Billing: records the ledger settles while a turn is held are kept back, then written once the turn's fate is
known — at the resume (``resumed``, and ``client_disconnected`` false: a client got the response), or when the
hold ends without one (window over, released, server shutdown) as they were.  A response that ends after its
resume is billed at its terminal event, ``resumed``.
"""

import time

import gevent
from gevent.event import Event

from . import frames, resume
from .resume import MISS_DEAD, MISS_OVERFLOW, MISS_UNREADABLE, HeldTurn
from .sniff import NEED_MORE, create_request, first_message, frames_end, text_messages
from .writer import send_all

TRANSPORT = "websocket"
# The client-side ends that leave a turn resumable: the client did not say it was done.
UNCLEAN_EXITS = frozenset(("client_eof", "client_reset", "client_write_failed", "downstream_ping_failed"))
STAGE_HELD = "resume_held"
STAGE_SKIPPED = "resume_skipped"    # a client left mid-turn, and the turn could not be held (reason=)
STAGE_HIT = "resume_hit"
STAGE_MISS = "resume_miss"
STAGE_EXPIRED = "resume_expired"    # the window passed without a retry
STAGE_RELEASED = "resume_released"  # the hold ended early (reason=)
REPLAY_CHUNK = 256 * 1024
_NO_TURN = "no_turn"


# -- the session's side: copy, hold, hand over ---------------------------------------------------------------

class TurnCopy:
    """A session's copy of its turn in flight, and the hold of that turn once its client left.

    The session calls :meth:`sent` with the client bytes it forwards, :meth:`started` when a request has reached
    the upstream whole, :meth:`received` with the upstream bytes it forwards (or would, while no client is there),
    :meth:`ended` when no response is in flight any more, and :meth:`hold` when its client left mid-turn.  A retry
    (in another connection's greenlet) calls :meth:`adopt`; :meth:`release` ends a hold early."""

    def __init__(self, session, registry, conversation, settings, turn_header=None):
        self.session = session
        self.registry = registry
        self.conversation = conversation
        self.settings = settings  # the resume section of the configuration
        self.turn_header = turn_header  # the handshake's x-codex-turn-metadata
        self.pending = bytearray()  # client bytes since the last request's end (None: too many to keep)
        self.settled = True  # what pending holds ended at a message boundary: it was no request
        self.request = None  # the client frames that carried the request in flight
        self.copy = None  # the upstream bytes of the response in flight, from its request on
        self.mid_frame = False  # the copy ends inside a frame
        self.why_not = _NO_TURN  # why the turn in flight cannot be held (None: it can)
        self.turn = None  # the HeldTurn, while held
        self.lent = None  # the retry's connection, once a retry adopted the held turn
        self.released = None  # why the hold is to end early
        self.replaying = False
        self.wake = Event()

    @property
    def size(self):
        """Bytes kept for the turn in flight."""
        return len(self.copy or b"") + len(self.request or b"") + len(self.pending or b"")

    # -- while the turn runs (the session's pumps) ---------------------------------------------------------

    def sent(self, data, mid_frame):
        pending = self.pending
        if pending is not None:
            if self.settled:
                del pending[:]  # whole messages that started no turn: only a request is worth keeping
            pending += data
            self.settled = not mid_frame and not self.session.down.in_message
            if len(pending) > self.settings.max_buffer_bytes:
                self.pending = None  # a request this big is not held; started() finds a frame boundary again

    def started(self):
        session = self.session
        pending = self.pending
        if pending is None:
            self.request = None
            if not session.down.walker.remaining and not session.down.in_message:
                self.pending, self.settled = bytearray(), True
        else:
            end = frames_end(pending)
            self.request = bytes(pending[:end])
            del pending[:end]
            self.settled = not pending
        if session.ledger.open_responses != 1:
            why = "pipelined"
        elif self.request is None:
            why = "request_too_big"
        elif session.up.walker.remaining or session.up.in_message:
            why = "upstream_mid_message"
        else:
            why = None
        self.why_not = why
        self.mid_frame = False
        self.copy = bytearray() if why is None else None
        if why is not None:
            self.request = None

    def received(self, data, mid_frame, business=True):
        copy = self.copy
        if copy is None:
            return
        copy += data
        self.mid_frame = mid_frame
        if self.replaying:
            return  # the retry has the turn: it gets all of it
        if len(copy) + len(self.request) > self.settings.max_buffer_bytes:
            self._overflow()
        elif self.turn is not None:
            self.turn.size = self.size
            if self.registry.total_bytes > self.registry.max_total_bytes:
                self._overflow()

    def ended(self):
        if self.turn is None and not self.replaying:
            self._drop()

    def _drop(self):
        self.copy = self.request = None
        self.why_not = _NO_TURN

    def _overflow(self):
        self._drop()
        self.why_not = MISS_OVERFLOW
        if self.turn is not None:
            self.turn.overflowed = True
            self.turn.size = 0
            self.wake.set()

    # -- the cut ---------------------------------------------------------------------------------------------

    def hold(self, first, up):
        """The client left (``first``, its exit) with a response in flight; ``up`` is the upstream pump.  Returns
        True when a retry took the session over (its client parts are the retry's now), False when the turn was
        not held or its hold ended without a resume (the session then drains and closes as without resume)."""
        session = self.session
        turn, why = self._held_turn(first)
        if turn is None:
            session.trace(STAGE_SKIPPED, transport=TRANSPORT, reason=why, cause=first.stage)
            self._drop()
            return False
        previous = self.registry.hold(turn)
        if previous is not None and isinstance(previous.payload, TurnCopy):
            previous.payload.release("superseded")
        self.turn, self.lent, self.released = turn, None, None
        self.wake.clear()
        session.stash = []
        session.timer.disarm()
        cut = time.monotonic()
        session.trace(STAGE_HELD, transport=TRANSPORT, cause=first.stage, turn_id=turn.turn_id, bytes=turn.size,
                      window_s=self.settings.window_seconds, turn_in_flight=session.ledger.in_flight)
        resumed = False
        try:
            reason = self._wait(up)
            if reason is None:
                resumed = True
                self._resume(cut)
                return True
            self._end(reason, cut)
            return False
        finally:
            if not resumed and self.turn is not None:
                self._end("error", cut)

    def _held_turn(self, first):
        """``(HeldTurn, None)`` for the turn in flight, or ``(None, why it cannot be held)``."""
        session = self.session
        if first.stage not in UNCLEAN_EXITS:
            return None, first.stage
        if self.why_not is not None:
            return None, self.why_not
        if session.up_mid_frame or session.down.in_message:
            return None, "client_message_cut"
        if session.shutting_down:
            return None, "server_shutdown"
        request = None
        for payload in reversed(text_messages(self.request)):
            request = create_request(payload)
            if request is not None:
                break
        if request is None:
            return None, MISS_UNREADABLE
        turn_id = resume.turn_id(request, self.turn_header)
        if turn_id is None:
            return None, resume.MISS_NO_TURN_ID
        self.pending = bytearray()  # no client now; a retry's client starts at a frame boundary
        self.settled = True
        size = self.size
        if not self.registry.room_for(size):
            return None, "no_room"
        return HeldTurn(self.conversation, session.account, turn_id, resume.input_items(request),
                        time.monotonic() + self.settings.window_seconds, payload=self, size=size,
                        transport=TRANSPORT), None

    def _wait(self, up):
        """Wait for a retry; None when one adopted the turn, else why the hold ends."""
        session, turn = self.session, self.turn
        while True:
            if self.lent is not None:
                return None
            if self.released is not None:
                return self.released
            if turn.overflowed:
                return MISS_OVERFLOW
            if up.dead or session.drain_done.is_set() or not session.upstream_open:
                turn.alive = False
                return MISS_DEAD
            left = turn.expires - time.monotonic()
            if left <= 0:
                return "expired"
            gevent.wait([self.wake, session.drain_done], timeout=left, count=1)
            self.wake.clear()

    def _end(self, reason, cut):
        """The hold ends without a resume: the turn leaves the registry (an overflowed or dead one stays there,
        empty, until its window ends, so its retry is told why it missed), the kept records are written."""
        session, turn = self.session, self.turn
        self.turn = None
        turn.size = 0
        if reason in (MISS_OVERFLOW, MISS_DEAD) and self.registry.held.get(turn.conversation) is turn:
            gevent.spawn_later(max(0.0, turn.expires - time.monotonic()), self.registry.release, turn)
        else:
            self.registry.release(turn)
        self._drop()
        records, session.stash = session.stash, None
        session.record(records or ())
        session.trace(STAGE_EXPIRED if reason == "expired" else STAGE_RELEASED, transport=TRANSPORT, reason=reason,
                      turn_id=turn.turn_id, held_ms=int((time.monotonic() - cut) * 1000),
                      turn_in_flight=session.ledger.in_flight)

    def _resume(self, cut):
        """A retry adopted the turn: bill what was kept as resumed, write the held frames to the new client, then
        let the upstream pump write to it."""
        session, turn, lent = self.session, self.turn, self.lent
        records, session.stash = session.stash, None
        for record in records:
            record.resumed, record.client_disconnected = True, False
        session.ledger.mark_resumed()
        session.record(records)
        turn.size = 0
        self.turn = None
        old = session.down_sock
        writer = session.take_client(lent)
        self.replaying = True
        sent = 0
        try:
            while writer.open:
                copy = self.copy
                if copy is None or sent >= len(copy):
                    break
                chunk = copy[sent:sent + REPLAY_CHUNK]  # a copy: the pump may append meanwhile
                sent += len(chunk)
                writer.forward(chunk, sent < len(copy) or self.mid_frame, True)
            session.writer = writer  # nothing written since the last check: the live rest follows in order
        finally:
            self.replaying = False
        if not session.ledger.in_flight:
            self._drop()
        _close(old)
        session.trace(STAGE_HIT, transport=TRANSPORT, turn_id=turn.turn_id, replayed_bytes=sent,
                      held_ms=int((time.monotonic() - cut) * 1000), turn_in_flight=session.ledger.in_flight)

    # -- from other greenlets -----------------------------------------------------------------------------------

    def adopt(self, lent):
        """A retry that matched the held turn asks for it; False when the hold is ending (the retry then runs as a
        new session)."""
        session = self.session
        if (self.turn is None or self.lent is not None or self.released is not None or self.turn.overflowed
                or session.drain_done.is_set() or not session.upstream_open):
            return False
        self.lent = lent
        self.wake.set()
        return True

    def release(self, reason):
        """End the hold (if any) without a resume: the conversation moved on, or the server stops."""
        if self.turn is not None and self.lent is None and self.released is None:
            self.released = reason
            self.wake.set()

    def expire(self):
        """What the HTTP transport calls on the turn its own cut turn of the same conversation replaces."""
        self.release("superseded")


class Lent:
    """A client connection lent to a held session: its socket, the bytes read after its retried request, and what
    its handshake chose.  ``done`` is set once the session is through with it."""

    __slots__ = ("sock", "initial", "ping_supported", "app_keepalive", "done")

    def __init__(self, sock, initial, app_keepalive, ping_supported=True):
        self.sock = sock
        self.initial = initial
        self.app_keepalive = app_keepalive
        self.ping_supported = ping_supported
        self.done = Event()


def _headers(environ):
    return {"session-id": environ.get("HTTP_SESSION_ID"), "thread-id": environ.get("HTTP_THREAD_ID")}


def copy_for(app, session, environ, key_id):
    """The :class:`TurnCopy` of a new session, or None when resume is off or the client names no conversation."""
    settings = app.config.resume
    if not settings.enabled:
        return None
    conversation = resume.conversation(key_id, _headers(environ))
    if conversation is None:
        return None
    return TurnCopy(session, app.resume, conversation, settings, environ.get("HTTP_X_CODEX_TURN_METADATA"))


# -- the retry's side (its connection's greenlet, after the 101) ---------------------------------------------

def lend(app, environ, key_id, account, sock, initial, app_keepalive, session_id, up_sock, attempts):
    """Whether the new connection ``sock`` (its upstream ``up_sock`` dialled, on ``account``) is the retry of a
    turn held for its conversation.  If so, the held session takes it over: its unused upstream is closed, its
    account count (``attempts``) given back, and this returns None once the session is through with it.  Else
    the bytes read from the client so far: a new session as without resume.  The client's first message is read
    only when a WebSocket turn is held for the conversation."""
    registry = app.resume
    conversation = resume.conversation(key_id, _headers(environ))
    held = registry.held.get(conversation) if conversation is not None else None
    if held is None or not isinstance(held.payload, TurnCopy):
        return initial
    ws = app.config.gateway.openai_ws
    found, data = _read_first(sock, initial, ws.client_read_limit_bytes,
                              ws.client_first_message_timeout_seconds or app.config.resume.window_seconds)
    request = create_request(found[0]) if found else None
    if request is None:
        turn, reason = None, MISS_UNREADABLE
    else:
        turn, reason = registry.match(conversation, request, environ.get("HTTP_X_CODEX_TURN_METADATA"),
                                      time.monotonic(), account=account, transport=TRANSPORT)
    if turn is not None:
        lent = Lent(sock, data[found[1]:], app_keepalive)
        if turn.payload.adopt(lent):
            close_unused(up_sock)
            attempts.release()  # the held session counts on the account
            lent.done.wait()
            return None
        reason = MISS_DEAD
    app.tracer.emit(STAGE_MISS, session=session_id, transport=TRANSPORT, reason=reason, key_id=key_id,
                    held_session=held.payload.session.id)
    # The conversation moved on: the held turn will not be retried.
    current = registry.held.get(conversation)
    if current is not None and isinstance(current.payload, TurnCopy):
        current.payload.release("retry_missed")
        registry.release(current)
    return data


def _read_first(sock, initial, limit, timeout):
    """``(first_message(...) or None, bytes read)`` from the client, within ``timeout`` seconds."""
    buf = bytearray(initial)
    deadline = time.monotonic() + timeout
    try:
        while True:
            found = first_message(buf, limit)
            if found is not NEED_MORE:
                return found, bytes(buf)
            left = deadline - time.monotonic()
            if left <= 0:
                return None, bytes(buf)
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return None, bytes(buf)
            buf += chunk
    except OSError:  # socket.timeout included: the session gets what was read, and finds the client's state
        return None, bytes(buf)
    finally:
        sock.settimeout(None)


def close_unused(sock):
    """Close a fresh upstream connection that carried nothing (the retry went to the held one)."""
    try:
        send_all(sock, frames.build_close(frames.CLOSE_NORMAL, "not used", mask=True), 1.0)
    except OSError:
        pass
    _close(sock)


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
