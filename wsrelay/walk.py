"""Walking frame headers in bulk: the relay's per-frame work, done once per read instead of once per frame.

A :class:`Walker` follows one direction of a session over its receive buffer.  :meth:`Walker.walk` skips, header
by header, every data frame the relay has nothing to do with and stops in front of the first frame it must look
at, leaving that frame's header unconsumed:

``CONTROL``
    a Close, Ping or Pong (the frame stream handles it, whole or not);
``TEXT``
    a text message that may matter: on the client side a possible ``response.create`` (its first bytes, unmasked,
    show the request, or have no ``"type"`` yet the message goes on) or one whose first bytes are not all here
    yet; on the upstream side a message that is fragmented, not all here, or not plainly an event the usage
    ledger ignores (``{"type":"<a type other than a terminal one or response.created>"`` in its first bytes);
``ERROR``
    a header RFC 6455 forbids, a fragment out of sequence, or (client side) a message over the read limit; the
    frame stream re-parses it to say exactly what is wrong;
``NEED_MORE``
    the buffer ends: ``pos == end``, or a header is not complete.

A frame it skips is accounted (``frames``, ``data_frames``), the fragmentation state moves on (``in_message``,
``frame_fin``, ``message_size``) and its payload is stepped over (``remaining`` carries into the next read).  The
frame stream (:mod:`wsrelay.framestream`) updates the same attributes itself when it handles a frame the slow way.

The C implementation in ``wsrelay/_speedups.c`` behaves identically (the tests run both on the same streams);
this module's pure-Python one is used where the extension was not built, or when the environment variable
``WSRELAY_NO_SPEEDUPS`` is set (to anything but ``0``).
"""

import os
import re

from .frames import _U16, _U64, unmask
from .sniff import SNIFF_CLIENT_BYTES, SNIFF_UPSTREAM_BYTES

NEED_MORE = 0
CONTROL = 1
TEXT = 2
ERROR = 3

# The first key of an upstream event, when it is "type" with a plain string value.
_FIRST_TYPE = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"type"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')
_CREATE = b'"response.create"'
_TYPE_KEY = b'"type"'


class PyWalker:
    """One direction's frame walk (see the module docstring); ``client`` for frames from the client (masked,
    sniffed for requests, held to ``limit``), else for upstream frames (checked against ``terminal``, the
    event types the usage ledger reads, as bytes)."""

    __slots__ = ("client", "limit", "terminal", "remaining", "frame_fin", "in_message", "message_size",
                 "frames", "data_frames")

    def __init__(self, client, limit=0, terminal=()):
        self.client = bool(client)
        self.limit = limit
        self.terminal = frozenset(terminal)
        self.remaining = 0
        self.frame_fin = True
        self.in_message = False
        self.message_size = 0
        self.frames = 0
        self.data_frames = 0

    def walk(self, buf, pos, end):
        """Walk ``buf[pos:end]``; returns ``(pos, event)`` with ``pos`` at the frame the event is about."""
        client = self.client
        while True:
            remaining = self.remaining
            if remaining:
                if remaining >= end - pos:
                    self.remaining = remaining - (end - pos)
                    return end, NEED_MORE
                pos += remaining
                self.remaining = 0
            if end - pos < 2:
                return pos, NEED_MORE
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if opcode >= 0x8:
                return pos, CONTROL
            if b0 & 0x70 or opcode > 0x2 or bool(b1 & 0x80) != client:
                return pos, ERROR
            length = b1 & 0x7F
            header_length = 2
            if length == 126:
                header_length = 4
                if end - pos < 4:
                    return pos, NEED_MORE
                length = _U16.unpack_from(buf, pos + 2)[0]
            elif length == 127:
                header_length = 10
                if end - pos < 10:
                    return pos, NEED_MORE
                length = _U64.unpack_from(buf, pos + 2)[0]
                if length >> 63:
                    return pos, ERROR
            if (opcode == 0x0) != self.in_message:
                return pos, ERROR  # a continuation with no message open, or a new message inside one
            fin = bool(b0 & 0x80)
            if client:
                if end - pos < header_length + 4:
                    return pos, NEED_MORE
                size = self.message_size + length if opcode == 0x0 else length
                if size > self.limit:
                    return pos, ERROR
                if opcode == 0x1 and length:
                    start = pos + header_length + 4
                    wanted = min(length, SNIFF_CLIENT_BYTES)
                    if start + wanted > end:
                        return pos, TEXT
                    prefix = unmask(bytes(buf[start:start + wanted]), bytes(buf[start - 4:start]))
                    if _CREATE in prefix or ((length > wanted or not fin) and _TYPE_KEY not in prefix):
                        return pos, TEXT
                header_length += 4
                self.message_size = size
            elif opcode == 0x1:
                start = pos + header_length
                if not fin or start + length > end:
                    return pos, TEXT
                match = _FIRST_TYPE.match(buf, start, start + min(length, SNIFF_UPSTREAM_BYTES))
                if match is None or match.group(1) in self.terminal:
                    return pos, TEXT
            self.frames += 1
            self.data_frames += 1
            self.in_message = not fin
            self.frame_fin = fin
            pos += header_length
            self.remaining = length


def _fastest():
    if os.environ.get("WSRELAY_NO_SPEEDUPS", "") not in ("", "0"):
        return PyWalker
    try:
        from ._speedups import Walker as CWalker
    except ImportError:  # the extension was not built: same behaviour, slower
        return PyWalker
    return CWalker


Walker = _fastest()
