"""The frame-aware splice between one client and its upstream WebSocket: the two pumps and their plumbing.

Masked client frames are valid as they are towards the upstream (the relay is a client there) and unmasked
upstream frames are valid towards the client, so each pump receives into a buffer, walks the frame *headers* and
forwards the bytes verbatim.  Payloads are never unmasked, re-masked or re-encoded; the relay looks only at
control frames, at a short prefix of client text messages (to see a turn start) and at upstream text messages
that may be terminal events (to bill the turn).

Each pump reports how its side ended as an :class:`Exit` value (the first one wins); :mod:`wsrelay.relay`
settles the session from there.
"""

import socket
import ssl
import time
import uuid
from dataclasses import dataclass

import gevent
from gevent import ssl as gevent_ssl
from gevent.event import Event
from gevent.lock import Semaphore

from . import frames, usage
from .sniff import SNIFF_CLIENT_BYTES, SNIFF_UPSTREAM_BYTES, UpstreamMessage, sniff_create
from .walk import NEED_MORE, Walker
from .frames import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, ProtocolError
from .keepalive import STAGE_FAILED, PingUnsupported

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
KEEPALIVE = "downstream_keepalive"

# Receive buffers start small (an idle session costs little) and double, up to MAX_BUFFER_SIZE, whenever a read
# fills one (a busy stream moves in fewer, larger reads).
_READ_DIRECTION = {"client": CLIENT_TO_UPSTREAM, "upstream": UPSTREAM_TO_CLIENT}
BUFFER_SIZE = 1024
MAX_BUFFER_SIZE = 256 * 1024


@dataclass(frozen=True)
class Exit:
    """How a session's first side ended.

    ``side`` is the connection that ended (``client`` or ``upstream``; the relay's own timers and shutdown end
    the client side).  ``close_code``/``close_reason``: for ``client_close`` and ``upstream_close`` the code the
    peer sent; for any other client-side end the close the relay sends the client (None: no close frame).
    """

    stage: str
    direction: str
    side: str
    graceful: bool
    error: str = None
    close_code: int = None
    close_reason: str = ""
    close_forwarded: bool = False


class Splice:
    """Per-connection state shared by the pumps, the keepalive and the session life cycle."""

    def __init__(self, down_sock, up_sock, config, tracer, store=None, key_id=None, initial=b"",
                 session_id=None, ping_supported=True, up_initial=b""):
        self.id = session_id or uuid.uuid4().hex[:12]
        self.down_sock = down_sock
        self.up_sock = up_sock
        self.tracer = tracer
        self.store = store
        self.key_id = key_id
        self.initial = initial        # client bytes read along with its handshake
        self.up_initial = up_initial  # upstream bytes read along with its 101
        self.ping_supported = ping_supported
        # A TLS write that would block must be retried with the same bytes, so only a plain TCP client gets
        # Pings written straight from the hub (try_send_ping); a TLS one always gets them from a greenlet.
        self._hub_pings = not isinstance(down_sock, (ssl.SSLSocket, gevent_ssl.SSLSocket))
        ws = "gateway.openai_ws."
        self.ping_interval = config[ws + "passthrough_downstream_ping_interval_seconds"]
        self.ping_timeout = config[ws + "passthrough_downstream_ping_timeout_seconds"]
        self.drain_timeout = config[ws + "upstream_drain_timeout_seconds"]
        self.read_limit = config[ws + "client_read_limit_bytes"]
        self.app_keepalive_interval = config[ws + "passthrough_downstream_app_keepalive_interval_seconds"]
        self.first_message_timeout = config[ws + "client_first_message_timeout_seconds"]
        self.idle_timeout = config[ws + "ingress_inter_turn_idle_timeout_seconds"]
        self.read_timeout = config[ws + "read_timeout_seconds"]
        self.close_timeout = config[ws + "close_timeout_seconds"]
        self.write_timeout = config[ws + "write_timeout_seconds"]
        # Reads wait without a timer (a gevent socket with a timeout arms one per blocking read); writes are
        # bounded by write_timeout in _write.
        down_sock.settimeout(None)
        up_sock.settimeout(None)
        self.max_event_bytes = config["usage.max_event_bytes"]
        self.ledger = usage.TurnLedger(self.id, key_id)
        # The frame walk of each direction; its state is the pump's fragmentation state.
        self.down_walker = Walker(True, self.read_limit)
        self.up_walker = Walker(False, 0, _TERMINAL_TYPES)

        self.downstream_open = True
        self.upstream_open = True
        self.draining = False
        self.wrote_downstream = False
        self.first_business_write = Event()
        self.started = self.last_downstream_write = self.last_upstream_read = time.monotonic()
        self.turns_started = 0
        self.turn_ended_at = None
        self.turn_watchers = []  # Events set when a turn starts or ends (the app keepalive waits on one)
        self._timer = None
        self.last_business_write = self.started
        self.shutting_down = False
        self.pong_event = Event()
        self.expected_pong = None
        self._down_lock = Semaphore()
        self._down_locked = False  # held by the upstream pump while a frame is half forwarded
        self._up_mid_frame = False
        self._exit = None
        self._exit_event = Event()
        self._drain_done = Event()
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0

    # Frames read from each side (control frames the relay consumes included).
    @property
    def frames_to_upstream(self):
        return self.down_walker.frames

    @property
    def frames_to_client(self):
        return self.up_walker.frames

    @property
    def down_in_message(self):
        """A fragmented upstream message is being forwarded (nothing of the relay's own may interleave)."""
        return self.up_walker.in_message

    # -- shared plumbing -----------------------------------------------------------------------------------

    def trace(self, stage, **fields):
        self.tracer.emit(stage, session=self.id, **fields)

    def _write(self, sock, data):
        """Write all of ``data`` or raise: :class:`socket.timeout` when the peer takes none of it for
        ``write_timeout`` (per wait), OSError when the connection is gone.

        Only while a write is under way does the socket carry a timeout: a read that starts waiting meanwhile
        may time out, which the pumps take as nothing read.  One ``send`` (no timer, no ``getsockopt`` as in
        gevent's ``sendall``) is all it takes unless the kernel's buffer is full.
        """
        sock.settimeout(self.write_timeout)
        try:
            sent = sock.send(data)
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        finally:
            sock.settimeout(None)

    def _report(self, exit_):
        """Record how a side ended (the first report wins) and stop using a connection that is broken."""
        if self._exit is None:
            self._exit = exit_
            self._exit_event.set()
        if exit_.side == "client":
            self.downstream_open = False
        elif exit_.stage != "upstream_close":
            self.upstream_open = False  # after a close frame the upstream still expects our close in reply
        return exit_

    def _record(self, records):
        for record in records:
            self.trace("usage_recorded", response_id=record.response_id, model=record.model,
                       terminal_event=record.terminal_event, input_tokens=record.input_tokens,
                       output_tokens=record.output_tokens, total_tokens=record.total_tokens,
                       client_disconnected=record.client_disconnected)
            if self.store is not None:
                self.store.put(record)

    def _send_down(self, data, mid_frame, business):
        """Write forwarded bytes to the client; holds the write lock across a half-forwarded frame."""
        if not self.downstream_open:
            if self._down_locked:
                self._down_locked = False
                self._down_lock.release()
            return
        if not self._down_locked:
            self._down_lock.acquire()
            self._down_locked = True
        try:
            self._write(self.down_sock, data)
        except (OSError, socket.timeout) as exc:
            self._down_locked = False
            self._down_lock.release()
            self._report(Exit("client_write_failed", UPSTREAM_TO_CLIENT, "client", True, error=_describe(exc)))
            return
        self.bytes_to_client += len(data)
        self.last_downstream_write = now = time.monotonic()
        if business:
            self.last_business_write = now
            if not self.wrote_downstream:
                self.wrote_downstream = True
                self.first_business_write.set()
        if not mid_frame:
            self._down_locked = False
            self._down_lock.release()

    def _send_down_control(self, frame):
        """Write a frame of the relay's own to the client, at a frame boundary; False if that is impossible."""
        if self._down_locked:
            return False  # a forwarded frame is half written; nothing may follow it but its own bytes
        with self._down_lock:
            try:
                self._write(self.down_sock, frame)
            except (OSError, socket.timeout):
                return False
        return True

    def _turn_changed(self):
        self.arm_timers()
        for event in self.turn_watchers:
            event.set()

    def arm_timers(self):
        """The session timers (see :class:`wsrelay.relay.Session`)."""

    def send_app_keepalive(self, frame):
        """Write a text frame of the relay's own at a *message* boundary; False when not possible right now."""
        with self._down_lock:
            if not self.downstream_open or self.down_in_message or not self.ledger.in_flight:
                return False
            self._write(self.down_sock, frame)
            self.last_downstream_write = time.monotonic()
        return True

    def shutdown(self, force=False):
        """The server is stopping: close the client with 1001 now if no turn is in flight (or ``force``),
        else as soon as the turn's terminal event has been forwarded."""
        self.shutting_down = True
        if force or not self.ledger.in_flight:
            self._report(Exit("server_shutdown", CLIENT_TO_UPSTREAM, "client", True,
                              close_code=frames.CLOSE_GOING_AWAY, close_reason="server shutting down"))

    def send_ping(self, payload, interval):
        """Write a Ping at a frame boundary; returns its send time, or None if a write made it unnecessary."""
        if not self.ping_supported:
            raise PingUnsupported()
        with self._down_lock:
            if not self.downstream_open:
                raise OSError("client already gone")
            if time.monotonic() - self.last_downstream_write < interval:
                return None
            self._write(self.down_sock, frames.build_frame(OP_PING, payload))
            self.last_downstream_write = sent_at = time.monotonic()
        return sent_at

    def try_send_ping(self, payload):
        """Write a Ping from the hub if that cannot block: its send time, or None when the write lock is taken or
        the socket's buffer is full (the keepalive then does it in a greenlet, with :meth:`send_ping`).
        Raises OSError when the client is gone."""
        if not (self._hub_pings and self.ping_supported and self.downstream_open) \
                or not self._down_lock.acquire(blocking=False):
            return None
        frame = frames.build_frame(OP_PING, payload)
        sock = self.down_sock
        sock.settimeout(0.0)
        try:
            sent = sock.send(frame)
        except BlockingIOError:
            self._down_lock.release()
            return None
        except BaseException:
            self._down_lock.release()
            raise
        finally:
            sock.settimeout(None)
        self.last_downstream_write = sent_at = time.monotonic()
        if sent < len(frame):
            # Rare (a nearly full buffer): the rest of the frame follows from a greenlet, under the lock taken.
            gevent.spawn(self._finish_ping, frame[sent:])
        else:
            self._down_lock.release()
        return sent_at

    def _finish_ping(self, rest):
        try:
            self._write(self.down_sock, rest)
        except (OSError, socket.timeout) as exc:
            self._report(Exit("client_write_failed", KEEPALIVE, "client", True, error=_describe(exc)))
        finally:
            self._down_lock.release()

    def keepalive_failed(self, error):
        if self._exit is not None:
            return None  # the session already ended another way; the failed Ping is not news
        self.trace(STAGE_FAILED, direction=KEEPALIVE, graceful=True,
                   wrote_downstream=self.wrote_downstream, error=error)
        return self._report(Exit("downstream_ping_failed", KEEPALIVE, "client", True, error=error))

    def _send_up(self, data, mid_frame=False):
        if not self.upstream_open:
            return True
        try:
            self._write(self.up_sock, data)
        except (OSError, socket.timeout) as exc:
            self._report(Exit("upstream_write_failed", CLIENT_TO_UPSTREAM, "upstream", False, error=_describe(exc)))
            return False
        self.bytes_to_upstream += len(data)
        self._up_mid_frame = mid_frame
        return True

    def _receive(self, sock, view, end, side):
        """One read into ``view[end:]``: the byte count; None after a read timeout (the write timeout is the
        socket's; reading simply goes on); or, when ``side`` is gone, its reported :class:`Exit`."""
        try:
            n = sock.recv_into(view[end:])
        except socket.timeout:
            return None
        except OSError as exc:
            return self._report(Exit(side + "_reset", _READ_DIRECTION[side], side, side == "client",
                                     error=_describe(exc)))
        if not n:
            return self._report(Exit(side + "_eof", _READ_DIRECTION[side], side, side == "client",
                                     error="%s closed the connection without a close frame" % side))
        return n

    # -- upstream -> client --------------------------------------------------------------------------------

    def _pump_upstream(self):
        try:
            return self._splice_upstream()
        finally:
            self._drain_done.set()

    def _splice_upstream(self):
        sock = self.up_sock
        buf, view, end = _initial_buffer(self.up_initial)
        self.up_initial = b""
        walk_first = end > 0
        full = False
        walker = self.up_walker
        message = None         # UpstreamMessage being examined, if any
        while True:
            if not walk_first:
                n = self._receive(sock, view, end, "upstream")
                if n is None:
                    continue
                if n.__class__ is Exit:
                    return n
                full = end + n == len(buf)
                end += n
                self.last_upstream_read = time.monotonic()
            walk_first = False
            pos = 0
            flush_from = 0
            data_frames = walker.data_frames
            finished = []
            while pos < end:
                if message is None:
                    # The fast way over everything of no interest, up to the first frame that is.
                    pos, event = walker.walk(buf, pos, end)
                    if event == NEED_MORE:
                        break
                elif walker.remaining:
                    take = min(walker.remaining, end - pos)
                    if not message.feed(view[pos:pos + take]):
                        message = None
                    pos += take
                    walker.remaining -= take
                    if not walker.remaining and walker.frame_fin and message is not None:
                        finished.append(message.finish())
                        message = None
                    continue
                header = frames.parse_header(buf, pos, end)
                if header is None:
                    break
                walker.frames += 1
                fin, rsv, opcode, mask_key, length, header_length = header
                try:
                    frames.check_header(rsv, opcode, fin, length, mask_key, expect_masked=False)
                    walker.in_message = _check_sequence(opcode, fin, walker.in_message)
                except ProtocolError as exc:
                    self._send_down(view[flush_from:pos], False, walker.data_frames != data_frames)
                    return self._report(Exit("upstream_protocol_error", UPSTREAM_TO_CLIENT, "upstream", False,
                                             error=exc.reason, close_code=exc.code))
                if opcode >= OP_CLOSE:
                    frame_end = pos + header_length + length
                    if frame_end > end:
                        break
                    if opcode == OP_CLOSE:
                        forwarded = self.downstream_open
                        self._send_down(view[flush_from:frame_end], False, walker.data_frames != data_frames)
                        try:
                            code, reason = frames.parse_close(view[pos + header_length:frame_end])
                        except ProtocolError:
                            code, reason = None, ""
                        return self._report(Exit("upstream_close", UPSTREAM_TO_CLIENT, "upstream", True,
                                                 close_code=code, close_reason=reason, close_forwarded=forwarded))
                    if opcode == OP_PING and not self.downstream_open:
                        # Nobody downstream answers now; answer for the client so the drain is not cut short.
                        self._send_up(frames.build_frame(OP_PONG, view[pos + header_length:frame_end], mask=True))
                    pos = frame_end
                    continue
                walker.data_frames += 1
                if opcode != OP_CONTINUATION:
                    message = None
                    if opcode == OP_TEXT:
                        start = pos + header_length
                        if fin and start + length <= end:
                            # The whole message is here (the usual case): look at its first bytes in place
                            # and copy it only if it may be a terminal event.
                            if usage.may_be_terminal(bytes(view[start:start + SNIFF_UPSTREAM_BYTES])):
                                finished.append(bytes(view[start:start + length]))
                        else:
                            message = UpstreamMessage(self.max_event_bytes)
                walker.frame_fin = bool(fin)
                pos += header_length
                walker.remaining = length
                if not length and fin and message is not None:
                    finished.append(message.finish())
                    message = None
            if flush_from < pos:
                self._send_down(view[flush_from:pos], walker.remaining > 0, walker.data_frames != data_frames)
            end = _compact(buf, pos, end)
            if full and len(buf) < MAX_BUFFER_SIZE:
                buf, view = _grow(buf, end)
            for payload in finished:
                if payload is not None:
                    self._on_upstream_event(payload)
            if self.draining and not self.ledger.in_flight:
                self._drain_done.set()

    def _on_upstream_event(self, payload):
        event = usage.parse_event(payload)
        if event is None:
            return
        in_flight = self.ledger.in_flight
        self._record(self.ledger.on_event(event, client_disconnected=not self.downstream_open))
        if in_flight and not self.ledger.in_flight:
            self.turn_ended_at = time.monotonic()
            self._turn_changed()
            if self.shutting_down:
                self.shutdown()

    # -- client -> upstream --------------------------------------------------------------------------------

    def _pump_downstream(self):
        sock = self.down_sock
        buf, view, end = _initial_buffer(self.initial)
        self.initial = b""
        walk_first = end > 0   # bytes read along with the handshake come before anything on the socket
        full = False
        walker = self.down_walker
        sniff = None           # [mask_key, masked prefix, bytes wanted, message longer than that]
        create = None          # (model,) once the open message is known to be a response.create
        while True:
            if not walk_first:
                n = self._receive(sock, view, end, "client")
                if n is None:
                    continue
                if n.__class__ is Exit:
                    return n
                full = end + n == len(buf)
                end += n
            walk_first = False
            pos = 0
            flush_from = 0
            turns = []             # requests whose last byte is in this batch: their turns start once it is sent
            while pos < end:
                if sniff is None and create is None:
                    pos, event = walker.walk(buf, pos, end)
                    if event == NEED_MORE:
                        break
                elif walker.remaining:
                    take = min(walker.remaining, end - pos)
                    if sniff is not None:
                        sniff[1] += view[pos:pos + min(take, sniff[2] - len(sniff[1]))]
                        if len(sniff[1]) >= sniff[2]:
                            create = sniff_create(*sniff)
                            sniff = None
                    pos += take
                    walker.remaining -= take
                    if not walker.remaining and walker.frame_fin and create is not None:
                        turns.append(create[0])
                        create = None
                    continue
                header = frames.parse_header(buf, pos, end)
                if header is None:
                    break
                walker.frames += 1
                fin, rsv, opcode, mask_key, length, header_length = header
                try:
                    frames.check_header(rsv, opcode, fin, length, mask_key, expect_masked=True)
                    walker.in_message = _check_sequence(opcode, fin, walker.in_message)
                    if opcode < OP_CLOSE:
                        message_size = length if opcode != OP_CONTINUATION else walker.message_size + length
                        if message_size > self.read_limit:
                            raise ProtocolError("message of %d bytes is over the %d-byte limit"
                                                % (message_size, self.read_limit), frames.CLOSE_MESSAGE_TOO_BIG)
                except ProtocolError as exc:
                    if self._send_up(view[flush_from:pos]):
                        self._start_turns(turns)
                    stage = ("client_message_too_big" if exc.code == frames.CLOSE_MESSAGE_TOO_BIG
                             else "client_protocol_error")
                    return self._report(Exit(stage, CLIENT_TO_UPSTREAM, "client", False, error=exc.reason,
                                             close_code=exc.code, close_reason=exc.reason))
                if opcode >= OP_CLOSE:
                    frame_end = pos + header_length + length
                    if frame_end > end:
                        break
                    if opcode == OP_PING:
                        pos = frame_end
                        continue
                    payload = frames.unmask(view[pos + header_length:frame_end], mask_key)
                    if opcode == OP_PONG:
                        if payload == self.expected_pong:
                            # The answer to the relay's own Ping: consumed here, the upstream never asked.
                            if not self._send_up(view[flush_from:pos]):
                                return self._exit
                            flush_from = frame_end
                            self.expected_pong = None
                            self.pong_event.set()
                        pos = frame_end
                        continue
                    try:
                        code, reason = frames.parse_close(payload)
                    except ProtocolError as exc:
                        if self._send_up(view[flush_from:pos]):
                            self._start_turns(turns)
                        return self._report(Exit("client_protocol_error", CLIENT_TO_UPSTREAM, "client", False,
                                                 error=exc.reason, close_code=exc.code, close_reason=exc.reason))
                    if self._send_up(view[flush_from:pos]):
                        self._start_turns(turns)
                    # Mid-turn the close is held: forwarding it could end the turn upstream before it is billed.
                    forward = not self.ledger.in_flight
                    if forward:
                        self._send_up(view[pos:frame_end])
                    return self._report(Exit("client_close", CLIENT_TO_UPSTREAM, "client", True,
                                             close_code=code, close_reason=reason, close_forwarded=forward))
                walker.message_size = message_size
                walker.data_frames += 1
                if opcode != OP_CONTINUATION:
                    create = None
                    if opcode == OP_TEXT and length:
                        wanted = min(length, SNIFF_CLIENT_BYTES)
                        start = pos + header_length
                        if start + wanted <= end:  # the prefix is here already (the usual case)
                            create = sniff_create(mask_key, view[start:start + wanted], wanted,
                                                  length > wanted or not fin)
                        else:
                            sniff = [mask_key, bytearray(), wanted, length > wanted or not fin]
                walker.frame_fin = bool(fin)
                pos += header_length
                walker.remaining = length
                if not length and fin and create is not None:
                    turns.append(create[0])
                    create = None
            if flush_from < pos and not self._send_up(view[flush_from:pos], walker.remaining > 0):
                return self._exit
            if turns:
                self._start_turns(turns)
            end = _compact(buf, pos, end)
            if full and len(buf) < MAX_BUFFER_SIZE:
                buf, view = _grow(buf, end)

    def _start_turns(self, models):
        # A turn starts once its whole request has reached the upstream: a request cut short starts nothing.
        for model in models:
            self.turns_started += 1
            self._record(self.ledger.start_turn(model))
            self._turn_changed()
            self.trace("turn_start", direction=CLIENT_TO_UPSTREAM, model=model)
        del models[:]


_TERMINAL_TYPES = tuple(t.encode("ascii") for t in usage.TERMINAL_EVENTS)


def _check_sequence(opcode, fin, in_message):
    """Fragmentation rules (RFC 6455 5.4); returns whether a fragmented data message is open afterwards."""
    if opcode == OP_CONTINUATION:
        if not in_message:
            raise ProtocolError("continuation frame without a message to continue")
        return not fin
    if opcode in (OP_TEXT, OP_BINARY):
        if in_message:
            raise ProtocolError("new data message before the previous one finished")
        return not fin
    return in_message


def _initial_buffer(initial):
    """A pump's receive buffer, holding the bytes read before the splice began: ``(buf, view, end)``."""
    buf = bytearray(max(BUFFER_SIZE, len(initial)))
    buf[:len(initial)] = initial
    return buf, memoryview(buf), len(initial)


def _grow(buf, end):
    bigger = bytearray(2 * len(buf))
    bigger[:end] = buf[:end]
    return bigger, memoryview(bigger)


def _compact(buf, pos, end):
    """Move the unconsumed tail (a partial header or control frame, never payload) to the front."""
    leftover = end - pos
    if leftover and pos:
        buf[:leftover] = buf[pos:end]
    return leftover


def _describe(exc):
    if isinstance(exc, socket.timeout):
        return "write timed out"
    return exc.strerror or str(exc) or exc.__class__.__name__
