"""The bulk frame walk: both implementations, the same answers, and never a skipped frame that mattered."""

import os
import random
import subprocess
import sys

import pytest

from wsrelay import frames, sniff, usage, walk
from wsrelay.walk import CONTROL, ERROR, NEED_MORE, TEXT, PyWalker

from tests.test_frames import header_bytes

try:
    from wsrelay._speedups import Walker as CWalker
except ImportError:  # reported by test_c_walker_is_built; the other tests still check the pure-Python one
    CWalker = None

TERMINAL = tuple(t.encode() for t in usage.LEDGER_EVENTS)
IMPLEMENTATIONS = [PyWalker] + ([CWalker] if CWalker else [])
MASK = b"\x11\x22\x33\x44"


def frame(opcode, payload=b"", fin=True, mask=None, rsv=0, length=None):
    """A frame with full control over its header (``length`` may lie about the payload)."""
    head = header_bytes(opcode, len(payload) if length is None else length, fin=fin, rsv=rsv, mask_key=mask)
    return head + (frames.unmask(payload, mask) if mask is not None else payload)


def up(walker_class):
    return walker_class(False, 0, TERMINAL)


def down(walker_class, limit=1 << 20):
    return walker_class(True, limit)


def state(w):
    return (w.remaining, bool(w.frame_fin), bool(w.in_message), w.message_size, w.frames, w.data_frames)


def test_c_walker_is_built():
    # The test environment builds the extension (bin/run-tests makes sure a compiler is there); a relay
    # without it still works, on the pure-Python walker.
    assert CWalker is not None, "wsrelay._speedups was not built"
    env = dict(os.environ, WSRELAY_NO_SPEEDUPS="")
    out = subprocess.check_output([sys.executable, "-c", "import wsrelay.walk as w; print(w.Walker.__module__)"],
                                  env=env, text=True)
    assert out.strip() == "wsrelay._speedups"


def test_no_speedups_environment_variable_selects_the_pure_python_walker():
    env = dict(os.environ, WSRELAY_NO_SPEEDUPS="1")
    out = subprocess.check_output([sys.executable, "-c", "import wsrelay.walk as w; print(w.Walker.__name__)"],
                                  env=env, text=True)
    assert out.strip() == "PyWalker"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_skips_plain_events_and_stops_at_a_terminal_one(impl):
    delta = frame(0x1, b'{"type":"response.output_text.delta","delta":"hi"}')
    binary = frame(0x2, b"\x00" * 300)
    done = frame(0x1, b'{"type":"response.completed","response":{}}')
    buf = bytearray(delta + binary + delta + done + delta)
    w = up(impl)
    pos, event = w.walk(buf, 0, len(buf))
    assert (pos, event) == (len(delta + binary + delta), TEXT)
    assert (w.frames, w.data_frames, w.remaining) == (3, 3, 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_upstream_messages_it_cannot_judge_are_left_to_the_pump(impl):
    for payload in (b'{"response":{},"type":"response.output_text.delta"}',   # type is not the first key
                    b'{"type":"response.out\\u0070ut_text.delta"}',            # an escape in the type
                    b'{"type":"' + b"x" * 100 + b'"}',                           # type cut off by the prefix
                    b'[1, 2]', b"not json", b""):
        buf = bytearray(frame(0x1, payload))
        assert up(impl).walk(buf, 0, len(buf)) == (0, TEXT), payload
    fragment = bytearray(frame(0x1, b'{"type":"response.output_text.delta"}', fin=False))
    assert up(impl).walk(fragment, 0, len(fragment)) == (0, TEXT)
    partial = frame(0x1, b'{"type":"response.output_text.delta","delta":"x"}')
    buf = bytearray(partial[:-1])
    assert up(impl).walk(buf, 0, len(buf)) == (0, TEXT)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_payload_spanning_reads_is_carried_over(impl):
    data = frame(0x2, b"a" * 70000) + frame(0x2, b"b" * 10)
    w = up(impl)
    buf = bytearray(data[:30000])
    assert w.walk(buf, 0, len(buf)) == (30000, NEED_MORE)
    assert w.remaining == 70000 - (30000 - 10)
    rest = bytearray(data[30000:])
    assert w.walk(rest, 0, len(rest)) == (len(rest), NEED_MORE)
    assert (w.frames, w.remaining) == (2, 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_incomplete_headers_wait_for_more(impl):
    for data, client, header_length in ((frame(0x2, b"x" * 300), False, 4), (frame(0x2, b"x" * 70000), False, 10),
                                        (frame(0x2, b"x" * 10, mask=MASK), True, 6)):
        for cut in range(1, header_length):
            w = impl(client, 1 << 20, TERMINAL)
            buf = bytearray(data[:cut])
            assert w.walk(buf, 0, cut) == (0, NEED_MORE)
            assert w.frames == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_control_frames_and_bad_headers_stop_the_walk(impl):
    cases = [
        (frame(0x9, b"p"), False, CONTROL),
        (frame(0x8, b"\x03\xe8"), False, CONTROL),
        (frame(0x2, b"x", rsv=0x40), False, ERROR),
        (frame(0x3, b"x"), False, ERROR),
        (frame(0x2, b"x", mask=MASK), False, ERROR),      # a masked server frame
        (frame(0x2, b"x"), True, ERROR),                  # an unmasked client frame
        (frame(0x0, b"x"), False, ERROR),                 # a continuation of nothing
        (frame(0x2, b"", length=1 << 63)[:10], False, ERROR),
        (frame(0x2, b"x" * 2000, mask=MASK), True, ERROR),  # over the client's read limit (1000 below)
    ]
    for data, client, expected in cases:
        w = impl(client, 1000, TERMINAL)
        buf = bytearray(b"\x82\x00" + data) if not client else bytearray(frame(0x2, b"", mask=MASK) + data)
        assert w.walk(buf, 0, len(buf)) == (2 if not client else 6, expected), data[:4]
    w = up(impl)
    buf = bytearray(frame(0x1, b"a", fin=False) + frame(0x2, b"b"))  # a new message inside a fragmented one
    assert w.walk(buf, 0, len(buf)) == (0, TEXT)
    w.in_message = True
    assert w.walk(buf, 3, len(buf)) == (3, ERROR)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_client_requests_stop_the_walk_and_other_messages_do_not(impl):
    create = frame(0x1, b'{"type":"response.create","model":"gpt-5"}', mask=MASK)
    other = frame(0x1, b'{"type":"conversation.item.create"}', mask=MASK)
    untyped_long = frame(0x1, b"{" + b" " * 300 + b'"type":"response.create"}', mask=MASK)
    buf = bytearray(other + other + create)
    w = down(impl)
    assert w.walk(buf, 0, len(buf)) == (2 * len(other), TEXT)
    assert w.frames == 2
    buf = bytearray(untyped_long)
    assert down(impl).walk(buf, 0, len(buf)) == (0, TEXT)
    buf = bytearray(create[:20])  # the request's first bytes are not all here yet
    assert down(impl).walk(buf, 0, len(buf)) == (0, TEXT)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_client_message_size_adds_up_over_fragments(impl):
    w = impl(True, 100, TERMINAL)
    buf = bytearray(frame(0x2, b"a" * 60, fin=False, mask=MASK) + frame(0x0, b"b" * 60, mask=MASK))
    assert w.walk(buf, 0, len(buf)) == (66, ERROR)
    assert (w.message_size, w.in_message) == (60, True)


def random_frame(rng, client):
    kind = rng.random()
    mask = MASK if client else None
    if kind < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))  # garbage
    if kind < 0.15:
        return frame(rng.choice((0x8, 0x9, 0xA)), b"c" * rng.randrange(0, 20), mask=mask)
    if kind < 0.2:
        return frame(rng.choice((0x0, 0x1, 0x2, 0x3, 0xB)), b"r" * rng.randrange(0, 20),
                     fin=rng.random() < 0.5, mask=mask if rng.random() < 0.9 else (None if mask else MASK),
                     rsv=rng.choice((0, 0, 0, 0x10)))
    if kind < 0.6:
        return frame(0x1, random_json(rng), fin=rng.random() < 0.85, mask=mask)
    size = rng.choice((0, 1, 125, 126, 127, 300, 65535, 65536, 70000))
    return frame(rng.choice((0x0, 0x2, 0x2)), b"\x00" * size, fin=rng.random() < 0.8, mask=mask)


TYPES = [t.encode() for t in usage.TERMINAL_EVENTS] + [
    b"response.output_text.delta", b"response.created", b"response.in_progress", b"response.create",
    b"response.complete", b"response.completed.x", b"err", b"errors", b"", b"response.out\\u0070ut"]


def random_json(rng):
    pieces = [rng.choice((b"", b" ", b"\n\t")), b"{", rng.choice((b"", b" "))]
    if rng.random() < 0.2:
        pieces.append(b'"response":{"type":"message"},')
    pieces += [rng.choice((b'"type"', b'"kind"', b'"type" ')), rng.choice((b":", b" : ", b"")),
               b'"' + rng.choice(TYPES) + b'"', rng.choice((b"", b',"model":"gpt-5"'))]
    if rng.random() < 0.3:
        pieces.append(b',"delta":"' + b"x" * rng.randrange(0, 400) + b'"')
    pieces.append(b"}")
    return b"".join(pieces)[:rng.choice((10, 60, 95, 96, 97, 500, 1000))]


def drive(impl, client, data, cuts):
    """Feed ``data`` in reads split at ``cuts`` like a pump does; on every event the frame is stepped over the
    slow way (the pump's part); stops at the first ERROR.  Returns every result and state along the way."""
    w = impl(client, 50000, TERMINAL)
    buf = bytearray()
    trail = []
    start = 0
    for cut in cuts + [len(data)]:
        buf += data[start:cut]
        start = cut
        pos = 0
        while pos < len(buf):
            pos, event = w.walk(buf, pos, len(buf))
            trail.append((pos, event, state(w)))
            if event == NEED_MORE:
                break
            if event == ERROR:
                return trail
            header = frames.parse_header(buf, pos, len(buf))
            if header is None:
                break
            fin, _, opcode, _, length, header_length = header
            w.frames += 1
            if opcode < 0x8:
                w.data_frames += 1
                w.in_message = not fin
                w.frame_fin = bool(fin)
            w.remaining = length
            pos += header_length
        del buf[:pos]
    return trail


def test_both_implementations_agree_on_random_streams():
    if CWalker is None:
        pytest.fail("wsrelay._speedups was not built")
    rng = random.Random(6455)
    for case in range(1500):
        client = case % 2 == 0
        data = b"".join(random_frame(rng, client) for _ in range(rng.randrange(1, 12)))
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 6)))) if len(data) > 1 \
            else []
        assert drive(PyWalker, client, data, cuts) == drive(CWalker, client, data, cuts), (case, data[:80], cuts)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_skipped_upstream_message_is_never_a_possible_terminal_event(impl):
    rng = random.Random(1)
    skipped = 0
    for _ in range(4000):
        payload = random_json(rng)
        buf = bytearray(frame(0x1, payload))
        pos, event = up(impl).walk(buf, 0, len(buf))
        if event == NEED_MORE:
            skipped += 1
            assert not usage.may_be_ledger_event(payload[:sniff.SNIFF_UPSTREAM_BYTES]), payload
    assert skipped > 500  # the rule does skip the common case


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_skipped_client_message_is_never_a_request(impl):
    rng = random.Random(2)
    skipped = 0
    for _ in range(4000):
        payload = random_json(rng) + b"x" * rng.choice((0, 0, 300))
        fin = rng.random() < 0.8
        data = frame(0x1, payload, fin=fin, mask=MASK)
        buf = bytearray(data)
        pos, event = down(impl).walk(buf, 0, len(buf))
        if event == NEED_MORE:
            skipped += 1
            wanted = min(len(payload), sniff.SNIFF_CLIENT_BYTES)
            start = len(data) - len(payload)
            assert sniff.sniff_create(MASK, data[start:start + wanted], wanted,
                                      len(payload) > wanted or not fin) is None, payload
    assert skipped > 500


def test_walk_checks_its_bounds():
    if CWalker is None:
        pytest.fail("wsrelay._speedups was not built")
    with pytest.raises(ValueError):
        up(CWalker).walk(bytearray(4), 0, 5)
    with pytest.raises(TypeError):
        up(CWalker).walk("text", 0, 1)


def test_the_relay_uses_the_fast_walker_unless_told_not_to():
    disabled = os.environ.get("WSRELAY_NO_SPEEDUPS", "") not in ("", "0")
    assert walk.Walker is (PyWalker if disabled or CWalker is None else CWalker)
