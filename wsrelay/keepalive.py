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

import gevent
import gevent.event

STAGE_OK = "downstream_ping_ok"
STAGE_FAILED = "downstream_ping_failed"
STAGE_UNSUPPORTED = "downstream_ping_unsupported"
DIRECTION = "downstream_keepalive"


class PingUnsupported(Exception):
    """The downstream transport cannot carry a Ping frame."""


def cancel_timer(timer):
    """Stop and release a hub timer (or nothing, for None); returns None, for the attribute that held it."""
    if timer is not None:
        timer.stop()
        timer.close()


def ping_due_in(now, last_write, interval):
    """Seconds until a Ping is due, given the time of the last downstream write; <= 0 means now."""
    return last_write + interval - now


class Keepalive:
    """The downstream keepalive of one session.

    Between Pings it is only a hub timer (an idle session holds no greenlet for it).  When a Ping is due the
    timer's callback writes it if that cannot block and arms a Pong timer; otherwise a short-lived greenlet
    sends it and awaits the Pong with ``gevent.Timeout``.  Either way the Ping timer is re-armed after the Pong.

    ``session`` provides: ``first_business_write`` (gevent Event), ``last_downstream_write`` (monotonic seconds),
    ``try_send_ping(payload)`` (send time, or None when it would block; raises OSError when the client is gone),
    ``send_ping(payload, interval)`` (raises OSError when the client is gone, PingUnsupported when it cannot
    ping), ``pong_event`` (gevent Event the client pump sets on the matching Pong), ``expected_pong``
    (attribute), ``trace(stage, **fields)`` and ``keepalive_failed(error)``.
    """

    _counter = itertools.count(1)

    def __init__(self, session, interval, timeout, clock=time.monotonic):
        self.session = session
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self._timer = None
        self._pong_timer = None
        self._sent_at = None
        self._round = None
        self._stopped = False

    def start(self):
        """Begin once the session has written its first business frame (never before)."""
        self.session.first_business_write.rawlink(self._arm)

    def stop(self):
        self._stopped = True
        self.session.first_business_write.unlink(self._arm)
        self._disarm()
        self._end_pong_wait()
        if self._round is not None and self._round is not gevent.getcurrent():
            self._round.kill(block=False)

    def _arm(self, _event=None):
        self._disarm()
        if self._stopped:
            return
        delay = ping_due_in(self.clock(), self.session.last_downstream_write, self.interval)
        self._timer = gevent.get_hub().loop.timer(max(0.0, delay))
        self._timer.start(self._due)

    def _disarm(self):
        self._timer = cancel_timer(self._timer)

    def _due(self):
        # In the hub: a write since the timer was set moves the Ping back; otherwise the round starts here, or in
        # a greenlet when the Ping cannot be written without blocking.
        if ping_due_in(self.clock(), self.session.last_downstream_write, self.interval) > 0:
            self._arm()
        elif not self._stopped:
            self._disarm()
            if not self._ping_from_hub():
                self._round = gevent.spawn(self._ping_round)

    def _expect(self):
        payload = b"wsrelay-keepalive-%d" % next(self._counter)
        self.session.pong_event.clear()
        self.session.expected_pong = payload
        return payload

    def _ping_from_hub(self):
        """The round without a greenlet; False when the Ping could not be written without blocking."""
        session = self.session
        try:
            sent_at = session.try_send_ping(self._expect())
        except OSError as exc:
            session.keepalive_failed("ping write failed: %s" % (exc.strerror or exc))
            return True
        if sent_at is None:
            return False
        self._sent_at = sent_at
        self._pong_timer = gevent.get_hub().loop.timer(self.timeout)
        self._pong_timer.start(self._pong_missing)
        session.pong_event.rawlink(self._pong_seen)
        return True

    def _end_pong_wait(self):
        self.session.pong_event.unlink(self._pong_seen)
        self._pong_timer = cancel_timer(self._pong_timer)

    def _pong_seen(self, _event):
        self._end_pong_wait()
        if self._stopped:
            return
        session = self.session
        session.trace(STAGE_OK, direction=DIRECTION, graceful=True, wrote_downstream=session.wrote_downstream,
                      rtt_ms=round((self.clock() - self._sent_at) * 1000.0, 3))
        self._arm()

    def _pong_missing(self):
        self._end_pong_wait()
        if not self._stopped:
            self.session.keepalive_failed("no pong within %gs" % self.timeout)

    def _ping_round(self):
        session = self.session
        payload = self._expect()
        try:
            sent_at = session.send_ping(payload, self.interval)
        except PingUnsupported:
            session.trace(STAGE_UNSUPPORTED, direction=DIRECTION, graceful=True,
                          wrote_downstream=session.wrote_downstream)
            return
        except OSError as exc:
            session.keepalive_failed("ping write failed: %s" % (exc.strerror or exc))
            return
        if sent_at is not None:  # None: a business write happened while waiting for the frame boundary
            try:
                with gevent.Timeout(self.timeout):
                    session.pong_event.wait()
            except gevent.Timeout:
                session.keepalive_failed("no pong within %gs" % self.timeout)
                return
            session.trace(STAGE_OK, direction=DIRECTION, graceful=True, wrote_downstream=session.wrote_downstream,
                          rtt_ms=round((self.clock() - sent_at) * 1000.0, 3))
        self._round = None
        self._arm()


APP_KEEPALIVE_FRAME = b"\x81\x14" + b'{"type":"keepalive"}'
STAGE_APP = "downstream_app_keepalive"


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


class AppKeepalive:
    """Text-frame keepalive for clients whose own idle watchdog ignores Pings (Codex's does).

    Only during a turn, only after the first business write, only when no *business* frame went down for
    ``interval``, and only at a message boundary (a text frame inside a fragmented message would break it).
    """

    def __init__(self, session, interval, clock=time.monotonic):
        self.session = session
        self.interval = interval
        self.clock = clock
        self.sent = 0

    def run(self):
        session = self.session
        turn_changed = gevent.event.Event()
        session.turn_watchers.append(turn_changed)
        session.first_business_write.wait()
        last_sent = 0.0
        while True:
            turn_changed.clear()
            if not session.ledger.in_flight:
                turn_changed.wait()
                continue
            delay = ping_due_in(self.clock(), max(session.last_business_write, last_sent), self.interval)
            if delay > 0:
                turn_changed.wait(delay)
                continue
            try:
                sent = session.send_app_keepalive(APP_KEEPALIVE_FRAME)
            except OSError:
                return None  # the pumps see the broken socket and end the session
            if sent:
                self.sent += 1
                last_sent = self.clock()
                session.trace(STAGE_APP, direction=DIRECTION, wrote_downstream=session.wrote_downstream)
            else:
                gevent.sleep(min(self.interval, 0.05))  # mid-message: try again shortly after it ends
