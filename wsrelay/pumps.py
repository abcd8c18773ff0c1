"""The frame-aware splice between one client and its upstream WebSocket: the two pumps.

Masked client frames are valid as they are towards the upstream (the relay is a client there) and unmasked
upstream frames are valid towards the client, so each pump receives into a buffer, walks the frame *headers*
(:mod:`wsrelay.walk`, in C where it is built) and forwards the bytes verbatim.  Payloads are never unmasked,
re-masked or re-encoded; the relay looks only at control frames, at a short prefix of client text messages (to
see a turn start) and at upstream text messages that may be terminal events (to bill the turn).

Each pump reports how its side ended as an :class:`~wsrelay.splice.Exit` value (the first one wins);
:mod:`wsrelay.relay` settles the session from there.
"""

import time

from . import frames, usage
from .frames import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, ProtocolError
from .sniff import SNIFF_CLIENT_BYTES, SNIFF_UPSTREAM_BYTES, UpstreamMessage, sniff_create
from .splice import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, Exit, Splice
from .walk import NEED_MORE

# Receive buffers start small (an idle session costs little) and double, up to MAX_BUFFER_SIZE, whenever a read
# fills one (a busy stream moves in fewer, larger reads).
BUFFER_SIZE = 1024
MAX_BUFFER_SIZE = 256 * 1024


class Pumps(Splice):
    """A splice with its two pumps: :meth:`_pump_upstream` and :meth:`_pump_downstream`, one greenlet each."""

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
                    self.up_pending = bytes(view[pos:end])
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
                            if usage.may_be_ledger_event(bytes(view[start:start + SNIFF_UPSTREAM_BYTES])):
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
                    self.down_pending = bytes(view[pos:end])
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
                        self.down_pending = bytes(view[pos:end])  # starts with the client's (bad) Close
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
