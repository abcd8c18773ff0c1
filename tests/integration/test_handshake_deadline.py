"""The client's part of the handshake, bounded: the request-head deadline, the cap on connections still waiting
for their head, and the listener's back-off when ``accept()`` runs out of descriptors."""

import json
import os
import resource
import socket
import time

import gevent
import gevent.event
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (CREATE, connect, free_port, port_of, raw_request, read_response, read_until_marker,
                           stays_false, wait_until)
from wsrelay.frames import OP_TEXT
from wsrelay.trace import parse_line

pytestmark = pytest.mark.timeout(60)

DEADLINE = "server__handshake_timeout_seconds"
MAX_PENDING = "server__max_pending_handshakes"
HEAD_WITH_REQUEST_LINE = b"GET /v1/responses HTTP/1.1\r\nHost: x\r\n"  # and then nothing: no blank line
PART_OF_A_REQUEST_LINE = b"GET /v1/resp"


def open_raw(url, timeout=10):
    return socket.create_connection(("127.0.0.1", port_of(url)), timeout=timeout)


def wait_closed(sock, timeout):
    """Read until the relay closes the connection: ``(data, closed)``; ``closed`` is False if it was still open
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def parse_answer(data):
    """A whole raw HTTP response: ``(status, headers, body)``."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_json_error(status, headers, body, expected, code):
    """An OpenAI-shaped error answer: the status, ``{"error": {"message", "type", "code"}}`` and its length."""
    assert status == expected, (status, headers, body)
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body), headers
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and error["type"], error


def scrape(url):
    sock = open_raw(url)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, body = read_response(sock)
    sock.close()
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def complete_a_turn(url):
    client = connect(url)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    client.close(1000)


# -- the deadline --------------------------------------------------------------------------------------------


def test_300_half_sent_heads_are_closed_by_the_deadline_while_a_client_connecting_mid_attack_completes_a_turn(
        fake, relay, tracer, store):
    _, up_url = fake()
    url = relay(up_url, **{DEADLINE: 1})
    attackers, sent_all = 300, gevent.event.Event()
    outcomes = {}

    def attack(i):
        head = HEAD_WITH_REQUEST_LINE if i % 2 else PART_OF_A_REQUEST_LINE
        sock = open_raw(url)
        sock.sendall(head)
        sent = time.monotonic()
        outcomes[i] = None
        if len(outcomes) == attackers:
            sent_all.set()
        data, closed = wait_closed(sock, 1 + 2 + 1)
        outcomes[i] = (head, data, closed, time.monotonic() - sent)
        sock.close()

    greenlets = [gevent.spawn(attack, i) for i in range(attackers)]
    assert sent_all.wait(10), "the attack could not be set up"
    complete_a_turn(url)  # mid-attack: every attacker holds a connection with half a head
    assert store.wait(1)[0]["terminal_event"] == "response.completed"
    gevent.joinall(greenlets, raise_error=True)

    still_open = [i for i, (_, _, closed, _) in outcomes.items() if not closed]
    assert not still_open, "%d of %d half-sent heads still open after the deadline + 3 s" % (len(still_open),
                                                                                           attackers)
    for head, data, closed, elapsed in outcomes.values():
        assert 0.9 <= elapsed <= 1 + 2, elapsed
        if head == HEAD_WITH_REQUEST_LINE:
            status, headers, body = parse_answer(data)
            assert_json_error(status, headers, body, 408, "request_timeout")
            assert headers["connection"] == "close"
        else:
            assert data == b"", data  # no request to answer
    timeouts = tracer.find("handshake_timeout")
    assert len(timeouts) == attackers
    assert sorted(f["request_line"] for f in timeouts) == [False] * 150 + [True] * 150
    assert all(set(f) == {"client", "request_line", "served", "timeout_s"} for f in timeouts)
    samples = scrape(url)
    assert samples[("wsrelay_handshake_timeouts_total", (("request_line", "true"),))] == 150
    assert samples[("wsrelay_handshake_timeouts_total", (("request_line", "false"),))] == 150
    assert samples[("wsrelay_pending_handshakes", ())] == 0  # every path gave its count back


def test_connection_that_sends_nothing_is_closed_without_an_answer_after_the_deadline(fake, relay, tracer):
    _, up_url = fake()
    url = relay(up_url, **{DEADLINE: 0.5})
    sock = open_raw(url)
    started = time.monotonic()
    data, closed = wait_closed(sock, 3)
    elapsed = time.monotonic() - started
    assert closed and data == b"" and 0.4 <= elapsed < 2.5, (closed, data, elapsed)
    fields = tracer.wait_for("handshake_timeout")
    assert fields["request_line"] is False and fields["served"] == 0
    assert fields["client"] == "%s:%s" % sock.getsockname()[:2]


def test_kept_alive_connection_gets_the_deadline_again_for_its_next_request(fake, relay, tracer):
    _, up_url = fake()
    url = relay(up_url, **{DEADLINE: 0.5})
    idle, slow = open_raw(url), open_raw(url)
    for sock in (idle, slow):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 200 and "close" not in headers.get("connection", "")
    answered = time.monotonic()
    slow.sendall(HEAD_WITH_REQUEST_LINE)
    data, closed = wait_closed(slow, 3)
    assert closed and 0.4 <= time.monotonic() - answered < 2.5
    status, headers, body = parse_answer(data)
    assert_json_error(status, headers, body, 408, "request_timeout")
    data, closed = wait_closed(idle, 3)
    assert closed and data == b"" and 0.4 <= time.monotonic() - answered < 2.5
    # The half-sent second request is traced; the idle connection is the ordinary end of keep-alive, and is not.
    assert [(f["request_line"], f["served"]) for f in tracer.find("handshake_timeout")] == [(True, 1)]


def test_upstream_dial_slower_than_the_deadline_gets_its_own_504_not_a_408(relay, tracer):
    never_accepts = socket.socket()
    never_accepts.bind(("127.0.0.1", 0))
    never_accepts.listen(8)  # the kernel completes the TCP handshake; nobody ever answers the upgrade
    try:
        url = relay("ws://127.0.0.1:%d/v1/responses" % never_accepts.getsockname()[1],
                    upstream__connect_timeout_seconds=1.0, **{DEADLINE: 0.3})
        started = time.monotonic()
        sock, status, headers, body = raw_request(url)
        assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
        assert 0.9 <= time.monotonic() - started < 3
        assert tracer.find("handshake_timeout") == []
    finally:
        never_accepts.close()


# -- the cap on pending handshakes ---------------------------------------------------------------------------


def test_connection_past_the_pending_cap_gets_503_with_retry_after_and_clients_are_served_once_they_time_out(
        fake, relay, tracer, store):
    _, up_url = fake()
    url = relay(up_url, **{MAX_PENDING: 5, DEADLINE: 1.0})
    app = relay.apps[0]
    stalled = [open_raw(url) for _ in range(5)]
    wait_until(lambda: getattr(getattr(app, "handshake_guard", None), "pending", 0) == 5, 5,
               "the relay holds the 5 stalled connections")
    refused, status, headers, body = raw_request(url)
    assert_json_error(status, headers, body, 503, "too_many_pending_handshakes")
    assert headers["retry-after"] == "1"
    refusal = tracer.wait_for("handshake_refused")
    assert refusal["code"] == "too_many_pending_handshakes" and refusal["status"] == 503
    for sock in stalled:
        data, closed = wait_closed(sock, 1 + 2)
        assert closed and data == b""
    # A client served once they are gone keeps its session past the deadline: the deadline ended with its head.
    client = connect(url)
    witness = open_raw(url)  # stalled from the same moment: its close marks the deadline's passing
    assert wait_closed(witness, 3) == (b"", True)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    assert store.wait(1)[0]["terminal_event"] == "response.completed"
    assert app.handshake_guard.pending == 0


# -- accept() out of descriptors -----------------------------------------------------------------------------


def _cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _low_descriptor_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_accept_out_of_descriptors_pauses_with_one_trace_line_and_serves_again_once_they_are_free(
        fake, serve, tmp_path):
    _, up_url = fake()
    config = tmp_path / "wsrelay.yaml"
    config.write_text("usage: {sqlite_path: %s}\nserver: {handshake_timeout_seconds: 60}\n"
                      % json.dumps(str(tmp_path / "usage.db")))
    port = free_port()
    served = serve("--config", config, "--port", port, "--upstream", up_url, preexec_fn=_low_descriptor_limit)
    served.wait_listening(port)
    url = "ws://127.0.0.1:%d/v1/responses" % port
    held = [open_raw(url) for _ in range(100)]  # more than the relay's 64 descriptors

    def lines(stage):
        return [parse_line(line) for line in served.lines if "stage=%s " % stage in line]

    wait_until(lambda: lines("accept_failed"), 10, "an accept_failed trace line")
    cpu = _cpu_seconds(served.proc.pid)
    # A stretch of the burst: the relay must neither log again nor spin through it.
    assert stays_false(lambda: len(lines("accept_failed")) > 1, 2.0, interval=0.1), served.stderr()
    assert _cpu_seconds(served.proc.pid) - cpu < 0.5
    failed = lines("accept_failed")
    assert len(failed) == 1 and failed[0]["error"] == "EMFILE", served.stderr()
    assert "Traceback" not in served.stderr()

    for sock in held:
        sock.close()
    complete_a_turn(url)
    wait_until(lambda: lines("accept_recovered"), 5, "an accept_recovered trace line")
    assert int(lines("accept_recovered")[0]["failures"]) >= 1
    assert len(lines("accept_failed")) == 1 and "Traceback" not in served.stderr()
    assert scrape(url)[("wsrelay_accept_pauses_total", (("error", "EMFILE"),))] == 1
