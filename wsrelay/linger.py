"""Lingering close: what the relay does after closing a WebSocket connection itself.

A peer that is still sending when the relay closes (a client streaming a message over the read limit, a request
that arrives just as a timer fires, an upstream after a protocol error) would have its next write fail with a
reset if the relay simply closed the socket: the kernel answers data arriving for a closed socket with RST, and
most client libraries report that write error and never read the close frame waiting for them (the user sees
"broken pipe" instead of "message too big").  So, like nginx's ``lingering_close``, the relay sends its Close,
shuts down its write side, and reads and discards what the peer still sends until the peer's Close frame, the
end of its stream, or a bound (total time, idle time between reads, bytes), and only then closes the socket.

:class:`CloseWatch` follows the discarded bytes frame by frame (no sockets: it is fed bytes) to see the Close;
:func:`linger` is the reading loop.
"""

import socket
import time
from dataclasses import dataclass

from .frames import OP_CLOSE, parse_header

_READ_SIZE = 64 * 1024
# Outcomes of a linger, as the trace reports them.
CLOSE = "close"          # the peer's Close frame arrived
EOF = "eof"              # the peer ended its stream
RESET = "reset"          # the peer reset the connection (or it broke)
TIMEOUT = "timeout"      # the total time bound passed
IDLE = "idle"            # nothing arrived for the idle bound
MAX_BYTES = "max_bytes"  # the byte bound was reached


class CloseWatch:
    """Walks a frame stream that is being discarded, to tell when the peer's Close frame starts.

    ``pending`` is what was read but not yet walked when lingering began (it starts at a frame header); ``skip``
    is how much of a frame's payload is still to come before the next header.
    """

    __slots__ = ("_buffer", "_skip", "seen_close")

    def __init__(self, pending=b"", skip=0):
        self._buffer = bytearray()
        self._skip = skip
        self.seen_close = False
        if pending:
            self.feed(pending)

    def feed(self, data):
        """Take the next bytes; returns True once a Close frame's header has been seen."""
        if self.seen_close:
            return True
        if self._skip >= len(data):
            self._skip -= len(data)
            return False
        buffer = self._buffer
        buffer += memoryview(data)[self._skip:]
        self._skip = 0
        pos = 0
        while True:
            header = parse_header(buffer, pos, len(buffer))
            if header is None:
                break
            frame_end = pos + header[5] + header[4]
            if header[2] == OP_CLOSE:
                if frame_end > len(buffer):
                    break  # the rest of the Close is still to be read (and must be, or closing resets)
                self.seen_close = True
                buffer.clear()
                return True
            pos = frame_end
            if pos > len(buffer):
                self._skip = pos - len(buffer)
                pos = len(buffer)
                break
        del buffer[:pos]
        return False


@dataclass(frozen=True)
class Lingered:
    """How a linger ended: ``outcome`` (one of this module's constants), the bytes discarded, the time taken."""

    outcome: str
    discarded_bytes: int
    waited_ms: int


def linger(sock, watch, timeout, idle, max_bytes, clock=time.monotonic):
    """Read and discard from ``sock`` until ``watch`` sees a Close frame, the stream ends, or a bound is reached:
    ``timeout`` seconds in all, ``idle`` seconds without a byte, ``max_bytes`` read.  Returns :class:`Lingered`.

    The caller has already sent its Close and shut down its write side, and closes the socket afterwards.
    """
    started = clock()
    deadline = started + timeout
    discarded = 0
    buf = bytearray(_READ_SIZE)
    outcome = CLOSE if watch.seen_close else None
    try:
        while outcome is None:
            left = deadline - clock()
            if left <= 0:
                outcome = TIMEOUT
                break
            sock.settimeout(min(idle, left))
            try:
                n = sock.recv_into(buf)
            except socket.timeout:
                outcome = TIMEOUT if clock() >= deadline else IDLE
                break
            except OSError:
                outcome = RESET
                break
            if not n:
                outcome = EOF
                break
            discarded += n
            if watch.feed(memoryview(buf)[:n]):
                outcome = CLOSE
            elif discarded >= max_bytes:
                outcome = MAX_BYTES
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
    return Lingered(outcome, discarded, int((clock() - started) * 1000))
