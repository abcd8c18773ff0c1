"""RFC 6455 frame headers: parsing, the rules a header must obey, the frames wsrelay writes, close payloads."""

import struct

import pytest

from wsrelay import frames
from wsrelay.frames import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, ProtocolError,
                            build_close, build_frame, check_header, close_payload, parse_close, parse_header,
                            unmask)

KEY = b"\x37\xfa\x21\x3d"


def header_bytes(opcode, length, fin=True, rsv=0, mask_key=None):
    """A frame header written by hand (independent of build_frame)."""
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if mask_key is not None:
        head += mask_key
    return bytes(head)


# -- parse_header ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, header_length", [(0, 2), (1, 2), (125, 2), (126, 4), (65535, 4),
                                                   (65536, 10), (2 ** 32 + 5, 10)])
@pytest.mark.parametrize("masked", [False, True])
def test_parse_header_is_incomplete_until_the_last_header_byte(length, header_length, masked):
    mask_key = KEY if masked else None
    head = header_bytes(OP_BINARY, length, mask_key=mask_key)
    expected_length = header_length + (4 if masked else 0)
    assert len(head) == expected_length
    for cut in range(expected_length):
        assert parse_header(head, 0, cut) is None, "header parsed from %d of %d bytes" % (cut, expected_length)
    fin, rsv, opcode, key, payload_length, parsed_header_length = parse_header(head, 0, len(head))
    assert bool(fin) and not rsv and opcode == OP_BINARY
    assert key == mask_key
    assert payload_length == length
    assert parsed_header_length == expected_length


def test_parse_header_reads_at_an_offset_and_ignores_payload_bytes_after_it():
    frame = b"junk" + build_frame(OP_TEXT, b"x" * 300, fin=False) + b"more"
    fin, rsv, opcode, key, length, header_length = parse_header(frame, 4, len(frame))
    assert not fin and not rsv and opcode == OP_TEXT and key is None
    assert (length, header_length) == (300, 4)


def test_parse_header_works_on_a_memoryview_of_a_bytearray():
    buf = bytearray(64)
    head = header_bytes(OP_PING, 5, mask_key=KEY)
    buf[10:10 + len(head)] = head
    assert parse_header(memoryview(buf), 10, 10 + len(head)) == (0x80, 0, OP_PING, KEY, 5, 6)


def test_parse_header_reports_rsv_bits_and_fin_clear():
    head = header_bytes(OP_CONTINUATION, 3, fin=False, rsv=0x40 | 0x10)
    fin, rsv, opcode, key, length, header_length = parse_header(head, 0, len(head))
    assert not fin and rsv == 0x50 and opcode == OP_CONTINUATION and length == 3


# -- check_header ------------------------------------------------------------------------------------------

def check(rsv=0, opcode=OP_TEXT, fin=True, length=5, mask_key=KEY, expect_masked=True):
    check_header(rsv, opcode, fin, length, mask_key, expect_masked)


def protocol_error(**kwargs):
    with pytest.raises(ProtocolError) as info:
        check(**kwargs)
    return info.value


@pytest.mark.parametrize("opcode", [OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG])
def test_check_header_accepts_every_known_opcode(opcode):
    check(opcode=opcode)
    check(opcode=opcode, mask_key=None, expect_masked=False)


def test_check_header_accepts_a_fragmented_data_frame_and_a_125_byte_control_frame():
    check(opcode=OP_TEXT, fin=False, length=1 << 20)
    check(opcode=OP_PING, length=125)
    check(opcode=OP_CLOSE, length=125, mask_key=None, expect_masked=False)


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_check_header_rejects_reserved_bits(rsv):
    assert protocol_error(rsv=rsv).code == frames.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_check_header_rejects_reserved_opcodes(opcode):
    error = protocol_error(opcode=opcode)
    assert error.code == frames.CLOSE_PROTOCOL_ERROR
    assert "opcode" in error.reason


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_check_header_rejects_fragmented_control_frames(opcode):
    assert protocol_error(opcode=opcode, fin=False, length=1).code == frames.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_check_header_rejects_control_frames_over_125_bytes(opcode):
    assert protocol_error(opcode=opcode, length=126).code == frames.CLOSE_PROTOCOL_ERROR


def test_check_header_rejects_a_64_bit_length_with_the_top_bit_set():
    assert protocol_error(opcode=OP_BINARY, length=1 << 63).code == frames.CLOSE_PROTOCOL_ERROR


def test_check_header_rejects_an_unmasked_client_frame():
    assert protocol_error(mask_key=None, expect_masked=True).code == frames.CLOSE_PROTOCOL_ERROR


def test_check_header_rejects_a_masked_server_frame():
    assert protocol_error(mask_key=KEY, expect_masked=False).code == frames.CLOSE_PROTOCOL_ERROR


def test_protocol_error_carries_reason_and_code():
    error = ProtocolError("bad", frames.CLOSE_INVALID_PAYLOAD)
    assert (error.reason, error.code, str(error)) == ("bad", 1007, "bad")
    assert ProtocolError("x").code == frames.CLOSE_PROTOCOL_ERROR


# -- build_frame / unmask ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 127, 65535, 65536, 70001])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_masked_frame_round_trips_through_parse_header_and_unmask(size, opcode):
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    frame = build_frame(opcode, payload, mask=True)
    fin, rsv, parsed_opcode, key, length, header_length = parse_header(frame, 0, len(frame))
    assert bool(fin) and not rsv and parsed_opcode == opcode
    assert len(key) == 4 and length == size
    assert header_length == (2 if size < 126 else 4 if size < 65536 else 10) + 4
    assert len(frame) == header_length + size
    assert unmask(frame[header_length:], key) == payload


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_unmasked_frame_carries_the_payload_as_is(size):
    payload = b"p" * size
    frame = build_frame(OP_BINARY, payload, fin=False)
    fin, rsv, opcode, key, length, header_length = parse_header(frame, 0, len(frame))
    assert not fin and key is None and length == size
    assert frame == header_bytes(OP_BINARY, size, fin=False) + payload


def test_masked_frames_use_a_fresh_mask_key_each_time():
    keys = {parse_header(f, 0, len(f))[3] for f in (build_frame(OP_TEXT, b"abc", mask=True) for _ in range(8))}
    assert len(keys) > 1


def test_unmask_is_its_own_inverse_and_matches_the_bytewise_definition():
    data = bytes(range(256)) * 3 + b"tail"
    masked = unmask(data, KEY)
    assert masked == bytes(b ^ KEY[i % 4] for i, b in enumerate(data))
    assert unmask(masked, KEY) == data
    assert unmask(b"", KEY) == b""
    assert unmask(memoryview(bytearray(b"\x00\x00\x00\x00\x00")), KEY) == KEY + KEY[:1]


def test_unmask_keeps_leading_zero_bytes():
    assert unmask(KEY + KEY, KEY) == b"\x00" * 8


# -- close payloads ----------------------------------------------------------------------------------------

def test_parse_close_of_an_empty_payload_has_no_code():
    assert parse_close(b"") == (None, "")


def test_parse_close_reads_code_and_reason():
    assert parse_close(struct.pack("!H", 1000)) == (1000, "")
    assert parse_close(struct.pack("!H", 4001) + b"bye") == (4001, "bye")
    assert parse_close(bytearray(struct.pack("!H", 1011) + "größe".encode())) == (1011, "größe")


def test_parse_close_rejects_a_one_byte_payload():
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03")
    assert info.value.code == frames.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_parse_close_rejects_codes_a_peer_may_not_send(code):
    with pytest.raises(ProtocolError) as info:
        parse_close(struct.pack("!H", code) + b"x")
    assert info.value.code == frames.CLOSE_PROTOCOL_ERROR
    assert str(code) in info.value.reason


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                                  3000, 3999, 4000, 4999])
def test_parse_close_accepts_every_code_a_peer_may_send(code):
    assert parse_close(struct.pack("!H", code)) == (code, "")
    assert frames.is_valid_close_code(code)


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_parse_close_with_a_reason_that_is_not_utf8_is_1007(reason):
    with pytest.raises(ProtocolError) as info:
        parse_close(struct.pack("!H", 1000) + reason)
    assert info.value.code == frames.CLOSE_INVALID_PAYLOAD


def test_close_payload_without_a_code_is_empty():
    assert close_payload() == b""
    assert close_payload(None, "ignored") == b""


def test_close_payload_is_code_then_utf8_reason():
    assert close_payload(4002, "quota") == b"\x0f\xa2quota"
    assert close_payload(1000) == b"\x03\xe8"


@pytest.mark.parametrize("reason, kept", [
    ("a" * 200, "a" * 123),
    ("é" * 100, "é" * 61),          # 2-byte characters: 123 would split one, 122 bytes are kept
    ("€" * 50, "€" * 41),           # 3-byte characters: exactly 123 bytes
    ("x" + "€" * 50, "x" + "€" * 40),
    ("😀" * 40, "😀" * 30),          # 4-byte characters: 120 bytes
    ("short", "short"),
])
def test_close_payload_cuts_the_reason_at_123_bytes_on_a_character_boundary(reason, kept):
    payload = close_payload(1011, reason)
    assert len(payload) <= frames.MAX_CONTROL_PAYLOAD
    assert payload[:2] == b"\x03\xf3"
    assert payload[2:].decode("utf-8") == kept
    assert parse_close(payload) == (1011, kept)


def test_build_close_is_a_complete_control_frame_masked_or_not():
    plain = build_close(1001, "going away")
    assert plain == b"\x88\x0c\x03\xe9going away"
    masked = build_close(4000, "user left", mask=True)
    fin, rsv, opcode, key, length, header_length = parse_header(masked, 0, len(masked))
    assert bool(fin) and opcode == OP_CLOSE and key is not None and header_length == 6
    assert parse_close(unmask(masked[6:], key)) == (4000, "user left")
    long_close = build_close(1011, "y" * 500)
    assert parse_header(long_close, 0, len(long_close))[4] == 125
    assert build_close() == b"\x88\x00"
