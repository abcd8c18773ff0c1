"""The keepalive round itself, against a stand-in writer: in the hub when the Ping cannot block, else in a
greenlet; the Pong awaited by a timer either way.  The downstream writer's own rules over a socket pair."""

import socket
import time

import gevent
import gevent.event
import pytest

from wsrelay import config, frames, keepalive
from wsrelay import writer as writer_mod
from wsrelay.writer import DownstreamWriter


class StandIn:
    """A writer and a session as Keepalive documents them, recording what the keepalive asks for."""

    def __init__(self, writable=True):
        self.first_business_write = gevent.event.Event()
        self.last_write = time.monotonic()
        self.pong_event = gevent.event.Event()
        self.expected_pong = None
        self.wrote_business = True
        self.writable = writable
        self.hub_pings = []
        self.greenlet_pings = []
        self.traces = []
        self.failures = []

    def try_ping(self, payload):
        if not self.writable:
            return None
        assert gevent.getcurrent() is gevent.get_hub()  # the fast path runs in the hub, never blocks
        self.hub_pings.append(payload)
        self.last_write = time.monotonic()
        return self.last_write

    def ping(self, payload, interval):
        self.greenlet_pings.append(payload)
        self.last_write = time.monotonic()
        return self.last_write

    def expect_pong(self, payload):
        self.pong_event.clear()
        self.expected_pong = payload

    def trace(self, stage, **fields):
        self.traces.append(stage)

    def failed(self, error):
        self.failures.append(error)

    def answer(self):
        if self.expected_pong is not None:
            self.expected_pong = None
            self.pong_event.set()


def keepalive_for(stand_in, interval, timeout):
    return keepalive.Keepalive(stand_in, stand_in.expect_pong, stand_in.pong_event, interval, timeout,
                               stand_in.trace, stand_in.failed)


def run_rounds(session, rounds, interval=0.05, timeout=0.5, answer=True):
    ka = keepalive_for(session, interval, timeout)
    ka.start()
    session.first_business_write.set()
    try:
        with gevent.Timeout(5):
            while len(session.traces) + len(session.failures) < rounds:
                gevent.sleep(0.01)
                if answer:
                    session.answer()
    finally:
        ka.stop()
    return ka


def test_round_runs_in_the_hub_when_the_ping_cannot_block():
    session = StandIn()
    run_rounds(session, 3)
    assert len(session.hub_pings) >= 3 and session.greenlet_pings == []
    assert session.traces[:3] == [keepalive.STAGE_OK] * 3 and session.failures == []


def test_round_falls_back_to_a_greenlet_when_the_ping_would_block():
    session = StandIn(writable=False)
    run_rounds(session, 2)
    assert session.hub_pings == [] and len(session.greenlet_pings) >= 2
    assert session.traces[:2] == [keepalive.STAGE_OK] * 2


@pytest.mark.parametrize("writable", [True, False])
def test_missing_pong_fails_the_keepalive_after_the_timeout(writable):
    session = StandIn(writable=writable)
    started = time.monotonic()
    run_rounds(session, 1, interval=0.05, timeout=0.2, answer=False)
    assert session.failures == ["no pong within 0.2s"] and session.traces == []
    assert 0.2 <= time.monotonic() - started < 1.5


def test_stop_during_the_pong_wait_reports_nothing():
    session = StandIn()
    ka = keepalive_for(session, 0.05, 0.2)
    ka.start()
    session.first_business_write.set()
    with gevent.Timeout(5):
        while not session.hub_pings:
            gevent.sleep(0.01)
    ka.stop()
    session.answer()
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.3):  # past the Pong timeout: a stopped keepalive neither traces nor fails
            while not (session.traces or session.failures):
                gevent.sleep(0.01)


def writer_over_socketpair(failures=None):
    down, client = socket.socketpair()
    on_failure = (lambda what, exc: failures.append((what, exc))) if failures is not None else None
    return DownstreamWriter(down, 1.0, on_failure), client


def test_try_ping_writes_a_whole_ping_frame_from_the_hub():
    writer, client = writer_over_socketpair()
    result = []
    gevent.get_hub().loop.run_callback(lambda: result.append(writer.try_ping(b"p1")))
    gevent.sleep(0)
    assert result and result[0] is not None
    assert client.recv(64) == frames.build_frame(frames.OP_PING, b"p1")
    assert not writer._lock.locked()


def test_try_ping_declines_mid_frame_and_on_a_full_buffer():
    writer, client = writer_over_socketpair()
    assert writer.forward(b"\x82\x7e\x01\x00" + b"x" * 10, True, True)  # a forwarded frame is half written
    assert writer.try_ping(b"p") is None
    assert writer.control(frames.build_close(1000)) is False  # nor a close inside the frame
    assert writer.forward(b"x" * 246, False, False)
    writer.sock.setblocking(False)
    try:
        while True:
            writer.sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert writer.try_ping(b"p") is None
    assert not writer._lock.locked()


def test_try_ping_leaves_tls_clients_to_the_greenlet_path():
    import ssl
    down, client = socket.socketpair()
    tls = ssl.create_default_context().wrap_socket(down, server_hostname="client", do_handshake_on_connect=False)
    writer = DownstreamWriter(tls, 1.0, None)
    # A TLS write that would block must be retried with the same bytes: never attempted from the hub.
    assert writer.try_ping(b"p") is None
    assert not writer._lock.locked()


def test_every_failed_write_is_reported_once_through_on_failure():
    failures = []
    writer, client = writer_over_socketpair(failures)
    client.close()
    with gevent.Timeout(5):
        while writer.forward(b"x" * 65536, False, True):
            pass
    assert [what for what, _ in failures] == [writer_mod.FORWARD] and not writer.open
    assert writer.forward(b"more", False, True) is False and len(failures) == 1  # closed: no second report


@pytest.mark.parametrize("mode, interval, originator, user_agent, choice", [
    ("auto", 30, "codex_exec", None, (True, "codex_originator")),
    ("auto", 30, "codex_cli_rs", "codex_cli_rs/0.169.0 (Debian 12; x86_64) xterm", (True, "codex_originator")),
    ("auto", 30, None, "codex_exec/0.169.0 (Debian 12; x86_64) unknown", (True, "codex_user_agent")),
    ("auto", 30, " Codex_VSCode", None, (True, "codex_originator")),
    ("auto", 30, None, "OpenAI/Python 2.9.0", (False, "not_codex")),
    ("auto", 30, None, "my-codex-wrapper/1.0", (False, "not_codex")),
    ("auto", 30, None, None, (False, "not_codex")),
    ("always", 30, None, "OpenAI/Python 2.9.0", (True, "mode_always")),
    ("never", 30, "codex_exec", "codex_exec/0.169.0", (False, "mode_never")),
    ("always", 0, "codex_exec", None, (False, "interval_off")),
])
def test_app_keepalive_goes_to_the_clients_the_mode_selects(mode, interval, originator, user_agent, choice):
    assert keepalive.app_keepalive_choice(mode, interval, originator, user_agent) == choice


def test_by_default_codex_clients_get_the_app_keepalive_every_30_seconds():
    ws = config.load().gateway.openai_ws
    assert (ws.passthrough_downstream_app_keepalive_mode,
            ws.passthrough_downstream_app_keepalive_interval_seconds) == ("auto", 30.0)
    with pytest.raises(config.ConfigError, match="must be one of auto, always, never"):
        config.load(None, {"gateway.openai_ws.passthrough_downstream_app_keepalive_mode": "sometimes"})
