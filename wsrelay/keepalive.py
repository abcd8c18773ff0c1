"""Downstream keepalive: WebSocket Pings to the client while a long turn is silent.

Idle-sensitive proxies in front of the relay (nginx 60 s, Cloudflare 100 s, AWS ALB 60 s) close a client socket
that carries nothing; Ping frames are traffic for all of them.  The rules:

* nothing before the first downstream business frame (a session that never started is never kept alive);
* a Ping only after a full interval without any downstream write (business writes postpone it);
* the Ping goes out at a frame boundary (the session's downstream write lock) and its Pong is awaited for
  ``timeout``; a failed write or a missing Pong means the client is gone (a graceful disconnect).

Nothing runs until a Ping is due: a hub timer wakes it, never a polling loop.  Usually the whole round happens in
the hub (the Ping written without blocking, the Pong awaited by a second timer); only when the write could block
(a frame half written, a full socket buffer) does a greenlet do it.
"""

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import gevent

from .timers import cancel_timer
from .writer import PingUnsupported

STAGE_OK = "downstream_ping_ok"
STAGE_FAILED = "downstream_ping_failed"
STAGE_UNSUPPORTED = "downstream_ping_unsupported"
DIRECTION = "downstream_keepalive"


def ping_due_in(now, last_write, interval):
    """Seconds until a Ping is due, given the time of the last downstream write; <= 0 means now."""
    return last_write + interval - now


@dataclass(eq=False)
class Keepalive:
    """The downstream keepalive of one session.

    Between Pings it is only a hub timer (an idle session holds no greenlet for it).  When a Ping is due the
    timer's callback writes it if that cannot block and arms a Pong timer; otherwise a short-lived greenlet
    sends it and awaits the Pong with ``gevent.Timeout``.  Either way the Ping timer is re-armed after the Pong.

    ``writer`` is the session's :class:`~wsrelay.writer.DownstreamWriter` (``first_business_write``,
    ``last_write``, ``wrote_business``, ``try_ping``, ``ping``; a failed write it reports itself);
    ``expect_pong(payload)`` tells the client's frame stream which Pong is ours (and clears ``pong_event``, which
    is set when it arrives); ``trace(stage, **fields)``; ``failed(error)`` when no Pong came in time.
    """

    writer: object
    expect_pong: Callable[[bytes], None]
    pong_event: object
    interval: float
    timeout: float
    trace: Callable
    failed: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    # The round's state: the Ping timer, the Pong timer, when the Ping went, a greenlet doing the round, stopped.
    _timer: object = field(default=None, init=False, repr=False)
    _pong_timer: object = field(default=None, init=False, repr=False)
    _sent_at: float = field(default=None, init=False, repr=False)
    _round: object = field(default=None, init=False, repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)

    _counter = itertools.count(1)  # (not annotated: shared by every keepalive, for unique Ping payloads)

    def start(self):
        """Begin once the session has written its first business frame (never before)."""
        self.writer.first_business_write.rawlink(self._arm)

    def stop(self):
        self._stopped = True
        self.writer.first_business_write.unlink(self._arm)
        self._disarm()
        self._end_pong_wait()
        if self._round is not None and self._round is not gevent.getcurrent():
            self._round.kill(block=False)

    def _arm(self, _event=None):
        self._disarm()
        if self._stopped:
            return
        delay = ping_due_in(self.clock(), self.writer.last_write, self.interval)
        self._timer = gevent.get_hub().loop.timer(max(0.0, delay))
        self._timer.start(self._due)

    def _disarm(self):
        self._timer = cancel_timer(self._timer)

    def _due(self):
        # In the hub: a write since the timer was set moves the Ping back; otherwise the round starts here, or in
        # a greenlet when the Ping cannot be written without blocking.
        if ping_due_in(self.clock(), self.writer.last_write, self.interval) > 0:
            self._arm()
        elif not self._stopped:
            self._disarm()
            if not self._ping_from_hub():
                self._round = gevent.spawn(self._ping_round)

    def _expect(self):
        payload = b"wsrelay-keepalive-%d" % next(self._counter)
        self.expect_pong(payload)
        return payload

    def _ping_from_hub(self):
        """The round without a greenlet; False when the Ping could not be written without blocking."""
        sent_at = self.writer.try_ping(self._expect())
        if sent_at is None:
            return False
        self._sent_at = sent_at
        self._pong_timer = gevent.get_hub().loop.timer(self.timeout)
        self._pong_timer.start(self._pong_missing)
        self.pong_event.rawlink(self._pong_seen)
        return True

    def _end_pong_wait(self):
        self.pong_event.unlink(self._pong_seen)
        self._pong_timer = cancel_timer(self._pong_timer)

    def _pong_seen(self, _event):
        self._end_pong_wait()
        if self._stopped:
            return
        self.trace(STAGE_OK, direction=DIRECTION, graceful=True, wrote_downstream=self.writer.wrote_business,
                   rtt_ms=round((self.clock() - self._sent_at) * 1000.0, 3))
        self._arm()

    def _pong_missing(self):
        self._end_pong_wait()
        if not self._stopped:
            self.failed("no pong within %gs" % self.timeout)

    def _ping_round(self):
        payload = self._expect()
        try:
            sent_at = self.writer.ping(payload, self.interval)
        except PingUnsupported:
            self.trace(STAGE_UNSUPPORTED, direction=DIRECTION, graceful=True,
                       wrote_downstream=self.writer.wrote_business)
            return
        if sent_at is not None:  # None: a business write happened meanwhile, or the write failed (reported)
            try:
                with gevent.Timeout(self.timeout):
                    self.pong_event.wait()
            except gevent.Timeout:
                self.failed("no pong within %gs" % self.timeout)
                return
            self.trace(STAGE_OK, direction=DIRECTION, graceful=True, wrote_downstream=self.writer.wrote_business,
                       rtt_ms=round((self.clock() - sent_at) * 1000.0, 3))
        self._round = None
        self._arm()


APP_KEEPALIVE_FRAME = b"\x81\x14" + b'{"type":"keepalive"}'
STAGE_APP = "downstream_app_keepalive"


@dataclass(eq=False)
class AppKeepalive:
    """Text-frame keepalive for clients whose own idle watchdog ignores Pings (Codex's does).

    Only during a turn (``in_turn()``), only after the first business write, only when no *business* frame went
    down for ``interval``, and only at a message boundary (``at_boundary()``: a text frame inside a fragmented
    message would break it).  ``turn_changed`` is an Event the session sets when a turn starts or ends.
    """

    writer: object
    in_turn: Callable[[], bool]
    at_boundary: Callable[[], bool]
    turn_changed: object
    interval: float
    trace: Callable
    clock: Callable[[], float] = time.monotonic
    sent: int = 0

    def _allowed(self):
        return self.in_turn() and self.at_boundary()

    def run(self):
        writer, turn_changed = self.writer, self.turn_changed
        writer.first_business_write.wait()
        last_sent = 0.0
        while writer.open:
            turn_changed.clear()
            if not self.in_turn():
                turn_changed.wait()
                continue
            delay = ping_due_in(self.clock(), max(writer.last_business_write, last_sent), self.interval)
            if delay > 0:
                turn_changed.wait(delay)
                continue
            if writer.send_if(APP_KEEPALIVE_FRAME, self._allowed):
                self.sent += 1
                last_sent = self.clock()
                self.trace(STAGE_APP, direction=DIRECTION, wrote_downstream=writer.wrote_business)
            else:
                gevent.sleep(min(self.interval, 0.05))  # mid-message: try again shortly after it ends


def app_keepalive_choice(mode, interval, originator=None, user_agent=None):
    """Whether a session gets the app keepalive: ``(on, why)``, ``why`` being what its trace line reports.

    ``auto`` selects clients that identify as Codex (its ``originator`` header, ``codex_exec``,
    ``codex_cli_rs``, ..., or a ``User-Agent`` that starts with the same word): their idle watchdog is reset only
    by text frames.  Other clients (the openai SDK) are kept alive by Pings alone and get no unknown event.
    """
    if interval <= 0:
        return False, "interval_off"
    if mode == "never":
        return False, "mode_never"
    if mode == "always":
        return True, "mode_always"
    if (originator or "").strip().lower().startswith("codex"):
        return True, "codex_originator"
    if (user_agent or "").strip().lower().startswith("codex"):
        return True, "codex_user_agent"
    return False, "not_codex"
