"""A relay session's life cycle: start the pumps, take the first exit, settle both sides, bill the turn.

* The client leaves (close frame, EOF, reset, failed Ping, bad frame) — stop writing downstream; if a turn is in
  flight, *drain* the upstream until its terminal event or ``upstream_drain_timeout_seconds``; then close the
  upstream with the client's close code (1001 when the client gave none).
* The upstream ends — a close frame is forwarded as it is (its code and reason reach the client); an abrupt end
  becomes close 1011 for the client.  A turn left without a terminal event is recorded as failed.
"""

import time

import gevent

from . import frames, usage
from .keepalive import Keepalive
from .splice import Splice


class Session(Splice):
    """One client connection and its upstream.  ``run()`` blocks (in the connection's greenlet) until both end."""

    def run(self):
        started = time.monotonic()
        self.trace("relay_start", key_id=self.key_id, ping_interval=self.ping_interval)
        up = gevent.spawn(self._pump_upstream)
        down = gevent.spawn(self._pump_downstream)
        keepalive = None
        if self.ping_interval > 0:
            keepalive = gevent.spawn(Keepalive(self, self.ping_interval, self.ping_timeout).run)
        first = None
        try:
            self._exit_event.wait()
            first = self._exit
            self.trace("first_exit", cause=first.stage, direction=first.direction, side=first.side,
                       graceful=first.graceful, wrote_downstream=self.wrote_downstream, error=first.error,
                       close_code=first.close_code, turn_in_flight=self.ledger.in_flight)
            if keepalive is not None:
                keepalive.kill()
            if first.side == "client":
                self._settle_client_exit(first, up, down)
            else:
                self._settle_upstream_exit(first, up, down)
        finally:
            gevent.killall([g for g in (up, down, keepalive) if g is not None])
            for sock in (self.down_sock, self.up_sock):
                _close(sock)
            if self.ledger.in_flight:
                self._record(self.ledger.abandon(usage.RELAY_SESSION_CLOSED, not self.downstream_open))
            self._record(self.ledger.close())
            self.trace("relay_complete", cause=first.stage if first else "error",
                       graceful=first.graceful if first else False, wrote_downstream=self.wrote_downstream,
                       duration_ms=int((time.monotonic() - started) * 1000), bytes_to_upstream=self.bytes_to_upstream,
                       bytes_to_client=self.bytes_to_client)
        return first

    def _settle_client_exit(self, first, up, down):
        self.downstream_open = False
        if not down.dead and gevent.getcurrent() is not down:
            down.kill()
        self._answer_client(first)
        if self.ledger.in_flight and self.upstream_open and not up.dead:
            self._drain(up)
        if self.upstream_open and not up.dead:
            if not first.close_forwarded and not self._up_mid_frame:
                if first.stage == "client_close":
                    code, reason = first.close_code or frames.CLOSE_NORMAL, first.close_reason
                else:
                    code, reason = frames.CLOSE_GOING_AWAY, "client disconnected"
                self._send_up(frames.build_close(code, reason, mask=True))
            up.join(self.close_timeout)  # the upstream's close in reply ends the pump

    def _answer_client(self, first):
        """Complete the closing handshake the client started, or tell it why the relay is closing."""
        if first.stage == "client_close":
            self._send_down_control(frames.build_close(first.close_code, first.close_reason))
        elif first.close_code in (frames.CLOSE_PROTOCOL_ERROR, frames.CLOSE_INVALID_PAYLOAD,
                                  frames.CLOSE_MESSAGE_TOO_BIG):
            self._send_down_control(frames.build_close(first.close_code, first.close_reason))

    def _drain(self, up):
        self.draining = True
        deadline = self.drain_timeout
        self.trace("drain_start", direction="upstream_to_client", graceful=True,
                   wrote_downstream=self.wrote_downstream, timeout_s=deadline)
        started = time.monotonic()
        self._drain_done.wait(deadline)
        waited_ms = int((time.monotonic() - started) * 1000)
        if not self.ledger.in_flight:
            self.trace("drain_terminal", direction="upstream_to_client", graceful=True,
                       wrote_downstream=self.wrote_downstream, waited_ms=waited_ms)
        elif up.dead:
            self.trace("drain_upstream_lost", direction="upstream_to_client", graceful=False,
                       wrote_downstream=self.wrote_downstream, waited_ms=waited_ms, error=up.value and up.value.error)
            self._record(self.ledger.abandon(usage.RELAY_UPSTREAM_LOST, True))
        else:
            self.trace("drain_timeout", direction="upstream_to_client", graceful=True,
                       wrote_downstream=self.wrote_downstream, waited_ms=waited_ms)
            self._record(self.ledger.abandon(usage.RELAY_DRAIN_TIMEOUT, True))
        self.draining = False

    def _settle_upstream_exit(self, first, up, down):
        if self.ledger.in_flight:
            self._record(self.ledger.abandon(usage.RELAY_UPSTREAM_LOST, not self.downstream_open))
        if self.downstream_open:
            if first.stage != "upstream_close":
                reason = ("upstream protocol error" if first.stage == "upstream_protocol_error"
                          else "upstream connection lost")
                self._send_down_control(frames.build_close(frames.CLOSE_INTERNAL_ERROR, reason))
            elif not first.close_forwarded:
                self._send_down_control(frames.build_close(first.close_code, first.close_reason))
            down.join(self.close_timeout)  # the client's close in reply ends the pump (and goes upstream)
        if first.stage == "upstream_protocol_error" and not self._up_mid_frame:
            self.upstream_open = True
            self._send_up(frames.build_close(frames.CLOSE_PROTOCOL_ERROR, first.error or "", mask=True))


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
