"""Server-Sent Events, sans I/O: the Responses HTTP transport's stream, read and written.

The Responses API streams ``text/event-stream``: ``event: <type>`` and ``data: <json>`` lines, a blank line per
event, the JSON being the same event a WebSocket client gets (``response.created`` ... ``response.completed`` with
``response.usage``).  Lines starting with ``:`` are comments: intermediaries see traffic, clients ignore them (and
Codex's idle watchdog is not reset by them; an event of a type it does not know is ignored and does reset it).

:class:`SseReader` follows a stream it is fed, by the rules of the HTML standard's event-stream parser (lines end
with CRLF, LF or CR, one space after the colon is dropped, ``data`` lines join with LF, an event without data is
not dispatched), and returns each complete event.  It never touches a socket: the relay forwards the bytes as they
are and only looks.  :func:`encode_event` and :data:`KEEPALIVE_COMMENT` are what the relay (and the fake
upstream) write.
"""

import json
from typing import NamedTuple

KEEPALIVE_COMMENT = b": keepalive\n\n"
# An event whose type Codex ignores, which still resets its idle watchdog (comments do not).
APP_KEEPALIVE_EVENT = b'event: keepalive\ndata: {"type":"keepalive"}\n\n'


class SseEvent(NamedTuple):
    """One dispatched event: its ``event`` field (``message`` when none was given), its ``data`` (bytes, lines
    joined with LF; None when it grew past the reader's limit and was dropped) and its last ``id``."""

    event: str
    data: bytes
    id: str


def encode_event(event):
    """One Responses event (a dict with a ``type``) as an SSE event: ``event: <type>``, one ``data:`` line."""
    data = json.dumps(event, separators=(",", ":")).encode("utf-8")
    return b"event: " + event["type"].encode("utf-8") + b"\ndata: " + data + b"\n\n"


class SseReader:
    """Feed it the bytes of an event stream in any pieces; :meth:`feed` returns the events they complete.

    ``max_event_bytes`` bounds what one event's data may hold in memory: past it the data is dropped (the event is
    still dispatched, with ``data=None``, so the caller knows something went by unread).
    """

    def __init__(self, max_event_bytes=64 * 1024 * 1024):
        self.max_event_bytes = max_event_bytes
        self.events = 0
        self.comments = 0
        self._line = bytearray()
        self._after_cr = False  # the last byte fed was a CR: an LF right after it ends no second line
        self._event = ""
        self._data = bytearray()
        self._has_data = False
        self._oversize = False
        self._line_cut = False  # the line being read was longer than an event may be
        self._id = ""

    @property
    def at_boundary(self):
        """Between two events: bytes written now (a comment, an event of the relay's) cannot split one."""
        return not self._line and not self._line_cut and not self._has_data and not self._event

    def feed(self, chunk):
        out = []
        if not chunk:
            return out
        chunk = bytes(chunk)
        start = 0
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                start = 1
        n = len(chunk)
        while start < n:
            cr = chunk.find(b"\r", start)
            lf = chunk.find(b"\n", start)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                self._take(chunk, start, n)
                break
            end = min(ends)
            self._take(chunk, start, end)
            self._line_done(out)
            if chunk[end:end + 1] == b"\r":
                if end + 1 == n:
                    self._after_cr = True
                    break
                if chunk[end + 1:end + 2] == b"\n":
                    end += 1
            start = end + 1
        return out

    def _take(self, chunk, start, end):
        # A line longer than an event may be is cut short (its data is dropped below); the line itself stays bounded.
        room = self.max_event_bytes + 16 - len(self._line)
        if room > 0:
            self._line += chunk[start:min(end, start + room)]
        if end - start > room:
            self._line_cut = True

    def _line_done(self, out):
        line = bytes(self._line)
        self._line.clear()
        cut, self._line_cut = self._line_cut, False
        if not line:
            self._dispatch(out)
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            if self._has_data:
                self._data += b"\n"
            self._has_data = True
            if cut or len(self._data) + len(value) > self.max_event_bytes:
                self._oversize = True
            if not self._oversize:
                self._data += value
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")
        # "retry" and unknown fields change nothing the relay reads.

    def _dispatch(self, out):
        if self._has_data:
            self.events += 1
            data = None if self._oversize else bytes(self._data)
            out.append(SseEvent(self._event or "message", data, self._id))
        self._event = ""
        self._data = bytearray()
        self._has_data = False
        self._oversize = False
