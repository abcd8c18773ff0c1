"""SseReader and the events the relay writes: the event-stream rules, fed bytes in every split."""

import json
import random

from wsrelay.sse import APP_KEEPALIVE_EVENT, KEEPALIVE_COMMENT, SseEvent, SseReader, encode_event

COMPLETED = {"type": "response.completed", "response": {"id": "resp_1", "usage": {"input_tokens": 3}}}


def read_all(data, cuts=(), **kw):
    reader = SseReader(**kw)
    events = []
    for start, end in zip([0] + list(cuts), list(cuts) + [len(data)]):
        events += reader.feed(data[start:end])
    return events, reader


def test_an_encoded_responses_event_reads_back_as_itself():
    [event], _ = read_all(encode_event(COMPLETED))
    assert event.event == "response.completed" and json.loads(event.data) == COMPLETED


def test_events_come_out_whole_whatever_the_splits_and_line_endings():
    stream = (b"event: response.created\r\ndata: {\"a\":1}\r\n\r\n"
              b": keepalive\n\n"
              b"event: response.output_text.delta\rdata: {\"b\"\rdata: :2}\r\r"
              b"data:no-space\n\n")
    expected = [SseEvent("response.created", b'{"a":1}', ""),
                SseEvent("response.output_text.delta", b'{"b"\n:2}', ""),
                SseEvent("message", b"no-space", "")]
    rng = random.Random(5)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(0, 8)))
        events, reader = read_all(stream, cuts)
        assert events == expected, cuts
        assert reader.comments == 1


def test_a_crlf_split_between_reads_ends_one_line_not_two():
    events, _ = read_all(b"data: x\r\n\r\n", cuts=[7, 8, 9])
    assert events == [SseEvent("message", b"x", "")]


def test_comments_keepalives_and_events_without_data_dispatch_nothing():
    events, reader = read_all(KEEPALIVE_COMMENT * 3 + b"event: lonely\n\n" + b"id: 7\n\n")
    assert events == [] and reader.comments == 3


def test_the_app_keepalive_is_an_event_of_its_own_type():
    [event], _ = read_all(APP_KEEPALIVE_EVENT)
    assert event.event == "keepalive" and json.loads(event.data) == {"type": "keepalive"}


def test_an_event_past_the_limit_is_dispatched_without_its_data_and_the_next_is_whole():
    big = b"data: " + b"x" * 5000 + b"\n\n"
    events, _ = read_all(big + encode_event(COMPLETED), cuts=[100, 3000], max_event_bytes=1024)
    assert events[0] == SseEvent("message", None, "")
    assert json.loads(events[1].data) == COMPLETED


def test_a_long_comment_does_not_cost_the_next_event_its_data():
    events, reader = read_all(b":" + b"c" * 5000 + b"\n" + encode_event(COMPLETED), max_event_bytes=1024)
    assert json.loads(events[0].data) == COMPLETED and reader.comments == 1


def test_at_boundary_only_between_events():
    reader = SseReader()
    assert reader.at_boundary
    reader.feed(b"event: response.created\n")
    assert not reader.at_boundary  # a field of the next event was read
    reader.feed(b"data: {}\n")
    assert not reader.at_boundary
    reader.feed(b"\n")
    assert reader.at_boundary
    reader.feed(b"data: {\"a\"")
    assert not reader.at_boundary  # inside a line
    reader.feed(b"}\n\n: comment\n")
    assert reader.at_boundary
