"""A session's timers: one hub timer per session, for whichever limit applies now (no greenlet while it waits).

* a turn in flight: ``read_timeout_seconds`` since the last upstream read (the upstream went silent);
* no turn yet: ``client_first_message_timeout_seconds`` since the start (the client never asked anything);
* between turns: ``ingress_inter_turn_idle_timeout_seconds`` since the last turn ended (an abandoned session).
"""

import time

import gevent

from . import frames
from .exits import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, Exit


def cancel_timer(timer):
    """Stop and release a hub timer (or nothing, for None); returns None, for the attribute that held it."""
    if timer is not None:
        timer.stop()
        timer.close()


class SessionTimer:
    """The limit that applies to ``session`` now, as a hub timer; :meth:`arm` whenever a turn starts or ends."""

    def __init__(self, session):
        self.session = session
        self._timer = None

    def _state(self):
        """``(limit, since, exit)`` of the timer that applies now; a limit of 0 means it is off."""
        session, ws = self.session, self.session.settings
        if session.ledger.in_flight:
            limit = ws.read_timeout_seconds
            return limit, session.last_upstream_read, lambda: Exit(
                "upstream_read_timeout", UPSTREAM_TO_CLIENT, "upstream", False,
                error="no upstream frame for %gs during a turn" % limit)
        if not session.turns_started:
            limit = ws.client_first_message_timeout_seconds
            return limit, session.started, lambda: Exit(
                "client_first_message_timeout", CLIENT_TO_UPSTREAM, "client", False,
                error="no response.create within %gs" % limit,
                close_code=frames.CLOSE_POLICY_VIOLATION, close_reason="no request received")
        limit = ws.ingress_inter_turn_idle_timeout_seconds
        return limit, session.turn_ended_at, lambda: Exit(
            "idle_timeout", CLIENT_TO_UPSTREAM, "client", True, error="no turn for %gs" % limit,
            close_code=frames.CLOSE_NORMAL, close_reason="websocket idle timeout")

    def arm(self):
        """(Re)schedule the timer for the current state: at start, and whenever a turn starts or ends."""
        self.disarm()
        if self.session.exit is not None:
            return
        limit, since, _ = self._state()
        if limit:
            self._timer = gevent.get_hub().loop.timer(max(0.0, since + limit - time.monotonic()))
            self._timer.start(self._fired)

    def disarm(self):
        self._timer = cancel_timer(self._timer)

    def _fired(self):
        # In the hub: nothing here may block (report only sets flags and an Event).
        limit, since, make_exit = self._state()
        if limit and time.monotonic() >= since + limit - 0.001:
            self.disarm()
            self.session.report(make_exit())
        else:
            self.arm()  # the deadline moved (an upstream frame arrived during the turn)
