"""Downstream keepalive: WebSocket Pings to the client while a long turn is silent.

Idle-sensitive proxies in front of the relay (nginx 60 s, Cloudflare 100 s, AWS ALB 60 s) close a client socket
that carries nothing; Ping frames are traffic for all of them.  The rules:

* nothing before the first downstream business frame (a session that never started is never kept alive);
* a Ping only after a full interval without any downstream write (business writes postpone it);
* the Ping goes out at a frame boundary (the session's downstream write lock) and its Pong is awaited with
  ``gevent.Timeout``; a failed write or a missing Pong means the client is gone (a graceful disconnect).

Nothing runs until a Ping is due: a hub timer wakes it, never a polling loop.
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


def ping_due_in(now, last_write, interval):
    """Seconds until a Ping is due, given the time of the last downstream write; <= 0 means now."""
    return last_write + interval - now


class Keepalive:
    """The downstream keepalive of one session.

    Between Pings it is only a hub timer (an idle session holds no greenlet for it); when a Ping is due, a
    short-lived greenlet sends it and awaits the Pong with ``gevent.Timeout``, then re-arms the timer.

    ``session`` provides: ``first_business_write`` (gevent Event), ``last_downstream_write`` (monotonic seconds),
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
        self._round = None
        self._stopped = False

    def start(self):
        """Begin once the session has written its first business frame (never before)."""
        self.session.first_business_write.rawlink(self._arm)

    def stop(self):
        self._stopped = True
        self.session.first_business_write.unlink(self._arm)
        self._disarm()
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
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _due(self):
        # In the hub: a write since the timer was set moves the Ping back; otherwise a greenlet does the round.
        if ping_due_in(self.clock(), self.session.last_downstream_write, self.interval) > 0:
            self._arm()
        elif not self._stopped:
            self._disarm()
            self._round = gevent.spawn(self._ping_round)

    def _ping_round(self):
        session = self.session
        payload = b"wsrelay-keepalive-%d" % next(self._counter)
        session.pong_event.clear()
        session.expected_pong = payload
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
