"""FrameStream: every frame decision of one direction, by feeding bytes (no sockets, no timers)."""

import json
import random

import pytest

from wsrelay import framestream, frames
from wsrelay.framestream import (CloseArrived, FrameStream, Forward, HeldEvent, LedgerEvent, PingArrived,
                                 PongArrived, TurnStarted, Violation)
from wsrelay.frames import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT
from wsrelay.walk import PyWalker

CREATE = json.dumps({"type": "response.create", "model": "gpt-5", "input": [{"role": "user", "content": "hi"}]})
try:
    from wsrelay._speedups import Walker as CWalker
except ImportError:  # test_walk reports it; the pure-Python walk is still tested
    CWalker = None
WALKERS = [PyWalker] + ([CWalker] if CWalker else [])

COMPLETED = json.dumps({"type": "response.completed", "response": {"id": "resp_1", "usage": {"input_tokens": 3}}})
DELTA = json.dumps({"type": "response.output_text.delta", "delta": "hello"})


def client_stream(limit=1 << 20, **kw):
    return FrameStream(True, read_limit=limit, **kw)


def upstream_stream(**kw):
    return FrameStream(False, max_event_bytes=1 << 20, **kw)


def masked(opcode, payload, fin=True):
    return frames.build_frame(opcode, payload if isinstance(payload, bytes) else payload.encode(), fin=fin,
                              mask=True)


def plain(opcode, payload, fin=True):
    return frames.build_frame(opcode, payload if isinstance(payload, bytes) else payload.encode(), fin=fin)


def forwarded(actions):
    return b"".join(bytes(a.data) for a in actions if isinstance(a, Forward))


def kinds(actions):
    return [type(a).__name__ for a in actions]


def feed_in_pieces(stream, data, cuts):
    actions = []
    for start, end in zip([0] + cuts, cuts + [len(data)]):
        actions += stream.feed(data[start:end])
    return actions


# -- client -> upstream --------------------------------------------------------------------------------------------

def test_a_request_is_forwarded_verbatim_and_then_starts_a_turn():
    data = masked(OP_TEXT, CREATE)
    actions = client_stream().feed(data)
    assert actions == [Forward(data, False, True), TurnStarted("gpt-5")]


def test_a_turn_starts_only_once_the_last_byte_of_its_request_is_forwarded_whatever_the_reads():
    data = masked(OP_TEXT, CREATE[:40], fin=False) + masked(OP_PING, b"p") + masked(OP_CONTINUATION, CREATE[40:])
    for cut_count in range(0, 6):
        for seed in range(20):
            rng = random.Random(seed)
            cuts = sorted(rng.sample(range(1, len(data)), cut_count))
            actions = feed_in_pieces(client_stream(), data, cuts)
            assert forwarded(actions) == data
            assert kinds(actions)[-2:] == ["Forward", "TurnStarted"], (cuts, actions)
            assert sum(isinstance(a, TurnStarted) for a in actions) == 1


def test_other_client_messages_start_no_turn():
    data = masked(OP_TEXT, '{"type":"response.cancel"}') + masked(OP_BINARY, b"\x00" * 300)
    assert client_stream().feed(data) == [Forward(data, False, True)]


def test_only_the_pong_to_the_relays_own_ping_is_consumed():
    stream = client_stream()
    stream.expected_pong = b"wsrelay-keepalive-1"
    theirs, ours = masked(OP_PONG, b"client's own"), masked(OP_PONG, b"wsrelay-keepalive-1")
    request = masked(OP_TEXT, CREATE)
    actions = stream.feed(theirs + ours + request)
    assert actions == [Forward(theirs, False, False), PongArrived(), Forward(request, False, True),
                       TurnStarted("gpt-5")]
    assert stream.expected_pong is None


def test_a_close_ends_the_stream_after_what_came_before_it():
    request, close = masked(OP_TEXT, CREATE), frames.build_close(4000, "bye", mask=True)
    stream = client_stream()
    actions = stream.feed(request + close + masked(OP_TEXT, "after the close"))
    assert actions == [Forward(request, False, True), TurnStarted("gpt-5"), CloseArrived(4000, "bye", close)]
    assert stream.ended and stream.feed(masked(OP_TEXT, "more")) == []


def test_a_message_over_the_limit_is_refused_from_its_header():
    frame = masked(OP_BINARY, b"z" * 2000)
    [violation] = client_stream(limit=1000).feed(frame[:20])
    assert (violation.code, violation.pending) == (frames.CLOSE_MESSAGE_TOO_BIG, frame[:20])
    assert violation.reason == "message of 2000 bytes is over the 1000-byte limit"


def test_fragments_adding_up_over_the_limit_are_refused_at_the_one_that_crosses_it():
    first, second = masked(OP_TEXT, "a" * 600, fin=False), masked(OP_CONTINUATION, "b" * 600)
    actions = client_stream(limit=1000).feed(first + second)
    assert actions[0] == Forward(first, False, True)
    assert actions[1].code == frames.CLOSE_MESSAGE_TOO_BIG and second.startswith(actions[1].pending)


def test_protocol_violations_get_1002_with_what_was_wrong():
    cases = {
        plain(OP_TEXT, "unmasked"): "not masked",
        masked(OP_CONTINUATION, "x"): "continuation",
        masked(OP_TEXT, "a", fin=False) + masked(OP_TEXT, "b"): "new data message",
        masked(0x3, "reserved"): "opcode",
        masked(OP_PING, b"p" * 126): "control",
        masked(OP_CLOSE, b"\x03"): "close",
    }
    for data, words in cases.items():
        violation = client_stream().feed(data)[-1]
        assert isinstance(violation, Violation) and violation.code == frames.CLOSE_PROTOCOL_ERROR, data
        assert words in violation.reason.lower(), (words, violation.reason)


def test_a_partial_frame_is_forwarded_as_it_arrives_and_marked_mid_frame():
    frame = masked(OP_BINARY, b"q" * 5000)
    stream = client_stream()
    first = stream.feed(frame[:3000])
    assert forwarded(first) == frame[:3000] and all(a.mid_frame for a in first)
    # business: the frame counts once, with its header; the rest of its payload adds no data frame
    assert [a.business for a in first] == [True] + [False] * (len(first) - 1)
    rest = stream.feed(frame[3000:])
    assert forwarded(rest) == frame[3000:] and [a.mid_frame for a in rest][-1] is False


def test_bytes_read_with_the_handshake_are_walked_first():
    data = masked(OP_TEXT, CREATE)
    stream = client_stream(initial=data[:10])
    actions = stream.feed(data[10:])
    assert forwarded(actions) == data and actions[0] == Forward(data[:10], True, True)
    assert actions[-1] == TurnStarted("gpt-5")


# -- upstream -> client --------------------------------------------------------------------------------------------

def test_terminal_events_and_response_created_go_to_the_ledger_after_they_are_forwarded():
    created = plain(OP_TEXT, '{"type":"response.created","response":{"id":"resp_1"}}')
    data = created + plain(OP_TEXT, DELTA) * 3 + plain(OP_TEXT, COMPLETED)
    actions = upstream_stream().feed(data)
    assert actions == [Forward(data, False, True), LedgerEvent(created[2:]), LedgerEvent(COMPLETED.encode())]


def test_a_fragmented_terminal_event_reaches_the_ledger_whole_whatever_the_reads():
    payload = COMPLETED.encode()
    data = (plain(OP_TEXT, payload[:30], fin=False) + plain(OP_PING, b"mid") + plain(OP_CONTINUATION, payload[30:80],
            fin=False) + plain(OP_CONTINUATION, payload[80:]))
    rng = random.Random(7)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 7)))
        actions = feed_in_pieces(upstream_stream(), data, cuts)
        assert forwarded(actions) == data
        assert [a for a in actions if isinstance(a, LedgerEvent)] == [LedgerEvent(payload)]
        assert PingArrived(b"mid") in actions


def test_events_the_ledger_ignores_are_never_copied():
    data = plain(OP_TEXT, DELTA) + plain(OP_TEXT, DELTA[:20], fin=False) + plain(OP_CONTINUATION, DELTA[20:])
    assert upstream_stream().feed(data) == [Forward(data, False, True)]


def test_the_upstreams_close_is_handed_over_even_with_a_bad_payload():
    good = frames.build_close(1011, "upstream failure")
    assert upstream_stream().feed(good)[-1] == CloseArrived(1011, "upstream failure", good)
    bad = plain(OP_CLOSE, b"\x03")
    assert upstream_stream().feed(bad) == [CloseArrived(None, "", bad)]


def test_a_masked_upstream_frame_is_a_violation_after_the_events_before_it():
    data = plain(OP_TEXT, COMPLETED)
    bad = masked(OP_TEXT, "{}")
    actions = upstream_stream().feed(data + bad)
    assert actions[:2] == [Forward(data, False, True), LedgerEvent(COMPLETED.encode())]
    assert actions[2].code == frames.CLOSE_PROTOCOL_ERROR and actions[2].pending == bad


def test_a_control_frame_split_across_reads_is_counted_once():
    data = plain(OP_TEXT, DELTA) + plain(OP_PING, b"ping") + plain(OP_TEXT, DELTA)
    stream = upstream_stream()
    feed_in_pieces(stream, data, list(range(1, len(data))))
    assert (stream.walker.frames, stream.walker.data_frames) == (3, 2)


def test_forwarded_bytes_are_the_input_less_only_what_the_relay_consumes():
    rng = random.Random(6455)
    for _ in range(300):
        pieces = []
        for _ in range(rng.randrange(1, 10)):
            kind = rng.random()
            if kind < 0.4:
                pieces.append(plain(OP_TEXT, rng.choice((DELTA, COMPLETED, '{"type":"response.created"}'))))
            elif kind < 0.7:
                pieces.append(plain(OP_BINARY, bytes(rng.randrange(0, 70000))))
            else:
                pieces.append(plain(OP_PING, b"x" * rng.randrange(0, 126)))
        data = b"".join(pieces)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 8))))
        actions = feed_in_pieces(upstream_stream(), data, cuts)
        assert forwarded(actions) == data
        ledger = (COMPLETED.encode(), b'{"type":"response.created"}')
        assert sum(isinstance(a, LedgerEvent) for a in actions) == sum(p[2:] in ledger for p in pieces)


# -- upstream -> client, holding back what may be an error event (quota failover) -------------------------------

ERROR = json.dumps({"type": "error", "status": 429, "error": {"type": "requests", "code": "rate_limit_exceeded",
                                                              "message": "Rate limit reached"}})
CREATED = json.dumps({"type": "response.created", "response": {"id": "resp_1"}})


@pytest.fixture(params=WALKERS, ids=lambda w: w.__module__)
def walker(request, monkeypatch):
    """Every test below runs on both header walks (C and pure Python)."""
    monkeypatch.setattr(framestream, "Walker", request.param)
    return request.param


def holding(**kw):
    stream = upstream_stream(**kw)
    stream.hold_errors = True
    return stream


def replayed(actions):
    """What reaches the client if the session forwards every held frame: must be the input, in order."""
    return b"".join(bytes(a.data if isinstance(a, Forward) else a.frame) for a in actions
                    if isinstance(a, (Forward, HeldEvent)))


def test_without_hold_errors_an_error_event_is_forwarded_and_read_after_as_always(walker):
    data = plain(OP_TEXT, DELTA) + plain(OP_TEXT, ERROR) + plain(OP_TEXT, DELTA)
    assert upstream_stream().feed(data) == [Forward(data, False, True), LedgerEvent(ERROR.encode())]


def test_a_held_error_event_comes_out_whole_between_the_bytes_around_it(walker):
    before = plain(OP_TEXT, CREATED) + plain(OP_TEXT, DELTA)
    error, after = plain(OP_TEXT, ERROR), plain(OP_TEXT, DELTA) + plain(OP_TEXT, COMPLETED)
    actions = holding().feed(before + error + after)
    # response.created is read after the Forward that ends it, and before the held event
    assert actions == [Forward(before, False, True), LedgerEvent(CREATED.encode()), HeldEvent(error, ERROR.encode()),
                       Forward(after, False, True), LedgerEvent(COMPLETED.encode())]


def test_only_what_may_be_an_error_event_is_held(walker):
    others = [DELTA, COMPLETED, CREATED, '{"type":"errors.not_quite"}', '{"type":"response.failed"}']
    data = b"".join(plain(OP_TEXT, text) for text in others) + plain(OP_BINARY, b'{"type":"error"}')
    actions = holding().feed(data)
    assert not any(isinstance(a, HeldEvent) for a in actions) and forwarded(actions) == data
    # a type the first bytes do not show may be "error": held (the session reads it and forwards it)
    hidden = plain(OP_TEXT, json.dumps({"sequence_number": 1, "data": "x" * 100, "type": "response.in_progress"}))
    assert kinds(holding().feed(hidden)) == ["HeldEvent"]


def test_a_held_frame_is_taken_only_once_all_of_it_is_here_whatever_the_reads(walker):
    error = plain(OP_TEXT, ERROR)
    data = plain(OP_TEXT, DELTA) + plain(OP_PING, b"p") + error + plain(OP_TEXT, COMPLETED)
    rng = random.Random(1013)
    for _ in range(200):
        stream = holding()
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 8)))
        actions = feed_in_pieces(stream, data, cuts)
        assert replayed(actions) == data, cuts
        assert [a for a in actions if isinstance(a, HeldEvent)] == [HeldEvent(error, ERROR.encode())], cuts
        assert [a for a in actions if isinstance(a, LedgerEvent)] == [LedgerEvent(COMPLETED.encode())], cuts
        assert (stream.walker.frames, stream.walker.data_frames) == (4, 3), cuts


def test_a_fragmented_or_oversized_error_event_is_forwarded_as_it_arrives(walker):
    payload = ERROR.encode()
    fragmented = plain(OP_TEXT, payload[:20], fin=False) + plain(OP_CONTINUATION, payload[20:])
    actions = holding().feed(fragmented)
    assert actions == [Forward(fragmented, False, True), LedgerEvent(payload)]
    big = json.dumps({"type": "error", "status": 429, "error": {"message": "x" * framestream.HOLD_MAX_BYTES}})
    frame = plain(OP_TEXT, big)
    stream = holding()
    first = stream.feed(frame[:1000])
    assert forwarded(first) == frame[:1000] and all(a.mid_frame for a in first)  # not waited for
    rest = stream.feed(frame[1000:])
    assert forwarded(first + rest) == frame and rest[-1] == LedgerEvent(big.encode())


def test_a_held_frame_larger_than_the_receive_buffer_is_collected_in_it(walker):
    long_error = json.dumps({"type": "error", "status": 429, "error": {"code": "insufficient_quota",
                                                                       "message": "q" * 20000}})
    data = plain(OP_TEXT, DELTA) + plain(OP_TEXT, long_error)
    stream = holding()
    actions = feed_in_pieces(stream, data, list(range(700, len(data), 700)))
    assert actions[-1] == HeldEvent(plain(OP_TEXT, long_error), long_error.encode())
    assert replayed(actions) == data


def test_holding_keeps_every_byte_in_order_and_holds_exactly_the_whole_error_events(walker):
    rng = random.Random(429)
    for _ in range(150):
        pieces, held = [], []
        for _ in range(rng.randrange(1, 9)):
            kind = rng.random()
            if kind < 0.3:
                error = json.dumps({"type": "error", "status": 429, "pad": "e" * rng.randrange(0, 3000)})
                pieces.append(plain(OP_TEXT, error))
                held.append(HeldEvent(pieces[-1], error.encode()))
            elif kind < 0.4:
                payload = ERROR.encode()
                pieces.append(plain(OP_TEXT, payload[:9], fin=False) + plain(OP_CONTINUATION, payload[9:]))
            elif kind < 0.7:
                pieces.append(plain(OP_TEXT, rng.choice((DELTA, COMPLETED, CREATED))))
            elif kind < 0.85:
                pieces.append(plain(OP_BINARY, bytes(rng.randrange(0, 70000))))
            else:
                pieces.append(plain(OP_PING, b"x" * rng.randrange(0, 126)))
        data = b"".join(pieces)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 10))))
        actions = feed_in_pieces(holding(), data, cuts)
        assert replayed(actions) == data
        assert [a for a in actions if isinstance(a, HeldEvent)] == held
