"""Client-side helpers for the relay's tests: setting names, the request a client sends, and readers for what the
relay sends back (events, close frames, the trace's first exit).

The fixtures (servers, the relay, a raw client's ``connect``) stay in ``tests/conftest.py``.
"""

import json
import time

import gevent

from wsrelay import frames
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

# -- settings, as keyword names for the ``relay`` fixture ---------------------------------------------------------

WS = "gateway__openai_ws__"
INTERVAL = WS + "passthrough_downstream_ping_interval_seconds"
PING_TIMEOUT = WS + "passthrough_downstream_ping_timeout_seconds"
APP_KEEPALIVE_INTERVAL = WS + "passthrough_downstream_app_keepalive_interval_seconds"
APP_KEEPALIVE_MODE = WS + "passthrough_downstream_app_keepalive_mode"
DRAIN_TIMEOUT = WS + "upstream_drain_timeout_seconds"
WRITE_TIMEOUT = WS + "write_timeout_seconds"
READ_LIMIT = WS + "client_read_limit_bytes"
FIRST_MESSAGE_TIMEOUT = WS + "client_first_message_timeout_seconds"

# -- what a client sends and what the fake upstream answers --------------------------------------------------------

CREATE = json.dumps({"type": "response.create", "model": "gpt-test", "input": []}).encode()
HEAD_EVENTS = 6  # response.created, response.in_progress, response.output_item.added, 3 deltas
FAKE_USAGE = {"input_tokens": 120, "output_tokens": 30, "total_tokens": 150, "cached_tokens": 20,
              "reasoning_tokens": 10}
MiB = 1024 * 1024


def port_of(url):
    return int(url[len("ws://"):].partition("/")[0].rpartition(":")[2])


def send_create(client, **fields):
    """Send a response.create with one user message; ``fields`` are set on the request."""
    request = {"type": "response.create", "model": "gpt-test", "input": [{"role": "user", "content": "hi"}]}
    request.update(fields)
    client.send(OP_TEXT, json.dumps(request).encode())


def tokens(record):
    """A usage record's token counts, to compare with :data:`FAKE_USAGE`."""
    return {name: record[name] for name in FAKE_USAGE}


# -- reading what the relay sends ----------------------------------------------------------------------------------

def read_events(client, count=None, until=None, timeout=5.0):
    """Read JSON events (answering Pings) until ``count`` were read or one of type ``until`` arrived."""
    events = []
    with gevent.Timeout(timeout, AssertionError("events so far: %s" % [e.get("type") for e in events])):
        while True:
            fin, opcode, payload = client.read_frame()
            if opcode == OP_PING:
                client.send(OP_PONG, payload)
                continue
            assert opcode == OP_TEXT and fin, (opcode, payload[:80])
            events.append(json.loads(payload))
            if count is not None and len(events) == count:
                return events
            if until is not None and events[-1]["type"] == until:
                return events


def read_close(peer, timeout=5.0, strict=False):
    """Read the peer's close frame; returns its ``(code, reason)``, ``(None, "")`` for an empty one.

    ``strict`` says what may come before it.  False: anything — Pings are answered, data frames skipped, and
    if the connection ends without a close frame the result is the string ``"eof"``.  True: nothing — the very
    next frame must be the close (any other frame fails the assertion, the end of the connection raises).
    """
    with gevent.Timeout(timeout, AssertionError("no close frame within %ss" % timeout)):
        if strict:
            fin, opcode, payload = peer.read_frame()
            assert opcode == OP_CLOSE, "expected a close frame, got opcode %#x payload %r" % (opcode, payload[:120])
            return frames.parse_close(payload)
        while True:
            try:
                fin, opcode, payload = peer.read_frame()
            except (ConnectionClosed, OSError):
                return "eof"
            if opcode == OP_CLOSE:
                return frames.parse_close(payload)
            if opcode == OP_PING:
                peer.send(OP_PONG, payload)


def read_until_marker(peer, marker, timeout=5.0):
    """Read (answering Pings) until a frame other than a Ping whose payload contains ``marker``; returns that
    payload."""
    with gevent.Timeout(timeout, AssertionError("no %r within %ss" % (marker, timeout))):
        while True:
            fin, opcode, payload = peer.read_frame()
            if opcode == OP_PING:
                peer.send(OP_PONG, payload)
            elif marker in payload:
                return payload


def read_frames_until(peer, predicate, timeout=5.0, answer_pings=True):
    """Read frames until ``predicate(opcode, payload)`` holds for one (Pings included, answered unless
    ``answer_pings`` is false); returns every frame seen, that one last, as ``(opcode, payload, arrival time)``."""
    seen = []
    with gevent.Timeout(timeout, AssertionError("predicate not met; saw %r" % [(o, p[:60]) for o, p, _ in seen])):
        while True:
            fin, opcode, payload = peer.read_frame()
            seen.append((opcode, payload, time.monotonic()))
            if opcode == OP_PING and answer_pings:
                peer.send(OP_PONG, payload)
            if predicate(opcode, payload):
                return seen


# -- the trace -----------------------------------------------------------------------------------------------------

def first_exit(tracer, timeout=5.0):
    """The fields of the session's ``first_exit`` trace line, once it is there."""
    return tracer.wait_for("first_exit", timeout=timeout)


def exit_fields(tracer):
    """``(side, cause, graceful, wrote_downstream)`` of the ``first_exit`` trace line."""
    fields = first_exit(tracer)
    return fields["side"], fields["cause"], fields["graceful"], fields["wrote_downstream"]
