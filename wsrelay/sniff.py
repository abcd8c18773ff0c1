"""What the relay reads of the messages it forwards: just enough to see a turn start and a turn end.

A client text message's first bytes tell whether it is a ``response.create`` (a turn starts); an upstream text
message's first bytes tell whether it may be an event the usage ledger reads (a terminal event, or
``response.created`` with the response's id), and only those are copied whole for the usage parser; where the
session asks for it, whether it may be an ``error`` event (held back until it is read).  Everything else passes
through unread.

Turn resume (:mod:`wsrelay.resume_ws`) reads whole requests, only where a turn is held or retried: the held
request from the client frames the session kept, the retry's first message as it arrives.
"""

import re

from . import frames, usage
from .frames import OP_CLOSE, OP_CONTINUATION, OP_TEXT

SNIFF_CLIENT_BYTES = 256
SNIFF_UPSTREAM_BYTES = 96
NEED_MORE = object()


class UpstreamMessage:
    """Collects an upstream text message just far enough to know whether the usage ledger may need it."""

    __slots__ = ("data", "copying", "limit")

    def __init__(self, limit):
        self.data = bytearray()
        self.copying = False
        self.limit = limit

    def feed(self, chunk):
        """Returns False once the message is known to be uninteresting (the caller drops it)."""
        self.data += chunk
        if not self.copying and len(self.data) >= SNIFF_UPSTREAM_BYTES:
            if not usage.may_be_ledger_event(bytes(self.data[:SNIFF_UPSTREAM_BYTES])):
                return False
            self.copying = True
        return len(self.data) <= self.limit

    def finish(self):
        if self.copying or usage.may_be_ledger_event(bytes(self.data)):
            return bytes(self.data)
        return None


_ERROR_QUOTED = frozenset((b'"error"',))


def may_be_error_event(prefix):
    """False only when a message's first bytes prove it is not an ``error`` event (the event a session that may
    move its client to another account holds back until it has read it: see :mod:`wsrelay.quota`)."""
    return usage.may_be_event_of(prefix, _ERROR_QUOTED)


def sniff_create(mask_key, masked, wanted, longer):
    """``(model,)`` when a client text message's first (masked) bytes show a ``response.create``, else None.

    ``longer`` says the message goes on past these bytes; such a message with no ``"type"`` in its first bytes
    is counted as a request too, since missing a turn would lose its bill.
    """
    prefix = frames.unmask(bytes(masked), mask_key)
    if b'"response.create"' in prefix or (longer and b'"type"' not in prefix):
        return (model_hint(prefix),)
    return None


_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')


def model_hint(prefix):
    """The request's model when it shows in the first bytes of a ``response.create`` (a fallback for billing)."""
    match = _MODEL.search(prefix)
    return match.group(1).decode("utf-8", "replace") if match else None


_CACHE_KEY = re.compile(rb'"prompt_cache_key"\s*:\s*"([^"\\]{1,256})"')


def prompt_cache_key(body):
    """A request body's ``prompt_cache_key`` (the conversation's, for sticking it to one account), or None."""
    match = _CACHE_KEY.search(body)
    return match.group(1).decode("utf-8", "replace") if match else None


# -- whole requests, read only where a turn is held or retried (turn resume) ------------------------------------

def first_message(buf, limit):
    """A retry's first message in the client bytes ``buf``: ``(payload, end)`` when they start with a whole text
    message (``payload`` unmasked; the bytes after it start at ``end``), :data:`NEED_MORE` while it is incomplete,
    None when they start with anything else (a control frame, a binary message, a message over ``limit`` bytes, a
    frame RFC 6455 forbids)."""
    pos, size, parts = 0, 0, []
    while True:
        header = frames.parse_header(buf, pos, len(buf))
        if header is None:
            return NEED_MORE
        fin, rsv, opcode, mask_key, length, header_length = header
        if rsv or mask_key is None or opcode != (OP_CONTINUATION if parts else OP_TEXT):
            return None
        size += length
        if size > limit:
            return None
        start = pos + header_length
        if start + length > len(buf):
            return NEED_MORE
        parts.append(frames.unmask(bytes(buf[start:start + length]), mask_key))
        pos = start + length
        if fin:
            return b"".join(parts), pos


def frames_end(buf):
    """Where the whole frames at the start of ``buf`` end."""
    pos, end = 0, len(buf)
    while True:
        header = frames.parse_header(buf, pos, end)
        if header is None or pos + header[5] + header[4] > end:
            return pos
        pos += header[5] + header[4]


def text_messages(data):
    """The text messages (unmasked payloads) of the whole client frames ``data``, in order."""
    out, parts, pos, end = [], None, 0, len(data)
    while True:
        header = frames.parse_header(data, pos, end)
        if header is None:
            return out
        fin, _, opcode, mask_key, length, header_length = header
        start = pos + header_length
        if start + length > end or mask_key is None:
            return out
        pos = start + length
        if opcode >= OP_CLOSE:
            continue
        if opcode != OP_CONTINUATION:
            parts = [] if opcode == OP_TEXT else None
        if parts is not None:
            parts.append(frames.unmask(bytes(data[start:pos]), mask_key))
            if fin:
                out.append(b"".join(parts))
                parts = None


def create_request(payload):
    """The ``response.create`` (a dict) a text message holds, else None."""
    request = usage.parse_event(payload)
    return request if request is not None and request.get("type") == "response.create" else None
