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


class LineReader(SseReader):
    """The reader with its whole-event path left out: every byte read line by line, the reference."""

    def feed(self, chunk):
        out = []
        if chunk:
            self._feed_lines(bytes(chunk), 0, len(chunk), out)
        return out


def random_stream(rng):
    """Events, comments, ids and blank-line runs in random forms; LF-only half the time, else mixed line ends."""
    ends = [b"\n"] if rng.random() < 0.5 else [b"\n", b"\n", b"\r\n", b"\r"]
    names = [b"response.created", b"response.output_text.delta", b"response.completed", b"x:y", b"caf\xc3\xa9",
             b"\xff"]
    lines = []
    for _ in range(rng.randrange(1, 12)):
        kind = rng.random()
        if kind < 0.1:
            lines.append(b": keepalive")
        elif kind < 0.15:
            lines += [b""] * rng.randrange(1, 4)
            continue
        else:
            if rng.random() < 0.7:
                lines.append(rng.choice([b"event: ", b"event:", b"event:  "]) + rng.choice(names))
            for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
                value = rng.choice([b"{\"a\":1}", b"", b" lead", b"a:b", b"x" * rng.randrange(1, 300)])
                lines.append(rng.choice([b"data: " + value, b"data:" + value, b"data" if not value else b"dat: a"]))
            if rng.random() < 0.2:
                lines.insert(rng.randrange(len(lines) + 1), rng.choice(
                    [b"id: 7", b"id:" + b"\0", b"id", b"retry: 10", b"other: x", b": note", b"event"]))
            if rng.random() < 0.05:
                lines.append(b"event: " + b"n" * 300)
        lines.append(b"")
    if rng.random() < 0.2:
        lines.pop()  # the stream stops inside an event
    return b"".join(line + rng.choice(ends) for line in lines)


def test_whole_events_are_read_exactly_as_line_by_line_in_any_stream_and_any_splits():
    rng = random.Random(20240611)
    for case in range(1000):
        stream = random_stream(rng)
        cuts = sorted(set(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 10)))))
        limit = rng.choice([64, 256, 1 << 20])
        wanted = rng.choice([None, {"response.completed", "message"}.__contains__])
        fast, plain = SseReader(limit, wanted=wanted), LineReader(limit)
        for start, end in zip([0] + cuts, cuts + [len(stream)]):
            got, expected = fast.feed(stream[start:end]), plain.feed(stream[start:end])
            if wanted is not None:
                expected = [event for event in expected if wanted(event.event)]
            state = (fast.events, fast.comments, fast.at_boundary)
            assert (got, state) == (expected, (plain.events, plain.comments, plain.at_boundary)), (case, stream, cuts)


def test_a_plain_stream_is_read_a_whole_event_at_a_time():
    reader = SseReader()
    reader._feed_lines = None  # never called
    stream = encode_event(COMPLETED) + b": keepalive\n\nid: 3\ndata: a\ndata: b\n\n" + KEEPALIVE_COMMENT
    compact = json.dumps(COMPLETED, separators=(",", ":")).encode()
    assert reader.feed(stream) == [SseEvent("response.completed", compact, ""),
                                   SseEvent("message", b"a\nb", "3")]
    assert (reader.events, reader.comments, reader.at_boundary) == (2, 2, True)
    assert reader.feed(b"data: x") == [] and not reader.at_boundary  # kept as it is
    assert reader.feed(b"\n\n") == [SseEvent("message", b"x", "3")] and reader.at_boundary


def test_events_the_caller_does_not_want_are_counted_not_returned():
    stream = encode_event({"type": "response.output_text.delta"}) + encode_event(COMPLETED) + b"data: {}\n\n"
    for cuts in ([], [5, 50, 51]):
        events, reader = read_all(stream, cuts, wanted={"response.completed"}.__contains__)
        assert [event.event for event in events] == ["response.completed"] and reader.events == 3
