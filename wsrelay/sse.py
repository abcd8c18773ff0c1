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
import re
from typing import NamedTuple

KEEPALIVE_COMMENT = b": keepalive\n\n"
# An event whose type Codex ignores, which still resets its idle watchdog (comments do not).
APP_KEEPALIVE_EVENT = b'event: keepalive\ndata: {"type":"keepalive"}\n\n'


# The shape nearly every Responses event has: an "event" line and one "data" line (or a "data" line alone).
_SIMPLE_EVENT = re.compile(rb"(?:event: ?([^\n]*)\n)?data: ?([^\n]*)\n\n")

# At most this much of an event begun is kept as it is for the next read (and read again with it); a longer one
# is read line by line, which copies each byte once.
_MAX_TAIL = 16384
_UNKNOWN = object()


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
    still dispatched, with ``data=None``, so the caller knows something went by unread).  ``wanted``, when given,
    is called with each event's type: the events it declines are counted (:attr:`events`) but their data is
    neither joined nor returned.

    Most of a stream is read a whole event at a time: where the lines end with LF only (as the Responses API's
    do), each event is cut out at its blank line (``\\n\\n``) and its few lines read at once (one regular
    expression for the usual ``event`` + ``data`` pair); the start of an event a read ended in is kept as it is
    for the next one.  The rest (a CR, an event longer than ``max_event_bytes`` or than what is kept) is read
    line by line.  Both ways follow the same rules and give the same events, counts and :attr:`at_boundary`.
    """

    def __init__(self, max_event_bytes=64 * 1024 * 1024, wanted=None):
        self.max_event_bytes = max_event_bytes
        self.wanted = wanted
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
        self._tail = b""  # the bytes of an event begun, kept as they are (no CR in them)
        self._names = {}  # event fields as read (bytes) -> their type (str), None for a type not wanted

    @property
    def at_boundary(self):
        """Between two events: bytes written now (a comment, an event of the relay's) cannot split one."""
        return not self._tail and not self._line and not self._line_cut and not self._has_data and not self._event

    def feed(self, chunk):
        out = []
        if not chunk:
            return out
        chunk = bytes(chunk)
        if self._tail:
            chunk = self._tail + chunk
            self._tail = b""
        n = len(chunk)
        limit = chunk.find(b"\r")  # whole events are cut out only before the first CR
        if limit < 0:
            limit = n
        start = 0
        if self._after_cr or self._line or self._line_cut or self._has_data or self._event:
            # An event is under way (or a CR may swallow an LF): read line by line up to the first "\n\n", whose
            # second LF is a blank line (the one that ends the event, or one after it).
            end = chunk.find(b"\n\n", 0, limit)
            if end < 0:
                self._feed_lines(chunk, 0, n, out)
                return out
            start = end + 2
            self._feed_lines(chunk, 0, start, out)
        start = self._feed_events(chunk, start, limit, out)
        if start < n:
            if limit == n and n - start <= _MAX_TAIL and chunk[-1] != 10 and not _ends_comment(chunk, start, n):
                self._tail = chunk[start:]  # an event begun, in the middle of a line: read with the next bytes
            else:
                self._feed_lines(chunk, start, n, out)
        return out

    def _feed_events(self, chunk, start, limit, out):
        """The whole events in ``chunk[start:limit]`` (no CR there; the reader holds nothing of an event), read a
        block at a time.  Returns where the first incomplete event begins."""
        find = chunk.find
        simple = _SIMPLE_EVENT.match
        names = self._names
        max_bytes = self.max_event_bytes
        events = 0
        stop = chunk.rfind(b"\n\n", start, limit) + 2  # where the last whole event ends
        if stop < 2:
            return start
        while start < stop:
            m = simple(chunk, start, stop)  # bounded: a failed match backtracks over what it saw
            if m is not None:
                end = m.end()
                if end - start - 2 <= max_bytes:
                    start = end
                    events += 1
                    name = names.get(m[1], _UNKNOWN)
                    if name is _UNKNOWN:
                        name = self._name(m[1])
                    if name is not None:
                        out.append(SseEvent(name, m[2], self._id))
                    continue
            end = find(b"\n\n", start, stop)
            if end < 0:  # a last LF alone (a third in a row): a blank line, read with what follows
                break
            if end - start > max_bytes:  # it may hold an oversize line or data: the careful way
                self.events += events
                events = 0
                self._feed_lines(chunk, start, end + 2, out)
                start = end + 2
                continue
            event = b""
            data = None  # the data lines themselves: their values are cut out only for a wanted event
            # No line in the block is empty but maybe the first (a blank line with nothing pending), none is cut.
            for line in chunk[start:end].split(b"\n"):
                if line[:5] == b"data:" or line == b"data":
                    if data is None:
                        data = [line]
                    else:
                        data.append(line)
                elif line[:6] == b"event:":
                    event = line[7:] if line[6:7] == b" " else line[6:]
                elif line[:1] == b":":
                    self.comments += 1
                elif line:
                    name, colon, value = line.partition(b":")
                    if colon and value[:1] == b" ":
                        value = value[1:]
                    if name == b"event":
                        event = value
                    elif name == b"id" and b"\0" not in value:
                        self._id = value.decode("utf-8", "replace")
            start = end + 2
            if data is None:
                continue
            events += 1
            name = names.get(event, _UNKNOWN)
            if name is _UNKNOWN:
                name = self._name(event)
            if name is None:
                continue
            if len(data) == 1:
                line = data[0]
                value = line[6:] if line[5:6] == b" " else line[5:]
            else:
                value = b"\n".join([line[6:] if line[5:6] == b" " else line[5:] for line in data])
            out.append(SseEvent(name, value, self._id))
        self.events += events
        return start

    def _name(self, event):
        """The type of an event whose ``event`` field is ``event`` (bytes, or None), or None if it is not wanted."""
        name = event.decode("utf-8", "replace") if event else "message"
        if self.wanted is not None and not self.wanted(name):
            name = None
        if len(self._names) < 256:  # a stream has few types; a stream that makes them up gets no more room
            self._names[event] = name
        return name

    def _feed_lines(self, chunk, start, stop, out):
        """``chunk[start:stop]`` read line by line: any line ends, any state the reader is in."""
        if self._after_cr:
            self._after_cr = False
            if chunk[start:start + 1] == b"\n":
                start += 1
        find = chunk.find
        cr = lf = -1
        while start < stop:
            if cr < start:
                cr = find(b"\r", start, stop)
                if cr < 0:
                    cr = stop
            if lf < start:
                lf = find(b"\n", start, stop)
                if lf < 0:
                    lf = stop
            end = cr if cr < lf else lf
            self._take(chunk, start, end)
            if end == stop:
                break
            self._line_done(out)
            if end == cr:
                if end + 1 == stop:
                    self._after_cr = True
                    break
                if end + 1 == lf:
                    end += 1
            start = end + 1

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
            name = self._event or "message"
            if self.wanted is None or self.wanted(name):
                out.append(SseEvent(name, None if self._oversize else bytes(self._data), self._id))
        self._event = ""
        self._data = bytearray()
        self._has_data = False
        self._oversize = False


def _ends_comment(chunk, start, stop):
    """A comment line ends in ``chunk[start:stop]`` (it would be counted now, read line by line)."""
    last = chunk.rfind(b"\n", start, stop)
    return last >= 0 and (chunk[start:start + 1] == b":" or chunk.find(b"\n:", start, last) >= 0)
