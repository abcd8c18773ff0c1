"""The upstream HTTP client against a scripted raw-socket server: streaming reads, keep-alive, failures."""

import socket

import gevent
import pytest
from gevent.server import StreamServer

from wsrelay.httpclient import HTTPUpstreamError, UpstreamHTTP

pytestmark = pytest.mark.timeout(20)


class Scripted:
    """A server whose connections each run ``script(sock, head)`` for every request head read."""

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.url = "http://127.0.0.1:%d/v1" % self.server.server_port
        self.heads = []

    def handle(self, sock, _):
        self.connections += 1
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            self.heads.append(head)
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
                b"content-length:")]
            while length and len(buf) < length[0]:
                buf += sock.recv(65536)
            buf = buf[length[0]:] if length else buf
            if self.script(sock, head) is False:
                sock.close()
                return


@pytest.fixture
def scripted_server():
    made = []

    def make(script):
        made.append(Scripted(script))
        return made[-1]

    yield make
    for server in made:
        server.server.stop()


def ok(sock, head):
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def client(server, **options):
    settings = dict(connect_timeout=1.0, read_timeout=2.0, max_connections=4)
    settings.update(options)
    return UpstreamHTTP(server.url, **settings)


def test_read_some_returns_what_has_arrived_without_waiting_for_a_block(scripted_server):
    release = gevent.event.Event()

    def stream(sock, head):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        release.wait(5)
        sock.sendall(b"6\r\nsecond\r\n0\r\n\r\n")

    upstream = client(scripted_server(stream))
    response = upstream.request("POST", "/responses", [("content-type", "application/json")], b"{}")
    assert response.status == 200
    assert response.read_some() == b"first"  # the second chunk has not been sent yet
    release.set()
    assert response.read_some() == b"second"
    assert response.read_some() == b""
    response.close()


def test_the_request_goes_below_the_base_path_with_host_and_length(scripted_server):
    server = scripted_server(ok)
    upstream = client(server)
    upstream.request("POST", "/responses?x=1", [("x-a", "1")], b"body").close()
    lines = server.heads[0].decode().split("\r\n")
    assert lines[0] == "POST /v1/responses?x=1 HTTP/1.1"
    assert "Host: 127.0.0.1:%d" % server.server.server_port in lines
    assert "Content-Length: 4" in lines and "x-a: 1" in lines


def test_a_streamed_body_without_a_length_goes_chunked(scripted_server):
    server = scripted_server(ok)
    upstream = client(server)
    upstream.request("POST", "/x", [], iter([b"ab", b"", b"cd"]), None).close()
    assert b"Transfer-Encoding: chunked" in server.heads[0]


def test_connections_are_reused_and_a_stale_one_is_replaced(scripted_server):
    served = []

    def once_then_close(sock, head):
        ok(sock, head)
        served.append(1)
        return len(served) != 1  # the first connection is closed after its response, without notice

    server = scripted_server(once_then_close)
    upstream = client(server)
    for _ in range(4):
        response = upstream.request("GET", "/models", [])
        assert response.read_some() == b"ok"
        response.close()
    assert server.connections == 2


def test_an_unread_body_closes_its_connection_instead_of_returning_it(scripted_server):
    def big(sock, head):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)

    server = scripted_server(big)
    upstream = client(server)
    for _ in range(2):
        response = upstream.request("GET", "/big", [])
        response.read_some()
        response.close()
    assert server.connections == 2


def test_an_upstream_that_breaks_off_mid_body_is_a_502(scripted_server):
    def cut(sock, head):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        return False

    upstream = client(scripted_server(cut))
    response = upstream.request("GET", "/x", [])
    assert response.read_some() == b"partial"
    with pytest.raises(HTTPUpstreamError) as failure:
        response.read_some()
    assert (failure.value.status, failure.value.code) == (502, "upstream_lost")
    response.close()
    assert upstream.pool._semaphore.counter == 4  # the broken connection's slot is free again


def test_silence_past_the_read_timeout_is_a_socket_timeout_then_504_for_the_head(scripted_server):
    def silent(sock, head):
        gevent.sleep(2)

    upstream = client(scripted_server(silent), read_timeout=0.2)
    with pytest.raises(HTTPUpstreamError) as failure:
        upstream.request("GET", "/x", [])
    assert (failure.value.status, failure.value.code) == (504, "upstream_timeout")


def test_a_timeout_mid_body_leaves_the_response_readable(scripted_server):
    def slow(sock, head):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        gevent.sleep(0.4)
        sock.sendall(b"cd")

    upstream = client(scripted_server(slow))
    response = upstream.request("GET", "/x", [])
    assert response.read_some() == b"ab"
    with pytest.raises(socket.timeout):
        response.read_some(0.05)
    assert response.read_some() == b"cd"
    response.close()


def test_nothing_listening_is_a_502_and_a_full_pool_a_503(scripted_server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    upstream = UpstreamHTTP("http://127.0.0.1:%d/v1" % port, 1.0, 1.0, 2)
    with pytest.raises(HTTPUpstreamError) as failure:
        upstream.request("GET", "/x", [])
    assert (failure.value.status, failure.value.code) == (502, "upstream_unreachable")

    def hold(sock, head):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")

    busy = client(scripted_server(hold), connect_timeout=0.2, max_connections=1)
    held = busy.request("GET", "/x", [])
    with pytest.raises(HTTPUpstreamError) as failure:
        busy.request("GET", "/y", [])
    assert (failure.value.status, failure.value.code) == (503, "upstream_busy")
    held.close()


def test_a_header_value_with_a_line_break_is_refused_before_sending(scripted_server):
    server = scripted_server(ok)
    with pytest.raises(HTTPUpstreamError) as failure:
        client(server).request("GET", "/x", [("x-a", "1\r\nx-b: 2")])
    assert failure.value.status == 400 and server.heads == []


def test_a_body_delimited_by_the_close_of_the_connection_ends_cleanly(scripted_server):
    def close_delimited(sock, head):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: 1\n\n")
        return False

    upstream = client(scripted_server(close_delimited))
    response = upstream.request("GET", "/x", [])
    assert response.read_some() == b"data: 1\n\n"
    assert response.read_some() == b""
    response.close()
    assert upstream.pool._semaphore.counter == 4
