"""The Responses HTTP transport: ``POST /v1/responses`` (SSE or JSON) and the rest of ``/v1/*``, streamed through.

An exchange is one client request: authorised and counted like a WebSocket session (the same keys, the same
per-key limit), sent to ``upstream.http_base_url`` over a kept-alive connection with the relay's credential, and
answered with the upstream's status, headers and body as they arrive.  An event stream is followed by an
:class:`~wsrelay.sse.SseReader` (the relay looks, it never rewrites): its ``response.created`` and terminal
events go to the same :class:`~wsrelay.usage.TurnLedger` the WebSocket path uses, so a turn is billed the same
way on both transports; a JSON Response object is billed from its ``usage``.

The seed's rules hold here too (:mod:`wsrelay.sserelay` relays the stream): keepalives after the first event,
only between events.  When the client leaves mid-stream, the upstream is read on (bounded by the drain timeout) to the terminal event,
and the turn is recorded with ``client_disconnected=true`` — one record per response.  Unless the turn can be
resumed: then it is held for the client's retry instead (:mod:`wsrelay.resume_http`).
"""

import json
import socket
import time
import uuid

import gevent

from . import accounts, heldstream, resume_http, sniff, usage
from .clientwatch import ClientGone, ClientWatch
from .failover import FAILOVER_UPSTREAM_STATUSES, Attempts, credential_header
from .httpclient import HTTPUpstreamError, UpstreamHTTP
from .httproutes import (RESPONSE_HOP_BY_HOP, RESPONSES, Refusal, content_length, status_line_for,
                         upstream_headers)
from .keepalive import app_keepalive_choice
from .sserelay import relay_events
from .websocket import error_body

BLOCK = 65536
_TERMINAL_STATUS = {"completed": "response.completed", "failed": "response.failed",
                    "incomplete": "response.incomplete", "cancelled": "response.incomplete"}


class Exchange:
    """One client request on the HTTP transport (see the module docstring).  ``relay.app`` is the RelayApp."""

    def __init__(self, transport, environ, start_response, kind, target):
        self.transport = transport
        self.app = transport.app
        self.config = self.app.config
        self.settings = self.config.gateway.openai_http
        self.environ = environ
        self.start_response = start_response
        self.handler = environ.get("wsrelay.handler")
        self.kind = kind
        self.target = target + (("?" + environ["QUERY_STRING"]) if environ.get("QUERY_STRING") else "")
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.id = uuid.uuid4().hex
        self.started = time.monotonic()
        self.key_id = None
        self.account = None
        self.status = None
        self.upstream_ms = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.client_open = True
        self.client_disconnected = False
        self.outcome = "ok"
        self.events = 0
        self.keepalives = 0
        self.app_keepalives = 0
        self.ledger = None
        self.body = None  # a Responses request's body, read whole
        self.held = None  # the resume_http.HeldStream recording this exchange's event stream
        self.write = None
        self.body_read = False
        self.waiting = False  # blocked reading the upstream (a departing client may interrupt it)
        self.greenlet = gevent.getcurrent()

    def trace(self, stage, **fields):
        self.app.tracer.emit(stage, request_id=self.id, **fields)

    # -- the request ---------------------------------------------------------------------------------------

    def run(self):
        try:
            if not self.app.accepting:
                raise Refusal(503, "shutting_down", "the relay is shutting down", [("Retry-After", "5")])
            self.key_id, passthrough = self.app.authorize(self.environ)
            with self.app.admitted(self.key_id):
                self.transport.live.add(self)
                try:
                    self._forward(passthrough)
                finally:
                    self.transport.live.discard(self)
                    self._settle(usage.RELAY_SESSION_CLOSED)  # killed mid-turn: still on the books
        except Refusal as refusal:
            return self.refuse(refusal)
        finally:
            self.trace("http_request", method=self.method, route=self.kind, path=self.environ.get("PATH_INFO"),
                       status=self.status, outcome=self.outcome, key_id=self.key_id,
                       duration_ms=round((time.monotonic() - self.started) * 1000, 1),
                       upstream_ms=self.upstream_ms, bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                       events=self.events, keepalives=self.keepalives, app_keepalives=self.app_keepalives,
                       client_disconnected=self.client_disconnected, account=self.account)
            if self.held is not None and self.held.state == heldstream.RECORDING:
                self.held = None  # a copy nobody holds: let it go with the exchange, not at the next full gc
        return []

    def refuse(self, refusal):
        self.status = refusal.status
        self.outcome = refusal.code
        if self.write is not None:  # the response had begun: it cannot become an error any more
            self._abandon()
            return []
        body = error_body(refusal.status, refusal.code, refusal.message)
        if self.handler is not None and not self.body_read and (
                self.environ.get("CONTENT_LENGTH") not in (None, "", "0")
                or "chunked" in self.environ.get("HTTP_TRANSFER_ENCODING", "").lower()):
            self.handler.close_connection = True  # the request body was not read: the connection cannot go on
        self.start_response(status_line_for(refusal.status), [("Content-Type", "application/json"),
                                                           ("Content-Length", str(len(body)))] + refusal.headers)
        return [body]

    def _forward(self, passthrough):
        length = content_length(self.environ)
        limit = self.settings.max_request_body_bytes
        if length is not None and length > limit:
            raise Refusal(413, "request_too_large", "the request body is %d bytes; the limit is %d"
                          % (length, limit))
        headers = upstream_headers(self.environ, None)
        cache_key = model = None
        if self.kind == RESPONSES:
            body = self.body = self._read_body(limit)
            length = len(body)
            turn = resume_http.take(self, body)
            if turn is not None:  # the retry of a cut turn held here: it gets that turn, nothing goes upstream
                return resume_http.replay(self, turn)
            model = sniff.model_hint(body[:4096])
            cache_key = sniff.prompt_cache_key(body)
        elif length or "chunked" in self.environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            body = self._stream_body(limit)  # streamed through: it cannot be sent a second time
        else:
            body, self.body_read = b"", True
        replayable = isinstance(body, bytes)
        attempts = Attempts(self.app, self.key_id, accounts.identity(self.key_id, dict(headers), cache_key),
                            passthrough is None, "http")
        try:
            self._attempt(attempts, headers, body, length, replayable, passthrough, model)
        finally:
            attempts.release()  # the account's live count, taken when it was chosen

    def _attempt(self, attempts, headers, body, length, replayable, passthrough, model):
        """Send the request to one account after another until one answers, then relay its response."""
        while True:
            account = attempts.next()
            if account is None:
                raise attempts.refusal()
            authorization = credential_header(account, passthrough)
            sent = headers + [("authorization", authorization)] if authorization else headers
            try:
                response = self._request(account, sent, body, length)
            except Refusal as refusal:
                if attempts.failed(account, refusal.status, None, None, refusal.code, can_retry=replayable):
                    continue
                raise
            if response.status in FAILOVER_UPSTREAM_STATUSES and attempts.failed(
                    account, response.status, response.status, response.header("retry-after"),
                    can_retry=replayable):
                response.close()  # its body is not read: the connection is not reused
                continue
            break
        if response.status not in FAILOVER_UPSTREAM_STATUSES:
            attempts.succeeded(account)
        self.account = account.name
        if self.kind == RESPONSES:
            self.ledger = usage.TurnLedger(self.id, self.key_id, transport="http", account=account.name)
            self.ledger.start_turn(model)
        try:
            self._respond(response)
        finally:
            response.close()

    def _request(self, account, headers, body, length):
        client = self.transport.client(account)
        started = time.monotonic()
        try:
            response = client.request(self.method, self.target, headers, body, length)
        except HTTPUpstreamError as exc:
            self.trace("http_upstream_failed", status=exc.status, code=exc.code, error=exc.message,
                       key_id=self.key_id, account=account.name)
            raise Refusal(exc.status, exc.code, exc.message)
        self.upstream_ms = round((time.monotonic() - started) * 1000, 2)
        return response

    def _read_body(self, limit):
        stream = self.environ["wsgi.input"]
        try:
            body = stream.read(limit + 1) if content_length(self.environ) is None else stream.read()
        except socket.timeout:
            raise Refusal(408, "request_timeout", "the request body did not arrive in time")
        except (OSError, ValueError) as exc:
            raise Refusal(400, "bad_request", "the request body could not be read: %s" % exc)
        if len(body) > limit:
            raise Refusal(413, "request_too_large", "the request body is larger than the limit of %d bytes" % limit)
        self.bytes_up = len(body)
        self.body_read = True
        return body

    def _stream_body(self, limit):
        stream = self.environ["wsgi.input"]
        while True:
            try:
                chunk = stream.read(BLOCK)
            except socket.timeout:
                raise Refusal(408, "request_timeout", "the request body did not arrive in time")
            except (OSError, ValueError) as exc:
                raise Refusal(400, "bad_request", "the request body could not be read: %s" % exc)
            if not chunk:
                self.body_read = True
                return
            self.bytes_up += len(chunk)
            if self.bytes_up > limit:
                raise Refusal(413, "request_too_large", "the request body is larger than the limit of %d bytes"
                              % limit)
            yield chunk

    # -- the response --------------------------------------------------------------------------------------

    def _respond(self, response):
        self.status = response.status
        content_type = (response.header("content-type") or "").lower()
        streaming = content_type.startswith("text/event-stream")
        dropped = RESPONSE_HOP_BY_HOP | {"content-length"} if streaming else RESPONSE_HOP_BY_HOP
        # An event stream is sent chunked (or to the close) whatever its length upstream: keepalives go into it.
        headers = [(name, value) for name, value in response.headers if name.lower() not in dropped]
        if self.handler is not None:
            self.handler.stream_response(self.settings.write_timeout_seconds)
        status_line = status_line_for(response.status, response)
        self.write = self.start_response(status_line, headers)
        if response.status >= 400:
            self.ledger = None  # refused before any turn ran: the status is in the trace, there is nothing to bill
        watch = ClientWatch(self.handler.socket, self._client_closed) if self.handler is not None else None
        try:
            if streaming and self.kind == RESPONSES and self.ledger is not None:
                self.held = resume_http.recorder(self, status_line, headers)
                relay_events(self, response)
            else:
                self._relay_body(response, content_type)
        finally:
            if watch is not None:
                watch.stop()

    def _client_closed(self):
        if not self.client_open:
            return
        self._client_lost("client closed the connection")
        greenlet = self.greenlet

        def interrupt():
            if self.waiting:  # blocked on the upstream: the drain's deadline starts now
                greenlet.throw(ClientGone())

        gevent.get_hub().loop.run_callback(interrupt)

    def _client_lost(self, error):
        self.client_open = False
        self.client_disconnected = True
        self._abandon()
        self.trace("http_client_gone", error=error, turn_in_flight=bool(self.ledger and self.ledger.in_flight))

    def _read(self, response, timeout):
        """``response.read_some`` that a departing client interrupts (:class:`ClientGone`)."""
        self.waiting = True
        try:
            return response.read_some(timeout)
        finally:
            self.waiting = False

    def stop(self):
        """The server stops without grace: cut the client off; the upstream is drained as for a client that left."""
        if self.handler is not None and self.client_open:
            try:
                self.handler.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _send(self, data):
        """Write to the client while it is there; returns False once it is gone."""
        if not self.client_open:
            return False
        try:
            self.write(data)
        except (OSError, socket.timeout) as exc:
            self._client_lost(str(exc)[:200] or exc.__class__.__name__)
            return False
        self.bytes_down += len(data)
        return True

    def _abandon(self):
        if self.handler is not None:
            self.handler.abandon_response()

    def _relay_body(self, response, content_type):
        """A body that is not an event stream: relayed as it arrives; a JSON Response object is billed."""
        keep = None
        if response.status < 400 and "json" in content_type and (self.kind == RESPONSES or self.method == "POST"):
            keep = bytearray()
        limit = self.config.usage.max_event_bytes
        deadline = None
        while True:
            if not self.client_open and deadline is None:
                deadline = time.monotonic() + self.settings.upstream_drain_timeout_seconds
            try:
                data = self._read(response, _left(deadline))
            except ClientGone:
                continue
            except (socket.timeout, HTTPUpstreamError) as exc:
                self._upstream_broke(exc, deadline)
                if deadline is not None:
                    reason = usage.RELAY_DRAIN_TIMEOUT
                else:
                    reason = usage.RELAY_READ_TIMEOUT if isinstance(exc, socket.timeout) else usage.RELAY_UPSTREAM_LOST
                return self._settle(reason)
            if not data:
                break
            if keep is not None:
                if len(keep) + len(data) <= limit:
                    keep += data
                else:
                    keep = None
            self._send(data)
        if keep:
            self._bill_json(bytes(keep))
        self._settle(usage.RELAY_UPSTREAM_LOST)

    def _bill_json(self, body):
        try:
            obj = json.loads(body)
        except ValueError:
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
            return
        if self.ledger is None:
            self.ledger = usage.TurnLedger(self.id, self.key_id, transport="http", account=self.account)
            self.ledger.start_turn(None)
        kind = _TERMINAL_STATUS.get(obj.get("status"), "response.completed")
        self._record(self.ledger.on_event({"type": kind, "response": obj},
                                          client_disconnected=self.client_disconnected))

    def bill_events(self, reader, data, ledger, client_disconnected):
        """Feed the stream's bytes to its reader, and the events the ledger reads to the ledger."""
        for event in reader.feed(data):  # the ledger's events and untyped ones (the reader's filter): few
            if event.event != "message" or (event.data and usage.may_be_ledger_event(event.data[:256])):
                self._record(ledger.on_event(usage.parse_event(event.data), client_disconnected=client_disconnected))
        self.events = reader.events

    def _start_drain(self, now):
        self.outcome = "client_gone"
        if self.ledger is not None and self.ledger.in_flight:
            self.trace("drain_started", transport="http", timeout_s=self.settings.upstream_drain_timeout_seconds)
            return now + self.settings.upstream_drain_timeout_seconds
        return now  # nothing to bill any more: stop reading

    def _upstream_broke(self, exc, deadline):
        """The upstream's body stopped short (or went silent too long): the client's response is cut as well."""
        if self.outcome == "ok":
            self.outcome = "upstream_timeout" if isinstance(exc, socket.timeout) else "upstream_lost"
        if deadline is None:
            self.trace("http_upstream_lost", error=str(exc)[:200] or exc.__class__.__name__, key_id=self.key_id)
        self._abandon()

    def _settle(self, reason):
        if self.ledger is not None:  # idempotent: a settled ledger has nothing left to record
            if self.ledger.in_flight:
                self._record(self.ledger.abandon(reason, self.client_disconnected))
            self._record(self.ledger.close())

    def _record(self, records):
        if self.held is not None:
            records = self.held.park(records)  # a held turn's records wait for its fate (resume_http)
        store = self.app.store
        for record in records:
            self.trace("usage_recorded", **{name: getattr(record, name) for name in usage.REPORT_FIELDS})
            if store is not None:
                store.put(record)


class HTTPTransport:
    """The HTTP transport of a :class:`~wsrelay.server.RelayApp`: its routes and its upstream client pool."""

    def __init__(self, app):
        self.app = app
        self.live = set()  # the exchanges in progress
        self._clients = {}  # account name -> (settings, UpstreamHTTP)

    def __call__(self, environ, start_response, kind, target):
        return Exchange(self, environ, start_response, kind, target).run()

    def client(self, account):
        """The upstream client of ``account`` (rebuilt when a reload changed its settings)."""
        config = self.app.config
        up = config.upstream
        key = (account.spec.http_base_url, up.connect_timeout_seconds, up.http_read_timeout_seconds,
               up.http_max_connections, id(self.app.tls_context))
        held = self._clients.get(account.name)
        if held is None or held[0] != key:
            if held is not None:
                held[1].close()
            held = self._clients[account.name] = (key, UpstreamHTTP(key[0], key[1], key[2], key[3],
                                                                    self.app.tls_context))
        return held[1]

    def app_keepalive(self, environ):
        ws = self.app.config.gateway.openai_ws
        return app_keepalive_choice(ws.passthrough_downstream_app_keepalive_mode,
                                    ws.passthrough_downstream_app_keepalive_interval_seconds,
                                    environ.get("HTTP_ORIGINATOR"), environ.get("HTTP_USER_AGENT"))

    def close(self):
        for _, client in self._clients.values():
            client.close()
        self._clients.clear()


def _left(deadline):
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.001)
