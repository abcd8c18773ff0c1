"""Turn resume on the HTTP transport: a streamed turn whose client left mid-stream is held for the client's retry.

Codex retries a ``POST /v1/responses`` whose event stream broke before its terminal event: a new connection, the
same ``session-id``/``thread-id`` headers, the same ``turn_id`` (``client_metadata`` and the
``x-codex-turn-metadata`` header) and the same input.  Running it upstream again would bill the turn twice.

* **Recording.**  The event stream of a ``POST /v1/responses`` with a ``session-id`` or ``thread-id`` header is
  copied as it is relayed (the upstream's bytes from the first), up to ``resume.max_buffer_bytes``.
* **Holding.**  When the client leaves while the turn is in flight, the request has a ``turn_id`` and the copy
  fits in ``resume.max_total_bytes`` with everything else held, the turn is filed in ``app.resume`` for
  ``resume.window_seconds`` (``resume_held``); the exchange that read the upstream reads on into the hold.
* **Resuming.**  A ``POST`` with the same relay key, conversation and ``turn_id`` whose input ends with the held
  request's input (``resume_hit``) is not sent upstream: it gets the upstream's status and headers, the held
  bytes, then the rest as it arrives.  Anything else is a normal request (``resume_miss reason=``); the held turn
  stays.  A resumed client that leaves again has the turn held again, for a new window.
* **Expiry.**  At the window's end (at shutdown; when the conversation has a newer cut turn) the turn is
  released (``resume_expired``) and its memory given back; an upstream still streaming is drained from then on
  as without resume.

Billing: one record per response, written once.  While the turn is held or being resumed, the ledger's records
are parked with it, and written when its delivery is settled: a resumed client had the whole stream
(``resumed=true``, ``client_disconnected=false``); the turn expired or was released, or its upstream broke off
while held (``client_disconnected=true``; ``resumed=true`` if a retry had taken it).  Records that come after the
release are written as they come.  Shutdown releases every held turn first.

Here are the transport's entry points; the held response itself (its states, its records, the reading of its
upstream) is :class:`wsrelay.heldstream.HeldStream`.
"""

import time

from . import resume, usage
from .clientwatch import ClientGone, ClientWatch
from .heldstream import TRANSPORT, HeldStream, conversation, input_digests
from .sse import APP_KEEPALIVE_EVENT, KEEPALIVE_COMMENT

MISS_OTHER_TRANSPORT = "other_transport"  # the conversation's held turn was cut on the WebSocket transport
MISS_NOT_STREAMED = "not_streamed"  # the retry asks for a JSON Response object, the held turn is an event stream
STAGE_SSE_OK, STAGE_APP = "downstream_sse_keepalive_ok", "downstream_app_keepalive"  # as exchange.py's


def recorder(exchange, status_line, headers):
    """A :class:`HeldStream` recording the event stream ``exchange`` relays, or None when it could not be
    resumed (resume off, no conversation)."""
    if not exchange.config.resume.enabled or conversation(exchange) is None:
        return None
    return HeldStream(exchange, status_line, headers)


def take(exchange, body):
    """The held turn a ``POST /v1/responses`` (``body``: its bytes) is the retry of — removed from the registry,
    the caller replays it — or None (a normal request)."""
    registry = exchange.app.resume
    filed_under = conversation(exchange)
    held = registry.held.get(filed_under) if filed_under is not None else None
    if held is None:
        return None
    request = usage.parse_event(body) or {}
    if not isinstance(held.payload, HeldStream):
        turn, reason = None, MISS_OTHER_TRANSPORT
    elif request.get("stream") is not True:
        turn, reason = None, MISS_NOT_STREAMED
    else:
        shim = {"client_metadata": request.get("client_metadata"), "input": input_digests(request)}
        turn, reason = registry.match(filed_under, shim, exchange.environ.get("HTTP_X_CODEX_TURN_METADATA"),
                                      time.monotonic())
    if turn is None:
        exchange.trace("resume_miss", transport=TRANSPORT, reason=reason, key_id=exchange.key_id,
                       turn_id=resume.turn_id(request, exchange.environ.get("HTTP_X_CODEX_TURN_METADATA")))
        return None
    turn.payload.attach(exchange)
    return turn


def replay(exchange, turn):
    """Answer ``exchange`` with the held turn: the upstream's status and headers, the held bytes, then the rest of
    the stream as the exchange that holds the upstream reads it."""
    stream = turn.payload
    exchange.account = turn.account
    exchange.status = stream.status
    handler = exchange.handler
    if handler is not None:
        handler.stream_response(exchange.settings.write_timeout_seconds)
    exchange.write = exchange.start_response(stream.status_line, list(stream.headers))
    watch = ClientWatch(handler.socket, exchange._client_closed) if handler is not None else None
    delivered = False
    try:
        delivered = _follow(exchange, stream)
    finally:
        if watch is not None:
            watch.stop()
        stream.detach(exchange, delivered)
    if not delivered and exchange.client_open:  # the upstream broke off: the client's response is cut as well
        exchange.outcome = "upstream_lost"
        exchange._abandon()
    elif not exchange.client_open:
        exchange.outcome = "client_gone"


def _follow(exchange, stream):
    """Write the held stream to ``exchange``'s client as it grows; True once the client has had all of a stream
    that ended with its terminal event."""
    settings = exchange.settings
    sse_interval = settings.sse_keepalive_interval_seconds
    app_on, _ = exchange.transport.app_keepalive(exchange.environ)
    app_interval = exchange.config.gateway.openai_ws.passthrough_downstream_app_keepalive_interval_seconds
    app_interval = app_interval if app_on else 0
    sent = 0
    last_write = last_business = time.monotonic()
    while exchange.client_open:
        if sent < len(stream.data):
            chunk = bytes(stream.data[sent:])
            sent += len(chunk)
            if exchange._send(chunk):
                last_write = last_business = time.monotonic()
            continue
        if stream.ended:
            return stream.complete
        due = []  # keepalives: only between events, after the first one
        if stream.events and stream.at_boundary:
            if sse_interval:
                due.append(last_write + sse_interval)
            if app_interval:
                due.append(last_business + app_interval)
        stream.changed.clear()
        exchange.waiting = True
        try:
            changed = stream.changed.wait(max(min(due) - time.monotonic(), 0.001) if due else None)
        except ClientGone:
            continue
        finally:
            exchange.waiting = False
        if changed or len(stream.data) > sent or stream.ended:
            continue
        now = time.monotonic()
        if app_interval and now - last_business >= app_interval:
            if exchange._send(APP_KEEPALIVE_EVENT):
                last_write = last_business = now
                exchange.app_keepalives += 1
                exchange.trace(STAGE_APP, direction="downstream_keepalive", graceful=True, wrote_downstream=True)
        elif sse_interval and now - last_write >= sse_interval:
            if exchange._send(KEEPALIVE_COMMENT):
                last_write = now
                exchange.keepalives += 1
                exchange.trace(STAGE_SSE_OK, direction="downstream_keepalive", graceful=True, wrote_downstream=True)
    return False


def release_all(registry):
    """Release every turn held on this transport (the relay is stopping: no retry will be let in)."""
    for turn in list(registry.held.values()):
        if isinstance(turn.payload, HeldStream):
            turn.payload.expire()


