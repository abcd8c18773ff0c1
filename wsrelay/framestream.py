"""One direction of a relayed WebSocket, sans I/O: bytes in, actions out.

Masked client frames are valid as they are towards the upstream (the relay is a client there) and unmasked
upstream frames are valid towards the client, so a :class:`FrameStream` never unmasks, re-masks or re-encodes a
forwarded payload.  It walks frame *headers* (:mod:`wsrelay.walk`, in C where it is built, steps over everything of
no interest in bulk), and looks only at control frames, at a short prefix of client text messages (to see a turn
start) and at upstream text messages that may be events the usage ledger reads (to bill the turn).

The session reads into :meth:`FrameStream.buffer`, calls :meth:`FrameStream.received` and acts on the returned
actions in order:

:class:`Forward`
    pass ``data`` on verbatim (a memoryview of the stream's buffer, valid until the next :meth:`buffer` call);
    ``mid_frame``: it ends inside a frame (nothing of the relay's own may follow it yet); ``business``: it holds
    data frames (not only control frames);
:class:`TurnStarted`
    (client) a ``response.create`` has been forwarded whole;
:class:`LedgerEvent`
    (upstream) a message that may be a terminal event or ``response.created``, forwarded whole: its payload;
:class:`PongArrived`
    (client) the answer to the relay's own Ping (``expected_pong``): consumed, not forwarded;
:class:`HeldEvent`
    (upstream, only while ``hold_errors`` is set) a whole single-frame text message that may be an ``error``
    event, *not* forwarded: ``frame`` its bytes (valid like a Forward's ``data``), ``payload`` its text; the
    session forwards the frame (then reads the payload as a LedgerEvent's) or swallows it;
:class:`PingArrived`
    (upstream) a Ping, forwarded like any frame; its payload, for answering it while no client is there;
:class:`CloseArrived`
    a Close frame (not forwarded: ``frame`` is its bytes); the stream ends;
:class:`Violation`
    the peer broke RFC 6455 or (client) sent a message over the read limit: the close code and reason to answer
    with, and ``pending``, the bytes from the bad frame's header on; the stream ends.

Nothing here touches a socket, a timer or gevent: every frame decision is tested by feeding bytes.
"""

from typing import NamedTuple

from . import frames, usage
from .frames import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, ProtocolError
from .sniff import SNIFF_CLIENT_BYTES, SNIFF_UPSTREAM_BYTES, UpstreamMessage, may_be_error_event, sniff_create
from .walk import NEED_MORE, Walker

# The receive buffer starts small (an idle session costs little) and doubles, up to MAX_BUFFER_SIZE, whenever a read
# fills it (a busy stream moves in fewer, larger reads).
BUFFER_SIZE = 1024
MAX_BUFFER_SIZE = 256 * 1024
# The largest text frame held back whole while hold_errors is set (an error event is a few hundred bytes; the
# buffer must have room to collect it).  A longer one is forwarded as it arrives.
HOLD_MAX_BYTES = 64 * 1024

_LEDGER_TYPES = tuple(t.encode("ascii") for t in usage.LEDGER_EVENTS)


class Forward(NamedTuple):
    data: memoryview
    mid_frame: bool
    business: bool


class TurnStarted(NamedTuple):
    model: str


class LedgerEvent(NamedTuple):
    payload: bytes


class HeldEvent(NamedTuple):
    frame: memoryview
    payload: bytes


class PongArrived(NamedTuple):
    pass


class PingArrived(NamedTuple):
    payload: bytes


class CloseArrived(NamedTuple):
    code: int
    reason: str
    frame: memoryview


class Violation(NamedTuple):
    code: int
    reason: str
    pending: bytes


_PONG_ARRIVED = PongArrived()


def _forward(data, mid_frame, business, _new=tuple.__new__):
    # Forward(...) without the Python-level __new__ NamedTuple adds: it is made once per read.
    return _new(Forward, (data, mid_frame, business))


class FrameStream:
    """The frames of one direction: ``client`` for what a client sends (masked, sniffed for requests, held to
    ``read_limit``), else for what the upstream sends (sniffed for the events the usage ledger reads, copied up to
    ``max_event_bytes``).  ``initial`` holds bytes read before the relay began (along with a handshake).

    ``hold_errors`` (upstream; off by default, and then nothing is held): whole single-frame text messages of up
    to :data:`HOLD_MAX_BYTES` that may be ``error`` events come out as :class:`HeldEvent`, not forwarded; such a
    frame is taken only once all of it has been read."""

    __slots__ = ("client", "read_limit", "max_event_bytes", "walker", "expected_pong", "ended", "hold_errors",
                 "_buf", "_view", "_end", "_pos", "_full", "_done", "_sniff", "_create", "_message")

    def __init__(self, client, read_limit=0, max_event_bytes=0, initial=b""):
        self.client = client
        self.read_limit = read_limit
        self.max_event_bytes = max_event_bytes
        # The header walk; its counters (frames, data_frames) and frame state (remaining, in_message) are read too.
        self.walker = Walker(client, read_limit, () if client else _LEDGER_TYPES)
        self.expected_pong = None  # the payload of the relay's own Ping, while its Pong is awaited
        self.ended = False
        self.hold_errors = False
        self._buf = bytearray(max(BUFFER_SIZE, len(initial)))
        self._buf[:len(initial)] = initial
        self._view = memoryview(self._buf)
        self._end = len(initial)
        self._pos = 0      # walked up to here
        self._full = False
        self._done = []    # TurnStarted / LedgerEvent actions waiting for the Forward that ends their message
        self._sniff = None   # client: [mask_key, masked prefix, bytes wanted, message longer than that]
        self._create = None  # client: (model,) once the open message is known to be a response.create
        self._message = None  # upstream: the UpstreamMessage being examined

    @property
    def in_message(self):
        """A fragmented data message is open (nothing of the relay's own may be sent in its direction)."""
        return self.walker.in_message

    def buffer(self):
        """Where the next bytes go: the free end of the receive buffer (what was walked is dropped first)."""
        buf, pos, end = self._buf, self._pos, self._end
        if pos == end and not self._full:  # all walked (the usual case): the whole buffer, as it is
            self._pos = self._end = 0
            return self._view
        leftover = end - pos  # a partial header, control frame or held frame, never payload being forwarded
        if leftover and pos:
            buf[:leftover] = buf[pos:end]
        self._pos, self._end = 0, leftover
        if self._full and len(buf) < MAX_BUFFER_SIZE:
            bigger = bytearray(2 * len(buf))
            bigger[:leftover] = buf[:leftover]
            self._buf, self._view = bigger, memoryview(bigger)
            self._full = False
        return self._view[leftover:]

    def received(self, n):
        """``n`` bytes were written into :meth:`buffer`; returns the actions they (and anything held) call for."""
        end = self._end + n
        self._full = end == len(self._buf)
        self._end = end
        if self.ended:
            return []
        start = self._pos
        walker = self.walker
        data_frames = walker.data_frames
        if self._sniff is None and self._create is None and self._message is None:
            # The usual read: the walker steps over everything in it.
            pos, event = walker.walk(self._buf, start, end)
            if event == NEED_MORE:
                self._pos = pos
                if pos == start:
                    return []
                return [_forward(self._view[start:pos], walker.remaining > 0, walker.data_frames != data_frames)]
        else:
            pos = start
        return self._walk(pos, start, data_frames)

    def feed(self, data):
        """Take ``data`` whole (for tests and for bytes read elsewhere): the actions, in order."""
        actions = [_settled(a) for a in self.received(0)]
        view = memoryview(data)
        while view:
            free = self.buffer()
            n = min(len(free), len(view))
            free[:n] = view[:n]
            view = view[n:]
            actions += [_settled(a) for a in self.received(n)]
        return actions

    def _walk(self, pos, flush_from, flushed_data_frames):
        """Walk on from ``pos`` (nothing before it needs a look; ``[flush_from:pos]`` is still to be forwarded)."""
        actions = []
        client = self.client
        buf, view, end = self._buf, self._view, self._end
        walker = self.walker
        while pos < end:
            if self._sniff is None and self._create is None and self._message is None:
                # The fast way over everything of no interest, up to the first frame that is.
                pos, event = walker.walk(buf, pos, end)
                if event == NEED_MORE:
                    break
            elif walker.remaining:
                take = min(walker.remaining, end - pos)
                self._payload(view[pos:pos + take])
                pos += take
                walker.remaining -= take
                if not walker.remaining and walker.frame_fin:
                    self._message_end()
                continue
            header = frames.parse_header(buf, pos, end)
            if header is None:
                break
            walker.frames += 1
            fin, rsv, opcode, mask_key, length, header_length = header
            try:
                frames.check_header(rsv, opcode, fin, length, mask_key, expect_masked=client)
                walker.in_message = _check_sequence(opcode, fin, walker.in_message)
                if client and opcode < OP_CLOSE:
                    message_size = length if opcode != OP_CONTINUATION else walker.message_size + length
                    if message_size > self.read_limit:
                        raise ProtocolError("message of %d bytes is over the %d-byte limit"
                                            % (message_size, self.read_limit), frames.CLOSE_MESSAGE_TOO_BIG)
                    walker.message_size = message_size
            except ProtocolError as exc:
                self._flush(actions, flush_from, pos, flushed_data_frames)
                return self._end_with(actions, Violation(exc.code, exc.reason, bytes(view[pos:end])))
            if opcode >= OP_CLOSE:
                frame_end = pos + header_length + length
                if frame_end > end:
                    walker.frames -= 1  # not taken yet: counted when it is
                    break
                payload = view[pos + header_length:frame_end]
                if opcode == OP_PING:
                    if not client:
                        actions.append(PingArrived(bytes(payload)))
                    pos = frame_end
                    continue
                if client:
                    payload = frames.unmask(payload, mask_key)
                if opcode == OP_PONG:
                    if client and self.expected_pong is not None and payload == self.expected_pong:
                        flushed_data_frames = self._flush(actions, flush_from, pos, flushed_data_frames)
                        flush_from = frame_end
                        self.expected_pong = None
                        actions.append(_PONG_ARRIVED)
                    pos = frame_end
                    continue
                self._flush(actions, flush_from, pos, flushed_data_frames)
                try:
                    code, reason = frames.parse_close(payload)
                except ProtocolError as exc:
                    if client:
                        return self._end_with(actions, Violation(exc.code, exc.reason, bytes(view[pos:end])))
                    code, reason = None, ""  # the upstream's bad close still ends it; the client gets it as sent
                return self._end_with(actions, CloseArrived(code, reason, view[pos:frame_end]))
            if self.hold_errors and opcode == OP_TEXT and fin and length <= HOLD_MAX_BYTES:
                held = self._held(view, pos + header_length, length, end)
                if held is None:
                    walker.frames -= 1  # not taken yet: walked again once more of it is here
                    break
                if held is not False:
                    self._flush(actions, flush_from, pos, flushed_data_frames)
                    frame_end = pos + header_length + length
                    actions.append(HeldEvent(view[pos:frame_end], held))
                    walker.data_frames += 1
                    flushed_data_frames = walker.data_frames  # the held frame is in no Forward
                    pos = flush_from = frame_end
                    continue
            walker.data_frames += 1
            if opcode != OP_CONTINUATION:
                self._message_start(opcode, fin, mask_key, view, pos + header_length, length, end)
            walker.frame_fin = bool(fin)
            pos += header_length
            walker.remaining = length
            if not length and fin:
                self._message_end()
        self._flush(actions, flush_from, pos, flushed_data_frames, walker.remaining > 0)
        self._pos = pos
        return actions

    def _flush(self, actions, start, end, flushed_data_frames, mid_frame=False):
        """Forward ``[start:end]``, then what completed in it; returns the data-frame count now flushed."""
        data_frames = self.walker.data_frames
        if start < end:
            actions.append(_forward(self._view[start:end], mid_frame, data_frames != flushed_data_frames))
        if self._done:
            actions += self._done
            self._done = []
        return data_frames

    def _end_with(self, actions, action):
        self.ended = True
        actions.append(action)
        return actions

    def _message_start(self, opcode, fin, mask_key, view, start, length, end):
        if self.client:
            self._sniff = self._create = None
            if opcode == OP_TEXT and length:
                wanted = min(length, SNIFF_CLIENT_BYTES)
                longer = length > wanted or not fin
                if start + wanted <= end:  # the prefix is here already (the usual case)
                    self._create = sniff_create(mask_key, view[start:start + wanted], wanted, longer)
                else:
                    self._sniff = [mask_key, bytearray(), wanted, longer]
            return
        self._message = None
        if opcode == OP_TEXT:
            if fin and start + length <= end:
                # The whole message is here (the usual case): look at its first bytes in place and copy it only
                # if the ledger may need it.
                if usage.may_be_ledger_event(bytes(view[start:start + SNIFF_UPSTREAM_BYTES])):
                    self._done.append(LedgerEvent(bytes(view[start:start + length])))
            else:
                self._message = UpstreamMessage(self.max_event_bytes)
        elif opcode != OP_BINARY:  # pragma: no cover - check_header refuses other opcodes
            raise AssertionError(opcode)

    def _held(self, view, start, length, end):
        """A single-frame text message whose payload starts at ``start``: its payload when it may be an ``error``
        event, False when its first bytes prove it is not one, None when too little of it is here to tell."""
        known = start + min(length, SNIFF_UPSTREAM_BYTES)
        if known > end:
            return None
        if not may_be_error_event(bytes(view[start:known])):
            return False
        if start + length > end:
            return None
        return bytes(view[start:start + length])

    def _payload(self, chunk):
        if self.client:
            sniff = self._sniff
            if sniff is not None:
                sniff[1] += chunk[:sniff[2] - len(sniff[1])]
                if len(sniff[1]) >= sniff[2]:
                    self._create = sniff_create(*sniff)
                    self._sniff = None
        elif self._message is not None and not self._message.feed(chunk):
            self._message = None

    def _message_end(self):
        if self.client:
            if self._create is not None:
                self._done.append(TurnStarted(self._create[0]))
                self._create = None
        elif self._message is not None:
            payload = self._message.finish()
            self._message = None
            if payload is not None:
                self._done.append(LedgerEvent(payload))


def _settled(action):
    """An action that no longer refers to the stream's buffer (``feed`` hands them out after later reads)."""
    if action.__class__ is Forward:
        return action._replace(data=bytes(action.data))
    if action.__class__ is CloseArrived or action.__class__ is HeldEvent:
        return action._replace(frame=bytes(action.frame))
    return action


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
