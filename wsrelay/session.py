"""One client connection and its upstream: two frame streams, one pump loop per direction, one downstream writer.

The session is composed, not layered: a :class:`~wsrelay.framestream.FrameStream` per direction decides every
frame's fate (sans I/O), :func:`Session._pump` is the one loop both directions run (read, feed, act), the
:class:`~wsrelay.writer.DownstreamWriter` is the only writer to the client, :class:`~wsrelay.usage.TurnLedger` bills
the responses, the keepalives (:mod:`wsrelay.keepalive`) keep a silent turn's client connection open, the
:class:`~wsrelay.timers.SessionTimer` ends sessions that go quiet, and :mod:`wsrelay.closing` settles both sides
once the first one ended.  How a side ended is an :class:`~wsrelay.exits.Exit` value; the first one reported wins.

With turn resume (:mod:`wsrelay.resume_ws`, the session's ``resume``), a client that left mid-turn may be
followed by its retry on another connection: the session then goes on with that client (:meth:`take_client`) on
the same upstream, and the upstream pump never stops.
"""

import socket
import time
import uuid

import gevent
from gevent.event import Event

from . import closing, frames, quota, usage
from .exits import CLIENT_TO_UPSTREAM, KEEPALIVE, UPSTREAM_TO_CLIENT, Exit
from .framestream import (CloseArrived, FrameStream, Forward, HeldEvent, LedgerEvent, PingArrived, PongArrived,
                          TurnStarted, Violation)
from .frames import OP_PONG
from .keepalive import STAGE_FAILED, AppKeepalive, Keepalive
from .timers import SessionTimer
from .writer import APP_KEEPALIVE, PING, DownstreamWriter, describe, send_all

_READ_DIRECTION = {"client": CLIENT_TO_UPSTREAM, "upstream": UPSTREAM_TO_CLIENT}


class Session:
    """One client connection and its upstream.  ``run()`` blocks (in the connection's greenlet) until both end.

    ``initial``/``up_initial`` are bytes read along with the client's handshake and the upstream's 101;
    ``app_keepalive`` is ``(on, why)`` from :func:`wsrelay.keepalive.app_keepalive_choice`;
    ``account_switch`` the session's :class:`~wsrelay.quota.AccountSwitch` (None: quota errors go to the client).
    """

    def __init__(self, down_sock, up_sock, config, tracer, store=None, key_id=None, initial=b"",
                 session_id=None, ping_supported=True, up_initial=b"", app_keepalive=(False, "not_codex"),
                 account=None, account_switch=None):
        self.id = session_id or uuid.uuid4().hex[:12]
        self.down_sock = down_sock
        self.up_sock = up_sock
        self.tracer = tracer
        self.store = store
        self.key_id = key_id
        self.settings = ws = config.gateway.openai_ws
        self.app_keepalive, self.app_keepalive_why = app_keepalive
        # Reads wait without a timer (a gevent socket with a timeout arms one per blocking read); writes are bounded
        # by write_timeout_seconds in send_all.
        down_sock.settimeout(None)
        up_sock.settimeout(None)
        self.down = FrameStream(True, read_limit=ws.client_read_limit_bytes, initial=initial)
        self.up = FrameStream(False, max_event_bytes=config.usage.max_event_bytes, initial=up_initial)
        self.account_switch = account_switch
        self.up.hold_errors = account_switch is not None  # error events are read before they are forwarded
        self.writer = DownstreamWriter(down_sock, ws.write_timeout_seconds, self._write_failed, ping_supported)
        self.account = account
        self.ledger = usage.TurnLedger(self.id, key_id, account=account)
        self.timer = SessionTimer(self)
        self.pong_event = Event()
        self.turn_changed = Event()  # set when a turn starts or ends (the app keepalive waits on it)
        self.upstream_open = True
        self.up_mid_frame = False  # a client frame is half forwarded to the upstream
        self.draining = False
        self.drain_done = Event()
        self.shutting_down = False
        self.started = self.last_upstream_read = time.monotonic()
        self.turns_started = 0
        self.turn_ended_at = None
        self.bytes_to_upstream = 0
        self.exit = None
        self.exit_event = Event()
        self.lingering = []  # greenlets reading what a peer still sends after the relay's own close
        # The bytes from a bad frame on, when a stream ended on one: where a lingering close starts walking.
        self.down_pending = self.up_pending = b""
        self.resume = None  # the TurnCopy (wsrelay.resume_ws) of a session that may hold its turn for a retry
        self.stash = None  # while a turn is held: the records kept back until its fate is known
        self.lent = None  # the client connection a retry lent to this session, once one did

    @property
    def wrote_downstream(self):
        """A business frame has been written to the client (what the trace lines say as wrote_downstream)."""
        return self.writer.wrote_business

    def relayed(self):
        """Bytes and frames relayed so far by direction (the metrics read it)."""
        return {"bytes": {CLIENT_TO_UPSTREAM: self.bytes_to_upstream, UPSTREAM_TO_CLIENT: self.writer.bytes},
                "frames": {CLIENT_TO_UPSTREAM: self.down.walker.frames, UPSTREAM_TO_CLIENT: self.up.walker.frames}}

    def run(self):
        ws = self.settings
        self.trace("relay_start", key_id=self.key_id, ping_interval=ws.passthrough_downstream_ping_interval_seconds,
                   app_keepalive=self.app_keepalive, app_keepalive_why=self.app_keepalive_why)
        up = gevent.spawn(self._pump, "upstream")
        first = None
        try:
            resumed = True
            while resumed:  # a client, then each retry that resumed the turn its predecessor left
                first, resumed = self._serve(up)
        finally:
            self.timer.disarm()
            gevent.killall([up] + self.lingering)
            for sock in (self.down_sock, self.up_sock):
                _close(sock)
            if self.lent is not None:
                self.lent.done.set()
            if self.stash is not None:  # a hold cut short by an error: its records still count
                self.record(self.stash)
                self.stash = None
            if self.ledger.in_flight:
                self.record(self.ledger.abandon(usage.RELAY_SESSION_CLOSED, not self.writer.open))
            self.record(self.ledger.close())
            self.trace("relay_complete", cause=first.stage if first else "error",
                       graceful=first.graceful if first else False, wrote_downstream=self.wrote_downstream,
                       duration_ms=int((time.monotonic() - self.started) * 1000), turns=self.turns_started,
                       bytes_to_upstream=self.bytes_to_upstream, bytes_to_client=self.writer.bytes)
            # The parts that point back at the session let go of it: it is freed when its last user drops it,
            # not at the next full collection (sessions ending faster than those come grew the heap for good).
            self.writer.detach()
            self.timer.session = None
            self.resume = None  # its TurnCopy points back here too
        return first

    def _serve(self, up):
        """One client's part of the session, up to its settling; ``(first exit, resumed)``: ``resumed`` when a
        retry of the turn in flight took the session over (its client is the current one now)."""
        ws = self.settings
        down = gevent.spawn(self._pump, "client")
        helpers = []
        self.timer.arm()
        keepalive = None
        if ws.passthrough_downstream_ping_interval_seconds > 0:
            keepalive = Keepalive(self.writer, self._expect_pong, self.pong_event,
                                  ws.passthrough_downstream_ping_interval_seconds,
                                  ws.passthrough_downstream_ping_timeout_seconds, self.trace, self.keepalive_failed)
            keepalive.start()
        if self.app_keepalive:
            app = AppKeepalive(self.writer, lambda: self.ledger.in_flight, lambda: not self.up.in_message,
                               self.turn_changed, ws.passthrough_downstream_app_keepalive_interval_seconds,
                               self.trace)
            helpers.append(gevent.spawn(app.run))
        try:
            self.exit_event.wait()
            first = self.exit
            self.trace("first_exit", cause=first.stage, direction=first.direction, side=first.side,
                       graceful=first.graceful, wrote_downstream=self.wrote_downstream, error=first.error,
                       close_code=first.close_code, turn_in_flight=self.ledger.in_flight)
            if keepalive is not None:
                keepalive.stop()
            gevent.killall([g for g in helpers if g is not gevent.getcurrent()])
            if first.side == "client":
                return first, closing.settle_client_exit(self, first, up, down)
            closing.settle_upstream_exit(self, first, up, down)
            return first, False
        finally:
            if keepalive is not None:
                keepalive.stop()
            gevent.killall([down] + helpers)

    def take_client(self, lent):
        """A retry of the held turn takes the session over: its connection (a :class:`~wsrelay.resume_ws.Lent`)
        becomes the client side.  Returns the writer to it, which the caller makes the session's once the held
        frames are written (until then the upstream pump writes nowhere)."""
        ws = self.settings
        if self.lent is not None:
            self.lent.done.set()  # the previous retry's connection is done with
        self.lent = lent
        frames_before = self.down.walker.frames
        self.down_sock = lent.sock
        lent.sock.settimeout(None)
        self.down = FrameStream(True, read_limit=ws.client_read_limit_bytes, initial=lent.initial)
        self.down.walker.frames += frames_before
        writer = DownstreamWriter(lent.sock, ws.write_timeout_seconds, self._write_failed, lent.ping_supported)
        writer.bytes = self.writer.bytes
        self.app_keepalive, self.app_keepalive_why = lent.app_keepalive
        self.exit = None
        self.exit_event.clear()
        self.pong_event.clear()
        self.drain_done.clear()
        self.down_pending = b""
        return writer

    # -- the pump: one loop for both directions ------------------------------------------------------------------

    def _pump(self, side):
        """Read ``side``, feed its frame stream, act on what it says; returns how the side ended."""
        client = side == "client"
        sock, stream = (self.down_sock, self.down) if client else (self.up_sock, self.up)
        act = self._on_client_frames if client else self._on_upstream_frames
        try:
            actions = stream.received(0)  # bytes read along with the handshake come first
            while True:
                if actions:
                    ended = act(actions)
                    if ended is not None:
                        return ended
                try:
                    n = sock.recv_into(stream.buffer())
                except socket.timeout:
                    actions = None  # only while a write on this socket carries the write timeout: read on
                    continue
                except OSError as exc:
                    return self.report(Exit(side + "_reset", _READ_DIRECTION[side], side, client,
                                            error=describe(exc)))
                if not n:
                    return self.report(Exit(side + "_eof", _READ_DIRECTION[side], side, client,
                                            error="%s closed the connection without a close frame" % side))
                if not client:
                    self.last_upstream_read = time.monotonic()
                actions = stream.received(n)
        finally:
            if not client:
                self.drain_done.set()

    def _on_client_frames(self, actions):
        for action in actions:
            kind = action.__class__
            if kind is Forward:
                data, mid_frame, _ = action
                if self.resume is not None:
                    self.resume.sent(data, mid_frame)
                if not self.send_up(data, mid_frame):
                    return self.exit
            elif kind is TurnStarted:
                # A turn starts once its whole request has reached the upstream: a request cut short starts none.
                self.turns_started += 1
                self.record(self.ledger.start_turn(action.model))
                if self.resume is not None:
                    self.resume.started()
                self._turn_changed()
                self.trace("turn_start", direction=CLIENT_TO_UPSTREAM, model=action.model,
                           responses_in_flight=self.ledger.open_responses)
            elif kind is PongArrived:
                self.pong_event.set()
            elif kind is CloseArrived:
                # Mid-turn the close is held: forwarding it could end the turn upstream before it is billed.
                forward = not self.ledger.in_flight
                if forward:
                    self.send_up(action.frame)
                return self.report(Exit("client_close", CLIENT_TO_UPSTREAM, "client", True, close_code=action.code,
                                        close_reason=action.reason, close_forwarded=forward))
            elif kind is Violation:
                self.down_pending = action.pending
                stage = ("client_message_too_big" if action.code == frames.CLOSE_MESSAGE_TOO_BIG
                         else "client_protocol_error")
                return self.report(Exit(stage, CLIENT_TO_UPSTREAM, "client", False, error=action.reason,
                                        close_code=action.code, close_reason=action.reason))
        return None

    def _on_upstream_frames(self, actions):
        for action in actions:
            kind = action.__class__
            if kind is Forward:
                if self.resume is not None:
                    self.resume.received(*action)
                self.writer.forward(*action)
            elif kind is LedgerEvent:
                self._on_ledger_event(action.payload)
            elif kind is HeldEvent:
                self._on_held_event(action)
            elif kind is PingArrived:
                if not self.writer.open:
                    # Nobody downstream answers now; answer for the client so the drain is not cut short.
                    self.send_up(frames.build_frame(OP_PONG, action.payload, mask=True))
            elif kind is CloseArrived:
                forwarded = self.writer.open
                self.writer.forward(action.frame, False, False)
                return self.report(Exit("upstream_close", UPSTREAM_TO_CLIENT, "upstream", True,
                                        close_code=action.code, close_reason=action.reason,
                                        close_forwarded=forwarded))
            elif kind is Violation:
                self.up_pending = action.pending
                return self.report(Exit("upstream_protocol_error", UPSTREAM_TO_CLIENT, "upstream", False,
                                        error=action.reason, close_code=action.code))
        if self.draining and not self.ledger.in_flight:
            self.drain_done.set()
        return None

    def _on_ledger_event(self, payload):
        event = usage.parse_event(payload)
        if event is not None:
            self._on_event(event)

    def _on_held_event(self, action):
        """A message that may be an ``error`` event, held back: a quota error ends the session (see
        :mod:`wsrelay.quota`) when another account can take the client's retry; anything else goes on."""
        event = usage.parse_event(action.payload)
        code = quota.exhausted(event) if event is not None and self.writer.open and self.exit is None else None
        if code is not None and self.account_switch.elsewhere():
            self._on_event(event)  # the turn is recorded while the client is still there
            seconds = self.account_switch.cool_down(event, code)
            self.trace(quota.STAGE, account=self.account, code=code, status=event.get("status"),
                       cooldown_s=round(seconds, 3), wrote_downstream=self.wrote_downstream)
            # The upstream pump reads on: the relay's close to the upstream is answered there.
            self.report(Exit(quota.STAGE, UPSTREAM_TO_CLIENT, "client", True, error="account out of quota: " + code,
                             close_code=quota.CLOSE_TRY_AGAIN_LATER, close_reason=quota.CLOSE_REASON))
            return
        if self.resume is not None:
            self.resume.received(action.frame, False)
        self.writer.forward(action.frame, False, True)
        if event is not None:
            self._on_event(event)

    def _on_event(self, event):
        in_flight = self.ledger.in_flight
        self.record(self.ledger.on_event(event, client_disconnected=not self.writer.open))
        if in_flight and not self.ledger.in_flight:
            if self.resume is not None:
                self.resume.ended()
            self.turn_ended_at = time.monotonic()
            self._turn_changed()
            if self.shutting_down:
                self.shutdown()

    # -- what the parts share ----------------------------------------------------------------------------------

    def trace(self, stage, **fields):
        self.tracer.emit(stage, session=self.id, **fields)

    def report(self, exit_):
        """Record how a side ended (the first report wins) and stop using a connection that is broken."""
        if self.exit is None:
            self.exit = exit_
            self.exit_event.set()
        if exit_.side == "client":
            self.writer.close()
        elif exit_.stage != "upstream_close":
            self.upstream_open = False  # after a close frame the upstream still expects our close in reply
        return exit_

    def record(self, records):
        if self.stash is not None:
            self.stash.extend(records)  # a held turn's: written once it is resumed or let go
            return
        for record in records:
            self.trace("usage_recorded", **{name: getattr(record, name) for name in usage.REPORT_FIELDS})
            if self.store is not None:
                self.store.put(record)

    def send_up(self, data, mid_frame=False):
        """Write to the upstream; False (and the upstream reported gone) when it cannot be written."""
        if not self.upstream_open:
            return True
        try:
            send_all(self.up_sock, data, self.settings.write_timeout_seconds)
        except (OSError, socket.timeout) as exc:
            self.report(Exit("upstream_write_failed", CLIENT_TO_UPSTREAM, "upstream", False, error=describe(exc)))
            return False
        self.bytes_to_upstream += len(data)
        self.up_mid_frame = mid_frame
        return True

    def _write_failed(self, what, exc):
        # The writer's one way to report: a failed Ping is the keepalive's news, any other write the client's end.
        if what == PING:
            self.keepalive_failed("ping write failed: %s" % describe(exc))
        else:
            direction = KEEPALIVE if what == APP_KEEPALIVE else UPSTREAM_TO_CLIENT
            self.report(Exit("client_write_failed", direction, "client", True, error=describe(exc)))

    def keepalive_failed(self, error):
        if self.exit is not None:
            return None  # the session already ended another way; the failed Ping is not news
        self.trace(STAGE_FAILED, direction=KEEPALIVE, graceful=True, wrote_downstream=self.wrote_downstream,
                   error=error)
        return self.report(Exit("downstream_ping_failed", KEEPALIVE, "client", True, error=error))

    def _expect_pong(self, payload):
        self.pong_event.clear()
        self.down.expected_pong = payload

    def _turn_changed(self):
        self.timer.arm()
        self.turn_changed.set()

    def shutdown(self, force=False):
        """The server is stopping: close the client with 1001 now if no turn is in flight (or ``force``),
        else as soon as the turn's terminal event has been forwarded."""
        self.shutting_down = True
        if self.resume is not None:
            self.resume.release("server_shutdown")
        if force or not self.ledger.in_flight:
            self.report(Exit("server_shutdown", CLIENT_TO_UPSTREAM, "client", True,
                             close_code=frames.CLOSE_GOING_AWAY, close_reason="server shutting down"))


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
