"""The app keepalive (a text frame), against a client whose idle watchdog ignores Pings (as Codex's does); by
default only clients that identify as Codex get it."""

import json
import time

import pytest

from tests.helpers import (APP_KEEPALIVE_INTERVAL, APP_KEEPALIVE_MODE, CREATE, INTERVAL, PING_TIMEOUT, connect,
                           stays_false)
from wsrelay.frames import OP_PING, OP_PONG, OP_TEXT

pytestmark = pytest.mark.timeout(30)

WATCHDOG = 1.0   # the client gives up after this long without a text frame
SILENCE = 3.0    # the turn's silence before its terminal event: three watchdog periods
# The handshake headers Codex 0.169.0 identifies itself with, and the openai Python SDK's.
CODEX_EXEC = [("originator", "codex_exec"), ("User-Agent", "codex_exec/0.169.0 (Debian 12; x86_64) unknown")]
CODEX_TUI = [("User-Agent", "codex_cli_rs/0.169.0 (Mac OS 15.5.0; arm64) iTerm.app/3.5.14")]
OPENAI_SDK = [("User-Agent", "OpenAI/Python 2.9.0")]
FAST_KEEPALIVE = {APP_KEEPALIVE_INTERVAL: 0.4, INTERVAL: 0.3, PING_TIMEOUT: 0.2}


def codex_like_turn(client):
    """Send a request; read as Codex does: Pings are answered but do not reset the watchdog.

    Returns ("completed" | "watchdog", keepalive events seen)."""
    client.send(OP_TEXT, CREATE)
    keepalives = 0
    last_text = time.monotonic()
    while True:
        left = WATCHDOG - (time.monotonic() - last_text)
        if left <= 0:
            return "watchdog", keepalives
        client.sock.settimeout(left)
        try:
            fin, opcode, payload = client.read_frame()
        except OSError:
            return "watchdog", keepalives
        if opcode == OP_PING:
            client.send(OP_PONG, payload)
            continue
        if opcode != OP_TEXT:
            continue
        last_text = time.monotonic()
        event = json.loads(payload)
        if event["type"] == "keepalive":
            keepalives += 1
        elif event["type"] == "response.completed":
            return "completed", keepalives


@pytest.mark.parametrize("headers, why", [(CODEX_EXEC, "codex_originator"), (CODEX_TUI, "codex_user_agent")])
def test_by_default_a_codex_client_is_carried_through_a_long_silent_turn(fake, relay, tracer, store, headers, why):
    _, url = fake(silence=SILENCE)
    client = connect(relay(url, **FAST_KEEPALIVE), headers=headers)
    outcome, keepalives = codex_like_turn(client)
    assert outcome == "completed"
    assert keepalives >= SILENCE / 0.4 - 2
    assert len(tracer.find("downstream_app_keepalive")) == keepalives
    assert store.wait(1)[0]["terminal_event"] == "response.completed"
    [start] = tracer.find("relay_start")  # the choice, traced once per session
    assert (start["app_keepalive"], start["app_keepalive_why"]) == (True, why)


def test_by_default_a_client_that_is_not_codex_gets_no_unknown_event(fake, relay, tracer):
    _, url = fake(silence=SILENCE)
    client = connect(relay(url, **FAST_KEEPALIVE), headers=OPENAI_SDK)
    outcome, keepalives = codex_like_turn(client)
    assert (outcome, keepalives) == ("watchdog", 0)
    assert tracer.find("downstream_ping_ok"), "Pings went out, and did not help a text-only watchdog"
    assert tracer.find("downstream_app_keepalive") == []
    [start] = tracer.find("relay_start")
    assert (start["app_keepalive"], start["app_keepalive_why"]) == (False, "not_codex")


def test_mode_always_keeps_any_client_alive_and_mode_never_not_even_codex(fake, relay, tracer):
    _, url = fake(silence=SILENCE)
    client = connect(relay(url, **dict(FAST_KEEPALIVE, **{APP_KEEPALIVE_MODE: "always"})), headers=OPENAI_SDK)
    assert codex_like_turn(client)[0] == "completed"
    _, url = fake(silence=SILENCE)
    client = connect(relay(url, **dict(FAST_KEEPALIVE, **{APP_KEEPALIVE_MODE: "never"})), headers=CODEX_EXEC)
    assert codex_like_turn(client) == ("watchdog", 0)
    assert [(s["app_keepalive"], s["app_keepalive_why"]) for s in tracer.find("relay_start")] == \
        [(True, "mode_always"), (False, "mode_never")]


def test_text_keepalive_is_never_sent_outside_a_turn_or_before_the_first_write(scripted, relay, tracer):
    upstream, url = scripted()
    client = connect(relay(url, **{APP_KEEPALIVE_INTERVAL: 0.1}), headers=CODEX_EXEC)
    up = upstream.next()
    client.send(OP_TEXT, CREATE)
    up.read_message()
    # A turn is in flight but nothing was written downstream yet: no keepalive.
    assert stays_false(lambda: tracer.find("downstream_app_keepalive"), 0.35)
    up.send_json({"type": "response.created", "response": {"id": "r1"}})
    up.send_json({"type": "response.completed", "response": {"id": "r1"}})
    client.sock.settimeout(5)
    assert json.loads(client.read_frame()[2])["type"] == "response.created"
    assert json.loads(client.read_frame()[2])["type"] == "response.completed"
    client.sock.settimeout(0.4)  # between turns: no keepalive may come
    with pytest.raises(OSError):
        client.read_frame()
    assert tracer.find("downstream_app_keepalive") == []
    up.done.set()


def test_text_keepalive_waits_for_the_end_of_a_fragmented_message(scripted, relay, tracer):
    upstream, url = scripted()
    client = connect(relay(url, **{APP_KEEPALIVE_INTERVAL: 0.1}), headers=CODEX_EXEC)
    up = upstream.next()
    client.send(OP_TEXT, CREATE)
    up.read_message()
    up.send(OP_TEXT, b'{"type":"response.output_text.delta","delta":"', fin=False)
    # Silent mid-message for four intervals: a keepalive now would corrupt the message.
    assert stays_false(lambda: tracer.find("downstream_app_keepalive"), 0.4)
    up.send(0, b'x"}', fin=True)
    client.sock.settimeout(5)
    frames_seen = [client.read_frame() for _ in range(3)]
    assert [(f[0], f[1]) for f in frames_seen[:2]] == [(False, OP_TEXT), (True, 0)]
    assert frames_seen[2][2] == b'{"type":"keepalive"}'
    up.done.set()
