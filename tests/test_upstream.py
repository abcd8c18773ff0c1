"""The upstream handshake reader: the library's parse of the response head, without a recv call per byte."""

import random

import pytest
import websocket

from wsrelay import upstream


class Segments:
    """A socket whose ``recv`` hands out the given segments one per call, then EOF."""

    def __init__(self, segments):
        self.segments = list(segments)
        self.calls = 0

    def recv(self, bufsize):
        self.calls += 1
        if not self.segments:
            return b""
        head = self.segments[0]
        chunk, rest = head[:bufsize], head[bufsize:]
        if rest:
            self.segments[0] = rest
        else:
            self.segments.pop(0)
        return chunk

    def gettimeout(self):
        return 5.0


RESPONSES = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-Codex-Turn-State:  abc \r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 5\r\n\r\nslow!",
    b"HTTP/1.1 101\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nSET-COOKIE: c=3\r\n\r\n\x81\x02hi",
    b"HTTP/1.1 101 OK\nUpgrade: websocket\n\n",                       # bare LF line ends
    "HTTP/1.1 101 OK\r\nX-Name: caf\u00e9\r\n\r\n".encode("utf-8"),
    b"HTTP/1.1 101 OK\r\nx: a:b:c\r\n   \r\nafter",                   # a blank-looking line ends the head
]
BAD = [
    b"HTTP/1.1 abc Nope\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 101 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 101 OK\r\nX: \xff\xfe\r\n\r\n",
    b"HTTP/1.1 101 OK\r\nX: cut off",
]


def library(data):
    try:
        return upstream._library_read_headers(Segments([data]))
    except Exception as exc:
        return type(exc), str(exc)


def reader_result(segments):
    reader = upstream._HandshakeReader(Segments(segments))
    try:
        return reader.read_head(), reader
    except Exception as exc:
        return (type(exc), str(exc)), reader


@pytest.mark.parametrize("data", RESPONSES + BAD)
def test_head_is_parsed_exactly_as_websocket_client_does(data):
    rng = random.Random(len(data))
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, min(8, len(data) - 1))))
        segments = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        got, _ = reader_result(segments)
        assert got == library(data), segments


def test_head_takes_one_recv_per_segment_and_keeps_what_follows():
    data = RESPONSES[2]
    sock = Segments([data[:20], data[20:]])
    reader = upstream._HandshakeReader(sock)
    status, headers, _ = reader.read_head()
    assert status == 101 and headers["set-cookie"] == "a=1; b=2; c=3"
    assert sock.calls == 2
    assert reader.rest() == b"\x81\x02hi"


def test_refusal_body_is_served_to_the_library_from_the_buffer():
    reader = upstream._HandshakeReader(Segments([RESPONSES[1]]))
    status, headers, _ = reader.read_head()
    assert (status, headers["content-length"]) == (429, "5")
    assert reader.recv(16384) == b"slow!"


@pytest.mark.parametrize("endless", [[b"x" * 4096] * 40, [b"X-H: v\r\n" * 512] * 40],
                         ids=["one long line", "many short lines"])
def test_endless_head_is_refused(endless):
    reader = upstream._HandshakeReader(Segments([b"HTTP/1.1 101 OK\r\n"] + endless))
    with pytest.raises(websocket.WebSocketException, match="over 65536 bytes"):
        reader.read_head()


def test_websocket_client_handshake_goes_through_the_reader():
    assert websocket._handshake.read_headers is upstream._read_headers
