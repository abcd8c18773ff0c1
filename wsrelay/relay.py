"""A relay session's life cycle: start the pumps, take the first exit, settle both sides, bill the turn.

* The client leaves (close frame, EOF, reset, failed Ping, bad frame) or the relay ends the client side (idle or
  first-message timeout, shutdown) — stop writing downstream; if a turn is in flight, *drain* the upstream until
  its terminal event or ``upstream_drain_timeout_seconds``; then close the upstream with the client's close code
  (1001 "client disconnected" when the client gave none, the relay's own code for its timers).
* The upstream ends — a close frame is forwarded as it is (its code and reason reach the client); an abrupt end
  becomes close 1011 for the client, a read timeout 1001.  A turn left without a terminal event is recorded
  as failed.
* Whenever the relay closes a side itself (not in reply to that side's Close), it lingers on it: reads and
  discards what that peer still sends until its Close or end of stream, within bounds (:mod:`wsrelay.linger`).
"""

import socket
import time

import gevent

from . import frames, usage
from .keepalive import AppKeepalive, Keepalive, cancel_timer
from .linger import CloseWatch, linger
from .pumps import Pumps
from .splice import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, Exit

# Upstream-side ends other than a close frame: the close the client gets.
_CLIENT_CLOSE = {
    "upstream_protocol_error": (frames.CLOSE_INTERNAL_ERROR, "upstream protocol error"),
    "upstream_read_timeout": (frames.CLOSE_GOING_AWAY, "upstream read timeout"),
}
_UPSTREAM_LOST = (frames.CLOSE_INTERNAL_ERROR, "upstream connection lost")
# Ends after which the upstream connection is still sound: the close it gets from the relay.
_UPSTREAM_CLOSE = {
    "upstream_protocol_error": (frames.CLOSE_PROTOCOL_ERROR, "protocol error"),
    "upstream_read_timeout": (frames.CLOSE_GOING_AWAY, "read timeout"),
    "idle_timeout": (frames.CLOSE_NORMAL, "websocket idle timeout"),
    "client_first_message_timeout": (frames.CLOSE_NORMAL, "client sent no request"),
    "server_shutdown": (frames.CLOSE_GOING_AWAY, "server shutting down"),
}
_CLIENT_GONE = (frames.CLOSE_GOING_AWAY, "client disconnected")


class Session(Pumps):
    """One client connection and its upstream.  ``run()`` blocks (in the connection's greenlet) until both end."""

    def run(self):
        self.trace("relay_start", key_id=self.key_id, ping_interval=self.ping_interval,
                   app_keepalive=self.app_keepalive, app_keepalive_why=self.app_keepalive_why)
        up = gevent.spawn(self._pump_upstream)
        down = gevent.spawn(self._pump_downstream)
        helpers = []
        self.arm_timers()
        keepalive = None
        if self.ping_interval > 0:
            keepalive = Keepalive(self, self.ping_interval, self.ping_timeout)
            keepalive.start()
        if self.app_keepalive:
            helpers.append(gevent.spawn(AppKeepalive(self, self.app_keepalive_interval).run))
        first = None
        try:
            self._exit_event.wait()
            first = self._exit
            self.trace("first_exit", cause=first.stage, direction=first.direction, side=first.side,
                       graceful=first.graceful, wrote_downstream=self.wrote_downstream, error=first.error,
                       close_code=first.close_code, turn_in_flight=self.ledger.in_flight)
            if keepalive is not None:
                keepalive.stop()
            gevent.killall([g for g in helpers if g is not gevent.getcurrent()])
            if first.side == "client":
                self._settle_client_exit(first, up, down)
            else:
                self._settle_upstream_exit(first, up, down)
        finally:
            self.disarm_timers()
            if keepalive is not None:
                keepalive.stop()
            gevent.killall([up, down] + helpers + self._lingering)
            for sock in (self.down_sock, self.up_sock):
                _close(sock)
            if self.ledger.in_flight:
                self._record(self.ledger.abandon(usage.RELAY_SESSION_CLOSED, not self.downstream_open))
            self._record(self.ledger.close())
            self.trace("relay_complete", cause=first.stage if first else "error",
                       graceful=first.graceful if first else False, wrote_downstream=self.wrote_downstream,
                       duration_ms=int((time.monotonic() - self.started) * 1000), turns=self.turns_started,
                       bytes_to_upstream=self.bytes_to_upstream, bytes_to_client=self.bytes_to_client)
        return first

    # -- session timers: one hub timer per session (no greenlet while they wait) ---------------------------------

    def _timer_state(self):
        """``(limit, since, exit)`` of the timer that applies now; a limit of 0 means it is off."""
        if self.ledger.in_flight:
            return self.read_timeout, self.last_upstream_read, lambda: Exit(
                "upstream_read_timeout", UPSTREAM_TO_CLIENT, "upstream", False,
                error="no upstream frame for %gs during a turn" % self.read_timeout)
        if not self.turns_started:
            return self.first_message_timeout, self.started, lambda: Exit(
                "client_first_message_timeout", CLIENT_TO_UPSTREAM, "client", False,
                error="no response.create within %gs" % self.first_message_timeout,
                close_code=frames.CLOSE_POLICY_VIOLATION, close_reason="no request received")
        return self.idle_timeout, self.turn_ended_at, lambda: Exit(
            "idle_timeout", CLIENT_TO_UPSTREAM, "client", True, error="no turn for %gs" % self.idle_timeout,
            close_code=frames.CLOSE_NORMAL, close_reason="websocket idle timeout")

    def arm_timers(self):
        """(Re)schedule the timer for the current state: at start, and whenever a turn starts or ends."""
        self.disarm_timers()
        if self._exit is not None:
            return
        limit, since, _ = self._timer_state()
        if limit:
            self._timer = gevent.get_hub().loop.timer(max(0.0, since + limit - time.monotonic()))
            self._timer.start(self._timer_fired)

    def disarm_timers(self):
        self._timer = cancel_timer(self._timer)

    def _timer_fired(self):
        # In the hub: nothing here may block (_report only sets flags and an Event).
        limit, since, make_exit = self._timer_state()
        if limit and time.monotonic() >= since + limit - 0.001:
            self.disarm_timers()
            self._report(make_exit())
        else:
            self.arm_timers()  # the deadline moved (an upstream frame arrived during the turn)

    def _settle_client_exit(self, first, up, down):
        self.downstream_open = False
        if not down.dead and gevent.getcurrent() is not down:
            down.kill()
        if first.stage == "client_close" or first.close_code is not None:
            # The echo of the client's close, or the relay's own reason for closing.
            self._send_down_control(frames.build_close(first.close_code, first.close_reason))
        # The client is done with: end its TCP connection now (FIN after the close frame), not after the drain.
        _shutdown_write(self.down_sock)
        if first.stage != "client_close" and first.close_code is not None:
            # The relay's own close: the client may still be sending (see wsrelay.linger).
            self._lingering.append(gevent.spawn(self._linger, "client", self.down_sock,
                                                CloseWatch(self.down_pending, self.down_walker.remaining)))
        if self.ledger.in_flight and self.upstream_open and not up.dead:
            self._drain(up)
        if self.upstream_open and not up.dead:
            if not first.close_forwarded and not self._up_mid_frame:
                if first.stage == "client_close":
                    code, reason = first.close_code or frames.CLOSE_NORMAL, first.close_reason
                else:
                    code, reason = _UPSTREAM_CLOSE.get(first.stage, _CLIENT_GONE)
                self._send_up(frames.build_close(code, reason, mask=True))
            up.join(self.close_timeout)  # the upstream's close in reply ends the pump
        gevent.joinall(self._lingering)

    def _linger(self, side, sock, watch):
        lingered = linger(sock, watch, self.linger_timeout, self.close_timeout, self.linger_max_bytes)
        self.trace("lingering_close", side=side, outcome=lingered.outcome, discarded_bytes=lingered.discarded_bytes,
                   waited_ms=lingered.waited_ms)

    def _drain(self, up):
        self.draining = True
        deadline = self.drain_timeout
        self.trace("drain_start", direction=UPSTREAM_TO_CLIENT, graceful=True,
                   wrote_downstream=self.wrote_downstream, timeout_s=deadline)
        started = time.monotonic()
        self._drain_done.wait(deadline)
        waited_ms = int((time.monotonic() - started) * 1000)
        if not self.ledger.in_flight:
            self.trace("drain_terminal", direction=UPSTREAM_TO_CLIENT, graceful=True,
                       wrote_downstream=self.wrote_downstream, waited_ms=waited_ms)
        elif up.dead:
            self.trace("drain_upstream_lost", direction=UPSTREAM_TO_CLIENT, graceful=False,
                       wrote_downstream=self.wrote_downstream, waited_ms=waited_ms, error=up.value and up.value.error)
            self._record(self.ledger.abandon(usage.RELAY_UPSTREAM_LOST, True))
        else:
            self.trace("drain_timeout", direction=UPSTREAM_TO_CLIENT, graceful=True,
                       wrote_downstream=self.wrote_downstream, waited_ms=waited_ms)
            self._record(self.ledger.abandon(usage.RELAY_DRAIN_TIMEOUT, True))
        self.draining = False

    def _settle_upstream_exit(self, first, up, down):
        if self.ledger.in_flight:
            lost = usage.RELAY_READ_TIMEOUT if first.stage == "upstream_read_timeout" else usage.RELAY_UPSTREAM_LOST
            self._record(self.ledger.abandon(lost, not self.downstream_open))
        if first.stage in _UPSTREAM_CLOSE and not self._up_mid_frame:
            self.upstream_open = True  # still sound: tell it why the relay leaves
            self._send_up(frames.build_close(*_UPSTREAM_CLOSE[first.stage], mask=True))
            self.upstream_open = False
            if not up.dead and gevent.getcurrent() is not up:
                up.kill()  # nothing more of the upstream's goes to the client
            _shutdown_write(self.up_sock)
            self._lingering.append(gevent.spawn(self._linger, "upstream", self.up_sock,
                                                CloseWatch(self.up_pending, self.up_walker.remaining)))
        if self.downstream_open:
            if first.stage != "upstream_close":
                self._send_down_control(frames.build_close(*_CLIENT_CLOSE.get(first.stage, _UPSTREAM_LOST)))
            elif not first.close_forwarded:
                self._send_down_control(frames.build_close(first.close_code, first.close_reason))
            down.join(self.close_timeout)  # the client's close in reply ends the pump (and goes upstream)
        gevent.joinall(self._lingering)


def _shutdown_write(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
