"""The end of a session: settle both sides once the first one ended, and bill every turn.

* The client leaves (close frame, EOF, reset, failed Ping, bad frame) or the relay ends the client side (idle or
  first-message timeout, shutdown) — stop writing downstream; if a turn is in flight, hold it for the client's
  retry where the session may (:mod:`wsrelay.resume_ws`), else (or once the hold ended without a retry) *drain*
  the upstream until its terminal event or ``upstream_drain_timeout_seconds``; then close the upstream with the
  client's close code (1001 "client disconnected" when the client gave none, the relay's own code for its
  timers).
* The upstream ends — a close frame is forwarded as it is (its code and reason reach the client); an abrupt end
  becomes close 1011 for the client, a read timeout 1001.  A turn left without a terminal event is recorded
  as failed.
* Whenever the relay closes a side itself (not in reply to that side's Close), it lingers on it: reads and
  discards what that peer still sends until its Close or end of stream, within bounds (:mod:`wsrelay.linger`).
"""

import socket
import time

import gevent

from . import frames, quota, usage
from .exits import UPSTREAM_TO_CLIENT
from .linger import CloseWatch, linger

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
    quota.STAGE: (frames.CLOSE_NORMAL, "account quota exhausted"),
}
_CLIENT_GONE = (frames.CLOSE_GOING_AWAY, "client disconnected")


def settle_client_exit(session, first, up, down):
    """The client side ended first (``up``/``down``: the pump greenlets).  Returns True when the client's retry
    of the turn in flight took the session over while it was held (:mod:`wsrelay.resume_ws`): the upstream
    stays, the session goes on with the new client."""
    session.writer.close()
    if not down.dead and gevent.getcurrent() is not down:
        down.kill()
    if first.stage == "client_close" or first.close_code is not None:
        # The echo of the client's close, or the relay's own reason for closing.
        session.writer.control(frames.build_close(first.close_code, first.close_reason))
    # The client is done with: end its TCP connection now (FIN after the close frame), not after the drain.
    _shutdown_write(session.down_sock)
    if first.stage != "client_close" and first.close_code is not None:
        # The relay's own close: the client may still be sending.
        watch = CloseWatch(session.down_pending, session.down.walker.remaining)
        _linger_on(session, "client", session.down_sock, watch)
    if session.ledger.in_flight and session.upstream_open and not up.dead:
        if session.resume is not None and session.resume.hold(first, up):
            return True
        if session.ledger.in_flight:  # not held, or the hold ended without a retry (the upstream may be gone)
            _drain(session, up)
    if session.upstream_open and not up.dead:
        if not first.close_forwarded and not session.up_mid_frame:
            if first.stage == "client_close":
                code, reason = first.close_code or frames.CLOSE_NORMAL, first.close_reason
            else:
                code, reason = _UPSTREAM_CLOSE.get(first.stage, _CLIENT_GONE)
            session.send_up(frames.build_close(code, reason, mask=True))
        up.join(session.settings.close_timeout_seconds)  # the upstream's close in reply ends the pump
    gevent.joinall(session.lingering)
    return False


def settle_upstream_exit(session, first, up, down):
    """The upstream side ended first."""
    if session.ledger.in_flight:
        lost = usage.RELAY_READ_TIMEOUT if first.stage == "upstream_read_timeout" else usage.RELAY_UPSTREAM_LOST
        session.record(session.ledger.abandon(lost, not session.writer.open))
    if first.stage in _UPSTREAM_CLOSE and not session.up_mid_frame:
        session.upstream_open = True  # still sound: tell it why the relay leaves
        session.send_up(frames.build_close(*_UPSTREAM_CLOSE[first.stage], mask=True))
        session.upstream_open = False
        if not up.dead and gevent.getcurrent() is not up:
            up.kill()  # nothing more of the upstream's goes to the client
        _shutdown_write(session.up_sock)
        _linger_on(session, "upstream", session.up_sock, CloseWatch(session.up_pending, session.up.walker.remaining))
    if session.writer.open:
        if first.stage != "upstream_close":
            session.writer.control(frames.build_close(*_CLIENT_CLOSE.get(first.stage, _UPSTREAM_LOST)))
        elif not first.close_forwarded:
            session.writer.control(frames.build_close(first.close_code, first.close_reason))
        down.join(session.settings.close_timeout_seconds)  # the client's close in reply ends the pump
    gevent.joinall(session.lingering)


def _drain(session, up):
    """Read the upstream (writes to the client are off) until no turn is in flight, it ends, or the drain times
    out; a turn left in flight is billed with the reason."""
    session.draining = True
    timeout = session.settings.upstream_drain_timeout_seconds
    wrote = session.wrote_downstream
    session.trace("drain_start", direction=UPSTREAM_TO_CLIENT, graceful=True, wrote_downstream=wrote,
                  timeout_s=timeout)
    started = time.monotonic()
    session.drain_done.wait(timeout)
    waited_ms = int((time.monotonic() - started) * 1000)
    if not session.ledger.in_flight:
        session.trace("drain_terminal", direction=UPSTREAM_TO_CLIENT, graceful=True, wrote_downstream=wrote,
                      waited_ms=waited_ms)
    elif up.dead:
        session.trace("drain_upstream_lost", direction=UPSTREAM_TO_CLIENT, graceful=False, wrote_downstream=wrote,
                      waited_ms=waited_ms, error=up.value and up.value.error)
        session.record(session.ledger.abandon(usage.RELAY_UPSTREAM_LOST, True))
    else:
        session.trace("drain_timeout", direction=UPSTREAM_TO_CLIENT, graceful=True, wrote_downstream=wrote,
                      waited_ms=waited_ms)
        session.record(session.ledger.abandon(usage.RELAY_DRAIN_TIMEOUT, True))
    session.draining = False


def _linger_on(session, side, sock, watch):
    ws = session.settings

    def run():
        lingered = linger(sock, watch, ws.lingering_close_timeout_seconds, ws.close_timeout_seconds,
                          ws.lingering_close_max_bytes)
        session.trace("lingering_close", side=side, outcome=lingered.outcome,
                      discarded_bytes=lingered.discarded_bytes, waited_ms=lingered.waited_ms)

    session.lingering.append(gevent.spawn(run))


def _shutdown_write(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
