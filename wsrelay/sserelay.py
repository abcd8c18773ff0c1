"""The event stream of an HTTP exchange, relayed: as it arrives, read for the ledger, kept alive, drained.

After the first event, a client that has had no bytes for ``gateway.openai_http.sse_keepalive_interval_seconds``
gets an SSE comment (proxies see traffic; clients ignore it) and, for Codex, an app keepalive event its idle
watchdog counts — only between events, never inside one.  A client that leaves stops the writes, not the reads:
the upstream is read on to the terminal event (bounded by the drain timeout) so the turn is billed; with turn
resume the stream is held for the client's retry instead (:mod:`wsrelay.heldstream`).
"""

import socket
import time

from . import usage
from .clientwatch import ClientGone
from .httpclient import HTTPUpstreamError
from .sse import APP_KEEPALIVE_EVENT, KEEPALIVE_COMMENT, SseReader

STAGE_SSE_OK = "downstream_sse_keepalive_ok"
STAGE_APP = "downstream_app_keepalive"
DIRECTION = "downstream_keepalive"
# What the relay reads of a stream: the ledger's events, and events without a type (checked further).
_READ_EVENTS = frozenset(usage.LEDGER_EVENTS | {"message"})


def relay_events(x, response):
    """The event stream of exchange ``x``: relayed as it arrives, read by the SSE reader for the ledger, kept
    alive (see :mod:`wsrelay.exchange`)."""
    ledger = x.ledger
    reader = SseReader(x.config.usage.max_event_bytes, wanted=_READ_EVENTS.__contains__)
    sse_interval = x.settings.sse_keepalive_interval_seconds
    ws = x.config.gateway.openai_ws
    app_on, _ = x.transport.app_keepalive(x.environ)
    app_interval = ws.passthrough_downstream_app_keepalive_interval_seconds if app_on else 0
    read_timeout = response.read_timeout
    now = time.monotonic()
    last_up = last_write = last_business = now
    deadline = None  # the drain's, once the client is gone
    while True:
        if not x.client_open and deadline is None:
            if x.held is not None and x.held.hold(reader):  # resume: kept for the client's retry
                return x.held.pump(response, reader, ledger)
            deadline = x._start_drain(now)
        wait = last_up + read_timeout - now
        keepalive = x.client_open and reader.events and reader.at_boundary and ledger.in_flight
        if keepalive:
            if sse_interval:
                wait = min(wait, last_write + sse_interval - now)
            if app_interval:
                wait = min(wait, last_business + app_interval - now)
        if deadline is not None:
            wait = min(wait, deadline - now)
        try:
            data = x._read(response, max(wait, 0.001))
        except ClientGone:
            now = time.monotonic()
            continue
        except socket.timeout:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                x.trace("drain_timeout", transport="http")
                x.outcome = "drain_timeout"
                return x._settle(usage.RELAY_DRAIN_TIMEOUT)
            if now - last_up >= read_timeout:
                x._upstream_broke(socket.timeout("no bytes for %gs" % read_timeout), None)
                return x._settle(usage.RELAY_READ_TIMEOUT)
            if keepalive and app_interval and now - last_business >= app_interval:
                if x._send(APP_KEEPALIVE_EVENT):
                    last_write = last_business = now
                    x.app_keepalives += 1
                    x.trace(STAGE_APP, direction=DIRECTION, graceful=True, wrote_downstream=True)
            elif keepalive and sse_interval and now - last_write >= sse_interval:
                if x._send(KEEPALIVE_COMMENT):
                    last_write = now
                    x.keepalives += 1
                    x.trace(STAGE_SSE_OK, direction=DIRECTION, graceful=True, wrote_downstream=True)
            continue
        except HTTPUpstreamError as exc:
            x._upstream_broke(exc, deadline)
            return x._settle(usage.RELAY_UPSTREAM_LOST)
        now = time.monotonic()
        if not data:
            if ledger.in_flight:
                x.outcome = "upstream_ended_mid_turn"
                x.trace("http_upstream_ended_mid_turn", key_id=x.key_id)
            return x._settle(usage.RELAY_UPSTREAM_LOST)
        last_up = now
        if x.held is not None:
            x.held.record(data)
        if x._send(data):
            last_write = last_business = now
        x.bill_events(reader, data, ledger, not x.client_open)
        if deadline is not None and not ledger.in_flight:
            x.trace("drain_terminal", transport="http")
            return x._settle(usage.RELAY_UPSTREAM_LOST)
