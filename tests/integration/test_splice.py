"""The splice through a real relay: frames pass byte for byte both ways, big frames stream, closes carry their code
and reason, and a peer that breaks RFC 6455 is closed with the right code.

The client side writes hand-built frames with ``sock.sendall`` and the scripted upstream reads raw bytes from its
socket (and the other way round), so "verbatim" means the very same bytes, mask keys included.
"""

import hashlib
import json
import os
import socket
import struct
import time

import gevent
import gevent.event
import pytest

from tests.helpers import CREATE, INTERVAL, MiB, PING_TIMEOUT, READ_LIMIT, connect, first_exit, read_close
from wsrelay import frames
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, build_close,
                            build_frame)

pytestmark = pytest.mark.timeout(60)


# -- helpers -----------------------------------------------------------------------------------------------

@pytest.fixture
def pair(scripted, relay):
    """``pair(**settings)`` -> ``(client, up)``: a client connected through a fresh relay and the upstream's side
    of that connection.  Both are ended at teardown."""
    opened = []

    def open_pair(**settings):
        upstream, url = scripted()
        client = connect(relay(url, **settings))
        up = upstream.next()
        for peer in (client, up):
            peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opened.append((client, up))
        return client, up

    yield open_pair
    for client, up in opened:
        up.done.set()
        client.sock.close()


def recv_exact(peer, n, timeout=10.0):
    """Exactly ``n`` raw bytes from a peer's connection (bytes its FrameSocket already buffered come first)."""
    out = bytearray(peer.buf[:n])
    del peer.buf[:len(out)]
    with gevent.Timeout(timeout, AssertionError("only %d of %d bytes arrived" % (len(out), n))):
        while len(out) < n:
            chunk = peer.sock.recv(min(1 << 20, n - len(out)))
            if not chunk:
                raise AssertionError("connection closed after %d of %d bytes" % (len(out), n))
            out += chunk
    return bytes(out)


def send_while_reading(sock, data):
    """Write in another greenlet, so a payload bigger than the socket buffers cannot deadlock the test."""
    return gevent.spawn(sock.sendall, data)


def relay_through(sender_sock, receiver, data):
    writer = send_while_reading(sender_sock, data)
    got = recv_exact(receiver, len(data))
    writer.get(timeout=10)
    return got


def read_until_closed(peer, timeout=5.0):
    """Read frames until a close frame or EOF: ``(data_frames, (code, reason) or None for EOF)``."""
    data = []
    with gevent.Timeout(timeout, AssertionError("connection neither closed nor sent a close; saw %r" % data)):
        while True:
            try:
                fin, opcode, payload = peer.read_frame()
            except (ConnectionClosed, OSError):
                return data, None
            if opcode == OP_CLOSE:
                return data, frames.parse_close(payload)
            data.append((fin, opcode, payload))


def payload_for(opcode, size):
    return b"t" * size if opcode == OP_TEXT else os.urandom(size)


# -- verbatim relay ----------------------------------------------------------------------------------------

SIZES = [0, 1, 125, 126, 65535, 65536]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_client_frame_reaches_upstream_as_the_same_bytes_mask_key_included(pair, opcode, size):
    client, up = pair()
    frame = build_frame(opcode, payload_for(opcode, size), mask=True)
    assert relay_through(client.sock, up, frame) == frame


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_upstream_frame_reaches_client_as_the_same_bytes(pair, opcode, size):
    client, up = pair()
    frame = build_frame(opcode, payload_for(opcode, size))
    assert relay_through(up.sock, client, frame) == frame


def mixed_frames(mask, count=300):
    out = []
    for i in range(count):
        opcode = OP_TEXT if i % 3 else OP_BINARY
        out.append(build_frame(opcode, bytes([65 + i % 26]) * (i % 140), mask=mask))
        if i % 50 == 7:
            out.append(build_frame(OP_PING, b"ping%d" % i, mask=mask))
    return out


def test_many_small_client_frames_in_one_tcp_write_arrive_upstream_unchanged(pair):
    client, up = pair()
    burst = b"".join(mixed_frames(mask=True))
    client.sock.sendall(burst)
    assert recv_exact(up, len(burst)) == burst


def test_many_small_upstream_frames_in_one_tcp_write_arrive_at_the_client_unchanged(pair):
    client, up = pair()
    burst = b"".join(mixed_frames(mask=False))
    up.sock.sendall(burst)
    assert recv_exact(client, len(burst)) == burst


def dribble(sender_sock, receiver, frame, header_length):
    """Send ``frame`` one byte per TCP segment; once its header is complete every byte must be passed on before
    the next one is sent (the relay forwards as bytes arrive)."""
    received = bytearray()
    for i in range(len(frame)):
        sender_sock.sendall(frame[i:i + 1])
        if i + 1 < header_length:
            # Nothing can be forwarded before the header is whole, so there is no event to await here; a short
            # pause only makes sure the relay reads this byte on its own.
            gevent.sleep(0.005)
            continue
        received += recv_exact(receiver, i + 1 - len(received), timeout=2)
    return bytes(received)


def test_client_frame_dribbled_a_byte_at_a_time_arrives_upstream_unchanged(pair):
    client, up = pair()
    frame = build_frame(OP_TEXT, b'{"type":"session.update","pad":"' + b"z" * 200 + b'"}', mask=True)
    assert dribble(client.sock, up, frame, header_length=2 + 2 + 4) == frame
    # The stream is still in step: a following frame arrives whole.
    follow = build_frame(OP_BINARY, b"after", mask=True)
    assert relay_through(client.sock, up, follow) == follow


def test_upstream_frame_dribbled_a_byte_at_a_time_arrives_at_the_client_unchanged(pair):
    client, up = pair()
    frame = build_frame(OP_TEXT, b'{"type":"response.output_text.delta","delta":"' + b"q" * 200 + b'"}')
    assert dribble(up.sock, client, frame, header_length=2 + 2) == frame
    follow = build_frame(OP_BINARY, b"after")
    assert relay_through(up.sock, client, follow) == follow


# -- fragmentation and control frames ----------------------------------------------------------------------

def test_fragmented_client_message_with_a_ping_between_fragments_is_relayed_and_answered(pair, tracer):
    client, up = pair()
    sequence = [build_frame(OP_TEXT, b'{"type":"conversation.item', fin=False, mask=True),
                build_frame(OP_PING, b"client-ping", mask=True),
                build_frame(OP_CONTINUATION, b'.create","x":', fin=False, mask=True),
                build_frame(OP_CONTINUATION, b"1}", fin=True, mask=True)]
    wire = b"".join(sequence)
    for frame in sequence:
        client.sock.sendall(frame)
    assert recv_exact(up, len(wire)) == wire
    pong = build_frame(OP_PONG, b"client-ping")
    up.sock.sendall(pong)
    assert recv_exact(client, len(pong)) == pong
    assert tracer.find("first_exit") == []


def test_fragmented_upstream_message_with_a_ping_between_fragments_is_relayed_and_answered(pair, tracer):
    client, up = pair()
    sequence = [build_frame(OP_TEXT, b'{"type":"response.output_text', fin=False),
                build_frame(OP_PING, b"upstream-ping"),
                build_frame(OP_CONTINUATION, b'.delta","delta":"hi"', fin=False),
                build_frame(OP_PING, b""),
                build_frame(OP_CONTINUATION, b"}", fin=True)]
    wire = b"".join(sequence)
    up.sock.sendall(wire)
    assert recv_exact(client, len(wire)) == wire
    pong = build_frame(OP_PONG, b"upstream-ping", mask=True)
    client.sock.sendall(pong)
    assert recv_exact(up, len(pong)) == pong
    assert tracer.find("first_exit") == []


def test_fragmented_binary_messages_interleave_with_control_frames_both_ways(pair):
    client, up = pair()
    to_up = [build_frame(OP_BINARY, b"\x00\x01", fin=False, mask=True),
             build_frame(OP_CONTINUATION, b"", fin=False, mask=True),
             build_frame(OP_PONG, b"unsolicited", mask=True),
             build_frame(OP_CONTINUATION, b"\x02" * 300, fin=True, mask=True)]
    to_client = [build_frame(OP_BINARY, b"\xff", fin=False),
                 build_frame(OP_PONG, b"pong"),
                 build_frame(OP_CONTINUATION, b"\xfe" * 70000, fin=True)]
    wire_up, wire_client = b"".join(to_up), b"".join(to_client)
    writer_up = send_while_reading(client.sock, wire_up)
    writer_client = send_while_reading(up.sock, wire_client)
    assert recv_exact(up, len(wire_up)) == wire_up
    assert recv_exact(client, len(wire_client)) == wire_client
    writer_up.get(timeout=5)
    writer_client.get(timeout=5)


# -- big frames stream -------------------------------------------------------------------------------------

def stream_big_frame(sender_sock, receiver, frame, piece=MiB, first_wait=5.0):
    """Send ``frame`` in pieces from another greenlet while the receiver hashes what arrives.

    After the first piece the writer waits for the receiver to see payload bytes; it records whether they came
    before it went on (a relay that buffers whole frames would hold them back).
    """
    header_length = frames.parse_header(frame, 0, len(frame))[5]
    seen_payload = gevent.event.Event()
    streamed = []

    def write():
        sender_sock.sendall(frame[:header_length + piece])
        streamed.append(seen_payload.wait(first_wait))
        for start in range(header_length + piece, len(frame), piece):
            sender_sock.sendall(frame[start:start + piece])

    writer = gevent.spawn(write)
    digest = hashlib.sha256()
    got = 0
    buffered = bytes(receiver.buf)
    receiver.buf.clear()
    if buffered:
        digest.update(buffered)
        got += len(buffered)
    with gevent.Timeout(30, AssertionError("big frame stalled")):
        while got < len(frame):
            chunk = receiver.sock.recv(min(1 << 20, len(frame) - got))
            assert chunk, "connection closed after %d of %d bytes" % (got, len(frame))
            digest.update(chunk)
            got += len(chunk)
            if got > header_length:
                seen_payload.set()
    writer.get(timeout=10)
    return digest.hexdigest(), streamed[0]


def test_16_mib_client_frame_arrives_intact_and_is_forwarded_before_it_is_complete(pair):
    client, up = pair()
    frame = build_frame(OP_BINARY, os.urandom(16 * MiB), mask=True)
    digest, streamed = stream_big_frame(client.sock, up, frame)
    assert digest == hashlib.sha256(frame).hexdigest()
    assert streamed, "the upstream saw no payload before the client sent the rest of the frame"
    follow = build_frame(OP_TEXT, b"next", mask=True)
    assert relay_through(client.sock, up, follow) == follow


def test_16_mib_upstream_frame_arrives_intact_and_is_forwarded_before_it_is_complete(pair):
    client, up = pair()
    frame = build_frame(OP_BINARY, os.urandom(16 * MiB))
    digest, streamed = stream_big_frame(up.sock, client, frame)
    assert digest == hashlib.sha256(frame).hexdigest()
    assert streamed, "the client saw no payload before the upstream sent the rest of the frame"
    follow = build_frame(OP_TEXT, b"next")
    assert relay_through(up.sock, client, follow) == follow


# -- close codes -------------------------------------------------------------------------------------------

def test_client_close_1000_reaches_upstream_verbatim_and_the_client_gets_a_close_reply(pair, tracer):
    client, up = pair()
    close = build_close(1000, mask=True)
    client.sock.sendall(close)
    assert recv_exact(up, len(close)) == close
    assert read_close(client, strict=True) == (1000, "")
    up.sock.sendall(build_close(1000))
    exit_ = first_exit(tracer)
    assert (exit_["side"], exit_["cause"], exit_["graceful"], exit_["close_code"]) == \
        ("client", "client_close", True, 1000)
    assert exit_["direction"] == "client_to_upstream"
    tracer.wait_for("relay_complete")


def test_client_close_4001_between_turns_reaches_upstream_with_code_and_reason(pair, tracer):
    client, up = pair()
    client.send(OP_TEXT, CREATE)
    assert up.read_message()[0] == OP_TEXT
    tracer.wait_for("turn_start")
    up.send_json({"type": "response.created", "response": {"id": "resp_1"}})
    up.send_json({"type": "response.completed", "response": {"id": "resp_1", "usage": {"input_tokens": 1}}})
    assert json.loads(client.read_message()[1])["type"] == "response.created"
    assert json.loads(client.read_message()[1])["type"] == "response.completed"
    tracer.wait_for("usage_recorded")
    close = build_close(4001, "bye", mask=True)
    client.sock.sendall(close)
    assert recv_exact(up, len(close)) == close
    assert read_close(client, strict=True) == (4001, "bye")
    up.sock.sendall(build_close(4001, "bye"))
    exit_ = first_exit(tracer)
    assert (exit_["side"], exit_["cause"], exit_["graceful"], exit_["close_code"]) == \
        ("client", "client_close", True, 4001)
    assert exit_["turn_in_flight"] is False
    tracer.wait_for("relay_complete")
    assert tracer.find("drain_start") == []


@pytest.mark.parametrize("code, reason", [(1011, "boom"), (4002, "quota")])
def test_upstream_close_reaches_the_client_with_code_and_reason(pair, tracer, code, reason):
    client, up = pair()
    close = build_close(code, reason)
    up.sock.sendall(close)
    assert recv_exact(client, len(close)) == close
    exit_ = first_exit(tracer)
    assert (exit_["side"], exit_["cause"], exit_["graceful"], exit_["close_code"]) == \
        ("upstream", "upstream_close", True, code)
    assert exit_["direction"] == "upstream_to_client"
    # The client's reply completes the closing handshake with the upstream.
    reply = build_close(code, reason, mask=True)
    client.sock.sendall(reply)
    assert recv_exact(up, len(reply)) == reply
    tracer.wait_for("relay_complete")


# -- client protocol errors --------------------------------------------------------------------------------

def masked(opcode, payload=b"", fin=True):
    return build_frame(opcode, payload, fin=fin, mask=True)


def with_rsv1(frame):
    frame = bytearray(frame)
    frame[0] |= 0x40
    return bytes(frame)


FIRST_FRAGMENT = masked(OP_TEXT, b'{"type":"conversation', fin=False)

CLIENT_VIOLATIONS = [
    # id, bytes the client sends, frames the upstream still gets before the violation, close code
    ("rsv1_set", with_rsv1(masked(OP_TEXT, b"hi")), [], 1002),
    ("reserved_opcode_3", masked(0x3, b"hi"), [], 1002),
    ("reserved_opcode_0xB", masked(0xB, b"hi"), [], 1002),
    ("unmasked_frame", build_frame(OP_TEXT, b"hi"), [], 1002),
    ("control_frame_126_bytes", masked(OP_PING, b"p" * 126), [], 1002),
    ("fragmented_ping", masked(OP_PING, b"p", fin=False), [], 1002),
    ("continuation_without_message", masked(OP_CONTINUATION, b"orphan"), [], 1002),
    ("text_inside_fragmented_message", FIRST_FRAGMENT + masked(OP_TEXT, b"new message"),
     [(False, OP_TEXT, b'{"type":"conversation')], 1002),
    ("binary_inside_fragmented_message", FIRST_FRAGMENT + masked(OP_PING, b"ok") + masked(OP_BINARY, b"\x00"),
     [(False, OP_TEXT, b'{"type":"conversation'), (True, OP_PING, b"ok")], 1002),
    ("close_code_999", masked(OP_CLOSE, struct.pack("!H", 999)), [], 1002),
    ("close_code_1005", masked(OP_CLOSE, struct.pack("!H", 1005)), [], 1002),
    ("close_code_1006", masked(OP_CLOSE, struct.pack("!H", 1006) + b"abnormal"), [], 1002),
    ("close_one_byte_payload", masked(OP_CLOSE, b"\x03"), [], 1002),
    ("close_reason_not_utf8", masked(OP_CLOSE, struct.pack("!H", 1000) + b"bad \xff\xfe"), [], 1007),
]


@pytest.mark.parametrize("data, forwarded, code", [c[1:] for c in CLIENT_VIOLATIONS],
                         ids=[c[0] for c in CLIENT_VIOLATIONS])
def test_client_protocol_violation_closes_the_client_with_its_code_and_closes_the_upstream(
        pair, tracer, data, forwarded, code):
    client, up = pair()
    client.sock.sendall(data)
    close_code, reason = read_close(client, strict=True)
    assert close_code == code
    assert reason, "the close frame should say what the client did wrong"
    seen, upstream_close = read_until_closed(up)
    # What came before the violation is relayed; the offending frame and anything after it never are.
    assert seen == forwarded
    if upstream_close is not None:
        assert frames.is_valid_close_code(upstream_close[0])
        assert upstream_close[0] not in (frames.CLOSE_PROTOCOL_ERROR, frames.CLOSE_INVALID_PAYLOAD)
        up.sock.sendall(build_close(upstream_close[0]))
    exit_ = first_exit(tracer)
    assert (exit_["side"], exit_["graceful"], exit_["close_code"]) == ("client", False, code)
    assert exit_["cause"] == "client_protocol_error"
    tracer.wait_for("relay_complete")


def test_protocol_error_after_good_frames_in_the_same_write_still_relays_the_good_frames(pair, tracer):
    client, up = pair()
    good = masked(OP_TEXT, b'{"type":"session.update"}') + masked(OP_PING, b"p")
    client.sock.sendall(good + with_rsv1(masked(OP_TEXT, b"bad")) + masked(OP_TEXT, b"never"))
    assert read_close(client, strict=True)[0] == 1002
    assert recv_exact(up, len(good)) == good
    seen, _ = read_until_closed(up)
    assert seen == []


def test_client_message_over_the_limit_is_refused_with_1009_from_its_header(pair, tracer):
    client, up = pair(**{READ_LIMIT: 1024})
    frame = masked(OP_BINARY, os.urandom(2048))
    header_length = frames.parse_header(frame, 0, len(frame))[5]
    # Only the header and a few payload bytes: the relay must decide without waiting for the payload.
    client.sock.sendall(frame[:header_length + 10])
    code, reason = read_close(client, strict=True)
    assert code == frames.CLOSE_MESSAGE_TOO_BIG and reason
    try:
        client.sock.sendall(frame[header_length + 10:])
    except OSError:
        pass
    seen, upstream_close = read_until_closed(up)
    assert seen == []
    if upstream_close is not None:
        up.sock.sendall(build_close(upstream_close[0]))
    exit_ = first_exit(tracer)
    assert (exit_["side"], exit_["cause"], exit_["graceful"], exit_["close_code"]) == \
        ("client", "client_message_too_big", False, 1009)
    complete = tracer.wait_for("relay_complete")
    assert complete["bytes_to_upstream"] < 200, "payload bytes of the refused frame reached the upstream"


def test_client_message_at_the_limit_is_relayed(pair, tracer):
    client, up = pair(**{READ_LIMIT: 1024})
    frame = masked(OP_BINARY, os.urandom(1024))
    assert relay_through(client.sock, up, frame) == frame
    assert tracer.find("first_exit") == []


def test_fragmented_client_message_adding_up_over_the_limit_is_refused_with_1009(pair, tracer):
    client, up = pair(**{READ_LIMIT: 1024})
    first = masked(OP_BINARY, b"a" * 600, fin=False)
    second = masked(OP_CONTINUATION, b"b" * 300, fin=False)
    third = masked(OP_CONTINUATION, b"c" * 200, fin=True)  # 1100 bytes in all
    client.sock.sendall(first + second)
    assert recv_exact(up, len(first) + len(second)) == first + second
    client.sock.sendall(third)
    code, reason = read_close(client, strict=True)
    assert code == frames.CLOSE_MESSAGE_TOO_BIG and reason
    seen, upstream_close = read_until_closed(up)
    assert seen == []
    if upstream_close is not None:
        up.sock.sendall(build_close(upstream_close[0]))
    exit_ = first_exit(tracer)
    assert exit_["cause"] == "client_message_too_big" and exit_["close_code"] == 1009


def test_refused_fragmented_create_leaves_no_turn_to_drain(pair, tracer, store):
    """A response.create cut off by the size limit never reached the upstream whole: there is no turn upstream,
    so the relay closes the upstream at once instead of draining it, and bills nothing."""
    client, up = pair(**{READ_LIMIT: 1024})
    create = json.dumps({"type": "response.create", "model": "gpt-test",
                         "input": [{"role": "user", "content": "x" * 2000}]}).encode()
    first = masked(OP_TEXT, create[:700], fin=False)
    client.sock.sendall(first)
    assert recv_exact(up, len(first)) == first
    client.sock.sendall(masked(OP_CONTINUATION, create[700:], fin=True))
    assert read_close(client, strict=True)[0] == frames.CLOSE_MESSAGE_TOO_BIG
    started = time.monotonic()
    seen, upstream_close = read_until_closed(up)
    assert seen == []
    waited = time.monotonic() - started
    assert waited < 1.0, "the upstream was held %.1fs for a turn it never received" % waited
    if upstream_close is not None:
        up.sock.sendall(build_close(upstream_close[0]))
    tracer.wait_for("relay_complete")
    assert tracer.find("drain_start") == []
    assert store.records == []


# -- Pongs -------------------------------------------------------------------------------------------------

def test_pong_answering_the_relays_ping_is_consumed_but_an_unsolicited_pong_is_forwarded(pair, tracer):
    client, up = pair(**{INTERVAL: 0.3, PING_TIMEOUT: 0.25})
    up.send(OP_TEXT, b'{"type":"response.created"}')  # the first business write arms the keepalive
    assert client.read_frame() == (True, OP_TEXT, b'{"type":"response.created"}')
    fin, opcode, ping = client.read_frame()
    assert opcode == OP_PING and ping.startswith(b"wsrelay-keepalive")
    client.send(OP_PONG, ping)
    assert tracer.wait_for("downstream_ping_ok")["direction"] == "downstream_keepalive"
    client.send(OP_PONG, b"unsolicited")
    # Frames keep their order: had the keepalive Pong been forwarded, it would arrive first.
    assert up.read_frame() == (True, OP_PONG, b"unsolicited")
    client.send(OP_TEXT, b'{"type":"after"}')
    assert up.read_frame() == (True, OP_TEXT, b'{"type":"after"}')


def test_keepalive_pong_between_data_frames_in_one_write_is_cut_out_of_the_stream(pair, tracer):
    client, up = pair(**{INTERVAL: 0.3, PING_TIMEOUT: 0.25})
    up.send(OP_TEXT, b'{"type":"response.created"}')
    assert client.read_frame()[1] == OP_TEXT
    fin, opcode, ping = client.read_frame()
    assert opcode == OP_PING
    before = masked(OP_TEXT, b'{"type":"one"}') + masked(OP_BINARY, b"\x01" * 200, fin=False)
    after = masked(OP_CONTINUATION, b"\x02" * 10) + masked(OP_TEXT, b'{"type":"two"}')
    client.sock.sendall(before + masked(OP_PONG, ping) + after)
    assert recv_exact(up, len(before) + len(after)) == before + after
    tracer.wait_for("downstream_ping_ok")


def test_unsolicited_client_pong_is_forwarded_without_keepalive(pair):
    client, up = pair()
    pong = masked(OP_PONG, b"heartbeat")
    assert relay_through(client.sock, up, pong) == pong


# -- upstream protocol errors ------------------------------------------------------------------------------

UPSTREAM_VIOLATIONS = [
    ("masked_frame", build_frame(OP_TEXT, b'{"type":"response.in_progress"}', mask=True)),
    ("rsv1_set", with_rsv1(build_frame(OP_TEXT, b"{}"))),
    ("reserved_opcode_3", build_frame(0x3, b"x")),
    ("fragmented_ping", build_frame(OP_PING, b"p", fin=False)),
    ("continuation_without_message", build_frame(OP_CONTINUATION, b"orphan")),
    ("text_inside_fragmented_message", build_frame(OP_TEXT, b"{", fin=False) + build_frame(OP_TEXT, b"{}")),
]


@pytest.mark.parametrize("bad", [v[1] for v in UPSTREAM_VIOLATIONS], ids=[v[0] for v in UPSTREAM_VIOLATIONS])
def test_upstream_protocol_violation_closes_the_client_with_1011(pair, tracer, bad):
    client, up = pair()
    good = build_frame(OP_TEXT, b'{"type":"response.created"}')
    up.sock.sendall(good + bad)
    assert recv_exact(client, len(good)) == good
    seen, client_close = read_until_closed(client)
    assert all(opcode != OP_TEXT or not fin for fin, opcode, _ in seen)  # at most the legal first fragment
    assert client_close is not None, "the client got no close frame"
    code, reason = client_close
    assert code == frames.CLOSE_INTERNAL_ERROR and reason
    client.sock.sendall(build_close(code, mask=True))
    exit_ = first_exit(tracer)
    assert (exit_["side"], exit_["cause"], exit_["graceful"]) == ("upstream", "upstream_protocol_error", False)
    seen, upstream_close = read_until_closed(up)
    assert upstream_close is None or upstream_close[0] == frames.CLOSE_PROTOCOL_ERROR
    tracer.wait_for("relay_complete")


# -- bytes sent along with the handshake -------------------------------------------------------------------

def test_frames_sent_with_the_handshake_reach_upstream_verbatim(scripted, relay):
    upstream, url = scripted()
    early = masked(OP_TEXT, b'{"type":"session.update"}') + masked(OP_BINARY, os.urandom(40000)) + \
        masked(OP_PING, b"early")
    client = connect(relay(url), extra=early)
    up = upstream.next()
    try:
        assert recv_exact(up, len(early)) == early
        later = masked(OP_TEXT, b'{"type":"later"}')
        assert relay_through(client.sock, up, later) == later
    finally:
        up.done.set()
        client.sock.close()
