"""RFC 6455 frame headers: parsing, validation and the few frames wsrelay writes itself.

Pure functions, no sockets.  The relay never decodes forwarded payloads; it only needs to know where each frame
starts and ends, whether its header is legal, and — for control frames and short prefixes — what the payload says.
"""

import os
import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))
KNOWN_OPCODES = DATA_OPCODES | CONTROL_OPCODES

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

MAX_CONTROL_PAYLOAD = 125

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class ProtocolError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, reason, code=CLOSE_PROTOCOL_ERROR):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def parse_header(buf, pos, end):
    """Parse the frame header at ``buf[pos:end]``.

    Returns ``None`` when the header is not complete yet, else
    ``(fin, rsv, opcode, mask_key, payload_length, header_length)`` where ``mask_key`` is 4 bytes or ``None``.
    """
    if end - pos < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    length = b1 & 0x7F
    masked = b1 & 0x80
    header_length = 2
    if length == 126:
        header_length = 4
        if end - pos < 4:
            return None
        length = _U16.unpack_from(buf, pos + 2)[0]
    elif length == 127:
        header_length = 10
        if end - pos < 10:
            return None
        length = _U64.unpack_from(buf, pos + 2)[0]
    mask_key = None
    if masked:
        if end - pos < header_length + 4:
            return None
        mask_key = bytes(buf[pos + header_length:pos + header_length + 4])
        header_length += 4
    return b0 & 0x80, b0 & 0x70, b0 & 0x0F, mask_key, length, header_length


def check_header(rsv, opcode, fin, length, mask_key, expect_masked):
    """Raise :class:`ProtocolError` for a header RFC 6455 forbids (no extensions are negotiated)."""
    if rsv:
        raise ProtocolError("reserved bits set without a negotiated extension")
    if opcode not in KNOWN_OPCODES:
        raise ProtocolError("reserved opcode 0x%x" % opcode)
    if opcode >= OP_CLOSE:
        if not fin:
            raise ProtocolError("fragmented control frame")
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control frame payload over 125 bytes")
    if length >> 63:
        raise ProtocolError("payload length with the most significant bit set")
    if expect_masked and mask_key is None:
        raise ProtocolError("client frame not masked")
    if not expect_masked and mask_key is not None:
        raise ProtocolError("server frame masked")


def unmask(data, mask_key):
    """XOR ``data`` with the 4-byte ``mask_key`` (whole-integer XOR: fast enough for control frames and prefixes)."""
    n = len(data)
    if not n:
        return b""
    key = (mask_key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def build_frame(opcode, payload=b"", fin=True, mask=False):
    """Encode one frame; ``mask=True`` for frames the relay writes towards the upstream (it is the client there)."""
    payload = bytes(payload)
    n = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head.append(mask_bit | 126)
        head += _U16.pack(n)
    else:
        head.append(mask_bit | 127)
        head += _U64.pack(n)
    if mask:
        key = os.urandom(4)
        return bytes(head) + key + unmask(payload, key)
    return bytes(head) + payload


def close_payload(code=None, reason=""):
    """Close frame payload: 2-byte code plus UTF-8 reason, cut to fit a control frame."""
    if code is None:
        return b""
    raw = reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2]
    while raw:
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return _U16.pack(code) + raw


def build_close(code=None, reason="", mask=False):
    return build_frame(OP_CLOSE, close_payload(code, reason), mask=mask)


def is_valid_close_code(code):
    """Codes a peer may put on the wire (RFC 6455 7.4, IANA registry)."""
    return (1000 <= code <= 1003 or 1007 <= code <= 1014) or 3000 <= code <= 4999


def parse_close(payload):
    """``(code, reason)`` of a close payload; ``(None, "")`` when it has no code.

    Raises :class:`ProtocolError` for a one-byte payload or an invalid code, with 1007 for a reason that is not UTF-8.
    """
    payload = bytes(payload)
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a one-byte payload")
    code = _U16.unpack_from(payload)[0]
    if not is_valid_close_code(code):
        raise ProtocolError("invalid close code %d" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", CLOSE_INVALID_PAYLOAD)
    return code, reason
