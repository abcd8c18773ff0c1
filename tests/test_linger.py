"""CloseWatch: where the peer's Close starts in a stream the relay is discarding (bytes in, no sockets)."""

import random

from wsrelay import frames
from wsrelay.frames import OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT
from wsrelay.linger import CloseWatch

CLOSE = frames.build_close(1000, "bye", mask=True)


def stream(*parts):
    return b"".join(parts)


def test_a_close_after_data_frames_is_seen_whatever_the_read_sizes():
    data = stream(frames.build_frame(OP_BINARY, b"a" * 70000, mask=True),
                  frames.build_frame(OP_PING, b"p", mask=True),
                  frames.build_frame(OP_TEXT, b"b" * 300, fin=False, mask=True),
                  frames.build_frame(OP_CONTINUATION, b'"x"', mask=True), CLOSE)
    rng = random.Random(1009)
    for _ in range(200):
        watch = CloseWatch()
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 8)))
        seen_at = None
        for start, end in zip([0] + cuts, cuts + [len(data)]):
            if watch.feed(data[start:end]) and seen_at is None:
                seen_at = end
        assert seen_at == len(data), cuts  # the whole Close has been read, and not before


def test_data_that_only_mentions_a_close_is_not_a_close():
    payload = CLOSE * 10  # close frames inside a binary payload are payload
    watch = CloseWatch()
    assert not watch.feed(frames.build_frame(OP_BINARY, payload, mask=True))
    assert watch.feed(CLOSE)


def test_walking_starts_from_what_was_pending_and_the_payload_left_to_skip():
    refused = frames.build_frame(OP_BINARY, b"z" * 5000, mask=True)
    header_and_some = refused[:1000]
    watch = CloseWatch(header_and_some)  # the refused frame's header and a little payload were already read
    assert not watch.feed(refused[1000:])
    assert watch.feed(CLOSE)
    mid_payload = CloseWatch(skip=4000)  # a pump killed while 4000 payload bytes were still to come
    assert not mid_payload.feed(b"\x00" * 3999)
    assert mid_payload.feed(b"\x00" + CLOSE)


def test_a_pending_close_is_seen_at_once():
    assert CloseWatch(CLOSE).seen_close
