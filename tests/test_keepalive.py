"""The keepalive round itself, against a stand-in session: in the hub when the Ping cannot block, else in a
greenlet; the Pong awaited by a timer either way."""

import socket
import time

import gevent
import gevent.event
import pytest

from wsrelay import frames, keepalive
from wsrelay import config
from wsrelay.splice import Splice
from wsrelay.trace import NullTracer


class StandIn:
    """The session interface Keepalive documents, recording what it is asked to do."""

    def __init__(self, writable=True):
        self.first_business_write = gevent.event.Event()
        self.last_downstream_write = time.monotonic()
        self.pong_event = gevent.event.Event()
        self.expected_pong = None
        self.wrote_downstream = True
        self.writable = writable
        self.hub_pings = []
        self.greenlet_pings = []
        self.traces = []
        self.failures = []

    def try_send_ping(self, payload):
        if not self.writable:
            return None
        assert gevent.getcurrent() is gevent.get_hub()  # the fast path runs in the hub, never blocks
        self.hub_pings.append(payload)
        self.last_downstream_write = time.monotonic()
        return self.last_downstream_write

    def send_ping(self, payload, interval):
        self.greenlet_pings.append(payload)
        self.last_downstream_write = time.monotonic()
        return self.last_downstream_write

    def trace(self, stage, **fields):
        self.traces.append(stage)

    def keepalive_failed(self, error):
        self.failures.append(error)

    def answer(self):
        if self.expected_pong is not None:
            self.expected_pong = None
            self.pong_event.set()


def run_rounds(session, rounds, interval=0.05, timeout=0.5, answer=True):
    ka = keepalive.Keepalive(session, interval, timeout)
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
    ka = keepalive.Keepalive(session, 0.05, 0.2)
    ka.start()
    session.first_business_write.set()
    with gevent.Timeout(5):
        while not session.hub_pings:
            gevent.sleep(0.01)
    ka.stop()
    session.answer()
    gevent.sleep(0.3)
    assert session.traces == [] and session.failures == []


def splice_over_socketpair():
    down, client = socket.socketpair()
    up, upstream_end = socket.socketpair()
    splice = Splice(down, up, config.load(), NullTracer())
    return splice, client, (down, up, upstream_end)


def test_try_send_ping_writes_a_whole_ping_frame_from_the_hub():
    splice, client, others = splice_over_socketpair()
    result = []
    gevent.get_hub().loop.run_callback(lambda: result.append(splice.try_send_ping(b"p1")))
    gevent.sleep(0)
    assert result and result[0] is not None
    assert client.recv(64) == frames.build_frame(frames.OP_PING, b"p1")
    assert not splice._down_lock.locked()


def test_try_send_ping_declines_mid_frame_and_on_a_full_buffer():
    splice, client, others = splice_over_socketpair()
    with splice._down_lock:  # a forwarded frame is half written
        assert splice.try_send_ping(b"p") is None
    splice.down_sock.setblocking(False)
    try:
        while True:
            splice.down_sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert splice.try_send_ping(b"p") is None
    assert not splice._down_lock.locked()


def test_try_send_ping_leaves_tls_clients_to_the_greenlet_path():
    import ssl
    down, client = socket.socketpair()
    tls = ssl.create_default_context().wrap_socket(down, server_hostname="client", do_handshake_on_connect=False)
    up, upstream_end = socket.socketpair()
    splice = Splice(tls, up, config.load(), NullTracer())
    # A TLS write that would block must be retried with the same bytes: never attempted from the hub.
    assert splice.try_send_ping(b"p") is None
    assert not splice._down_lock.locked()


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
    cfg = config.load()
    ws = "gateway.openai_ws.passthrough_downstream_app_keepalive_"
    assert (cfg[ws + "mode"], cfg[ws + "interval_seconds"]) == ("auto", 30.0)
    with pytest.raises(config.ConfigError, match="must be one of auto, always, never"):
        config.load(None, {ws + "mode": "sometimes"})
