"""One streamed response of the HTTP transport and the resume of its turn (see :mod:`wsrelay.resume_http`).

A :class:`HeldStream` goes from *recording* (its client is there; the upstream's bytes are copied as they are
relayed) to *held* (the client left mid-turn: filed in the app's registry; the exchange that read the upstream
reads on into it, :meth:`HeldStream.pump`), *resumed* (a retry's exchange writes it to its client, and may leave
it held again) and *done* (no retry takes it any more).  Records of its ledger are parked from *held* on and
written exactly once, when it is done; those that come later are written as they come.
"""

import hashlib
import json
import socket
import time

import gevent
import gevent.event

from . import resume, usage
from .clientwatch import ClientGone
from .httpclient import HTTPUpstreamError

TRANSPORT = "http"
RECORDING, HELD, RESUMED, DONE = "recording", "held", "resumed", "done"
TAIL_SECONDS = 2.0  # after the terminal event, how long the end of a held response's body is waited for


class _Wake(Exception):
    """Thrown into the greenlet reading a held turn's upstream when its deadline changed."""


def conversation(exchange):
    """The conversation ``exchange``'s request is filed under (None without a session or thread header)."""
    environ = exchange.environ
    return resume.conversation(exchange.key_id, {"session-id": environ.get("HTTP_SESSION_ID"),
                                                 "thread-id": environ.get("HTTP_THREAD_ID")})


def input_digests(request):
    """The request's input items as digests of their canonical JSON: what a held turn keeps of its request (a
    few bytes an item instead of the whole input) and compares a retry's input with."""
    return [hashlib.sha256(json.dumps(item, sort_keys=True, separators=(",", ":")).encode("utf-8")).digest()
            for item in resume.input_items(request)]


class HeldStream:
    """One streamed response and its turn's resume: the bytes so far, its state (recording, held, resumed, done),
    the records parked while a retry may still take it.  ``exchange`` reads the upstream (and owns the ledger)."""

    def __init__(self, exchange, status_line, headers):
        self.exchange = exchange
        self.app = exchange.app
        self.status_line = status_line
        self.status = exchange.status
        self.headers = list(headers)
        self.limit = exchange.config.resume.max_buffer_bytes
        self.data = bytearray()
        self.overflowed = False
        self.state = RECORDING
        self.turn = None
        self.resumed = False
        self.records = []
        self.ended = False  # the upstream is read no more
        self.complete = False  # ... and its turn's terminal event came
        self.events = 0
        self.at_boundary = True
        self.deadline = None  # the drain's, once the turn is released with its upstream still streaming
        self.changed = gevent.event.Event()
        self._timer = None

    # -- recording and billing (the exchange reading the upstream) -----------------------------------------

    def record(self, chunk):
        """Keep ``chunk`` (upstream bytes just read); past ``resume.max_buffer_bytes`` the stream is not
        resumable any more."""
        if not self.overflowed and len(self.data) + len(chunk) > self.limit:
            self._overflow()
        elif self.state == HELD and not self.overflowed and not self.app.resume.room_for(len(chunk)):
            self._overflow()
        if self.state == RESUMED or (self.state in (RECORDING, HELD) and not self.overflowed):
            self.data += chunk  # (a resumed client needs it even past the limit: it has not had it yet)
        if self.state == HELD and self.turn is not None:
            self.turn.size = len(self.data)
        self.changed.set()

    def _overflow(self):
        self.overflowed = True
        if self.turn is not None:
            self.turn.overflowed = True
        if self.state == RESUMED:
            return  # the resumed client keeps its stream; the turn cannot be held again
        self.data = bytearray()
        if self.state == HELD:
            self._settle(False)  # stays filed (a retry learns why it missed) until its window ends

    def park(self, records):
        """The ledger's ``records``: kept while a retry may still take the turn, else returned to be written."""
        for record in records:
            record.resumed = self.resumed
        if self.state in (HELD, RESUMED):
            self.records.extend(records)
            return []
        return records

    # -- holding ---------------------------------------------------------------------------------------------

    def hold(self, reader):
        """The client left: file the turn for its retry.  False when it cannot be held (it is drained then)."""
        exchange = self.exchange
        ledger = exchange.ledger
        if self.state != RECORDING or self.overflowed or ledger is None or not ledger.in_flight:
            return False
        if not self.app.accepting:
            return False
        request = usage.parse_event(exchange.body or b"") or {}
        turn_id = resume.turn_id(request, exchange.environ.get("HTTP_X_CODEX_TURN_METADATA"))
        filed_under = conversation(exchange)
        if turn_id is None or filed_under is None:
            return False
        self.events = reader.events
        self.at_boundary = reader.at_boundary
        self.turn = resume.HeldTurn(filed_under, exchange.account, turn_id, input_digests(request), 0.0,
                                    payload=self)
        exchange.outcome = "client_gone"
        exchange.body = None  # sent, and what a retry is compared with is kept: the memory can go
        return self._file()

    def _file(self):
        """Put the turn (back) into the registry for a new window; False when there is no room for it, or (held
        again) when the conversation has a newer cut turn."""
        registry = self.app.resume
        turn = self.turn
        previous = registry.held.get(turn.conversation)
        if previous is not None and self.resumed:
            return False
        if not registry.room_for(len(self.data) - (previous.size if previous is not None else 0)):
            return False
        expire = getattr(previous.payload, "expire", None) if previous is not None else None
        if expire is not None:
            expire()  # the conversation's older cut turn: no retry will ask for it any more
        turn.size = len(self.data)
        turn.expires = time.monotonic() + self.exchange.config.resume.window_seconds
        self.state = HELD
        registry.hold(turn)
        self._trace("resume_held", bytes=len(self.data), upstream_done=self.ended,
                    window_s=self.exchange.config.resume.window_seconds, again=self.resumed)
        self._arm()
        return True

    def _arm(self):
        self._disarm()
        self._timer = gevent.spawn_later(max(self.turn.expires - time.monotonic(), 0), self._on_timer)

    def _disarm(self):
        timer, self._timer = self._timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)

    def _on_timer(self):
        self._timer = None
        turn = self.turn
        if self.app.resume.held.get(turn.conversation) is not turn:
            return  # taken by a retry, or replaced (its expire ran then)
        if turn.expires > time.monotonic():
            return self._arm()
        self.expire()

    def expire(self):
        """The window has passed (or the relay stops, or a newer turn of the conversation was cut): forget the
        turn, write its parked records; a still streaming upstream is drained from now as without resume."""
        self._disarm()
        turn = self.turn
        if turn is None or self.app.resume.held.get(turn.conversation) is not turn:
            return
        self.app.resume.release(turn)
        self._trace("resume_expired", bytes=len(self.data), upstream_done=self.ended, resumed=self.resumed)
        if self.state == HELD:
            self._settle(False)
        turn.size = 0

    def _settle(self, delivered):
        """The turn's delivery is settled: no retry takes it any more.  Its parked records are written (the one
        place they are), its memory given back, and an upstream still streaming gets the drain's deadline."""
        self.state = DONE
        records, self.records = self.records, []
        for record in records:
            record.resumed = self.resumed
            record.client_disconnected = not delivered
        self.data = bytearray()
        if self.turn is not None:
            self.turn.size = 0
        if not self.ended:
            timeout = self.exchange.settings.upstream_drain_timeout_seconds
            self.deadline = time.monotonic() + timeout
            self.exchange.trace("drain_started", transport=TRANSPORT, timeout_s=timeout)
            self._wake()
        self.exchange._record(records)

    def _wake(self):
        exchange = self.exchange

        def interrupt():
            if exchange.waiting:
                exchange.greenlet.throw(_Wake())

        gevent.get_hub().loop.run_callback(interrupt)

    # -- resuming (the retry's exchange) ---------------------------------------------------------------------

    def attach(self, follower):
        self.state = RESUMED
        self.resumed = True
        self._disarm()
        self.turn.size = 0  # out of the registry: the retry's exchange holds it now
        self._trace("resume_hit", follower=follower, bytes=len(self.data), upstream_done=self.ended)

    def detach(self, follower, delivered):
        """The retry's exchange is done with the stream: settled when its client had it all, else held again
        (Codex retries again) while the turn can still be resumed."""
        if self.state != RESUMED:
            return
        if delivered:
            return self._settle(True)
        dead = self.ended and not self.complete
        if dead or self.overflowed or not self.app.accepting or not self._file():
            self._settle(False)

    # -- reading the upstream into the hold (the exchange that held the turn) ---------------------------------

    def pump(self, response, reader, ledger):
        """Read the upstream to the end of the turn's response (or its loss), into the hold or to a resumed
        client; a turn released meanwhile is drained as without resume, to its terminal event."""
        reason = usage.RELAY_UPSTREAM_LOST
        try:
            reason = self._read_upstream(response, reader, ledger)
        finally:
            self.exchange._settle(reason or usage.RELAY_UPSTREAM_LOST)  # parked while the turn is held
            self.ended = True
            self.complete = reason is None
            if self.state == HELD and not self.complete:
                self.turn.alive = False
                self._settle(False)  # stays filed (a retry learns why it missed) until its window ends
            self.changed.set()

    def _read_upstream(self, response, reader, ledger):
        """The loop of :meth:`pump`; returns why the turn ended without its terminal event, or None."""
        exchange = self.exchange
        read_timeout = response.read_timeout
        last_up = time.monotonic()
        tail = None  # after the terminal event: until when the end of the body is waited for
        while True:
            now = time.monotonic()
            wait = last_up + read_timeout - now
            for limit in (self.deadline, tail):
                if limit is not None:
                    wait = min(wait, limit - now)
            try:
                data = exchange._read(response, max(wait, 0.001))
            except (_Wake, ClientGone):
                continue
            except socket.timeout as exc:
                now = time.monotonic()
                if tail is not None and now >= tail:
                    return None
                if self.deadline is not None and now >= self.deadline:
                    exchange.trace("drain_timeout", transport=TRANSPORT)
                    exchange.outcome = "drain_timeout"
                    return usage.RELAY_DRAIN_TIMEOUT
                if now - last_up >= read_timeout:
                    exchange.trace("http_upstream_lost", error=str(exc)[:200] or "read timeout", held=True)
                    return usage.RELAY_READ_TIMEOUT
                continue
            except HTTPUpstreamError as exc:
                if tail is not None:
                    return None  # the turn had ended
                exchange.trace("http_upstream_lost", error=exc.message[:200], held=True)
                return usage.RELAY_UPSTREAM_LOST
            if not data:
                return usage.RELAY_UPSTREAM_LOST if ledger.in_flight else None
            last_up = time.monotonic()
            self.record(data)
            exchange.bill_events(reader, data, ledger, True)
            self.events, self.at_boundary = reader.events, reader.at_boundary
            if not ledger.in_flight and tail is None:
                if self.deadline is not None:  # drained: the terminal event is all it waited for
                    exchange.trace("drain_terminal", transport=TRANSPORT)
                    return None
                tail = last_up + TAIL_SECONDS  # what follows it (a response.failed after an error) is relayed too

    def _trace(self, stage, follower=None, **fields):
        exchange = follower or self.exchange
        exchange.trace(stage, transport=TRANSPORT, turn_id=self.turn.turn_id, key_id=exchange.key_id,
                       held_request_id=self.exchange.id, **fields)
