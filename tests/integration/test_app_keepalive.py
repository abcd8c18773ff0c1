"""The opt-in text-frame keepalive, against a client whose idle watchdog ignores Pings (as Codex's does)."""

import json
import time

import gevent
import pytest

from tests.conftest import connect
from tests.peers import APP_KEEPALIVE_INTERVAL, CREATE, INTERVAL, PING_TIMEOUT
from wsrelay.frames import OP_PING, OP_PONG, OP_TEXT

pytestmark = pytest.mark.timeout(30)

WATCHDOG = 1.0   # the client gives up after this long without a text frame
SILENCE = 3.0    # the turn's silence before its terminal event: three watchdog periods


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


def test_text_keepalive_carries_a_ping_ignoring_client_through_a_long_silent_turn(fake, relay, tracer, store):
    _, url = fake(silence=SILENCE)
    client = connect(relay(url, **{APP_KEEPALIVE_INTERVAL: 0.4, INTERVAL: 0.3, PING_TIMEOUT: 0.2}))
    outcome, keepalives = codex_like_turn(client)
    assert outcome == "completed"
    assert keepalives >= SILENCE / 0.4 - 2
    assert len(tracer.find("downstream_app_keepalive")) == keepalives
    assert store.wait(1)[0]["terminal_event"] == "response.completed"


def test_without_text_keepalive_the_same_client_gives_up_despite_pings(fake, relay, tracer):
    _, url = fake(silence=SILENCE)
    client = connect(relay(url, **{INTERVAL: 0.3, PING_TIMEOUT: 0.2}))
    outcome, keepalives = codex_like_turn(client)
    assert (outcome, keepalives) == ("watchdog", 0)
    assert tracer.find("downstream_ping_ok"), "Pings went out, and did not help"


def test_text_keepalive_is_never_sent_outside_a_turn_or_before_the_first_write(scripted, relay, tracer):
    upstream, url = scripted()
    client = connect(relay(url, **{APP_KEEPALIVE_INTERVAL: 0.1}))
    up = upstream.next()
    client.send(OP_TEXT, CREATE)
    up.read_message()
    gevent.sleep(0.35)  # a turn is in flight but nothing was written downstream yet
    assert tracer.find("downstream_app_keepalive") == []
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
    client = connect(relay(url, **{APP_KEEPALIVE_INTERVAL: 0.1}))
    up = upstream.next()
    client.send(OP_TEXT, CREATE)
    up.read_message()
    up.send(OP_TEXT, b'{"type":"response.output_text.delta","delta":"', fin=False)
    gevent.sleep(0.4)  # silent mid-message: a keepalive now would corrupt the message
    up.send(0, b'x"}', fin=True)
    client.sock.settimeout(5)
    frames_seen = [client.read_frame() for _ in range(3)]
    assert [(f[0], f[1]) for f in frames_seen[:2]] == [(False, OP_TEXT), (True, 0)]
    assert frames_seen[2][2] == b'{"type":"keepalive"}'
    up.done.set()
