"""Reading whole client requests where turn resume needs them: the held request, the retry's first message."""

import json

from wsrelay.frames import OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, build_frame
from wsrelay.sniff import NEED_MORE, create_request, first_message, frames_end, text_messages

CREATE = json.dumps({"type": "response.create", "model": "m", "input": [{"id": "msg_1"}]}).encode()


def masked(opcode, payload, fin=True):
    return build_frame(opcode, payload, fin=fin, mask=True)


def test_the_first_message_is_read_whole_even_when_fragmented_and_split_across_reads():
    first = masked(OP_TEXT, CREATE[:10], fin=False) + masked(OP_CONTINUATION, CREATE[10:])
    after = masked(OP_TEXT, b"{}")
    for cut in range(len(first)):
        assert first_message(first[:cut], 1 << 20) is NEED_MORE
    payload, end = first_message(first + after, 1 << 20)
    assert payload == CREATE and end == len(first)
    assert create_request(payload)["input"] == [{"id": "msg_1"}]


def test_a_first_message_that_is_not_a_plain_text_request_is_not_read():
    assert first_message(masked(OP_PING, b"x") + masked(OP_TEXT, CREATE), 1 << 20) is None
    assert first_message(masked(OP_BINARY, CREATE), 1 << 20) is None
    assert first_message(build_frame(OP_TEXT, CREATE), 1 << 20) is None  # unmasked: not a client's
    assert first_message(masked(OP_TEXT, CREATE), len(CREATE) - 1) is None  # over the read limit
    assert create_request(b'{"type": "response.cancel"}') is None and create_request(b"[1]") is None


def test_the_held_request_is_found_among_the_client_frames_kept_for_the_turn():
    kept = masked(OP_PONG, b"p") + masked(OP_TEXT, CREATE[:5], fin=False) + masked(OP_PING, b"")
    kept += masked(OP_CONTINUATION, CREATE[5:])
    partial = masked(OP_TEXT, b'{"type": "response.cancel"}')[:4]
    assert text_messages(kept + partial) == [CREATE]
    assert frames_end(kept + partial) == len(kept)
    assert text_messages(masked(OP_BINARY, b"x") + masked(OP_TEXT, b"{}")) == [b"{}"]
