"""The fake upstream's HTTP transport (see :mod:`wsrelay.fake_upstream` for the modes and events).

``POST /v1/responses`` (also ``/responses`` and ``/backend-api/codex/responses``) with ``"stream": true``
answers ``text/event-stream``, each event written as it happens (``silence`` seconds pass before the turn's
end, as on the WebSocket); without it, the final Response object as JSON.  ``GET /v1/models`` (``/models``)
lists one model.  Errors have OpenAI's shape.
"""

import errno
import json
import socket
import struct

import gevent

from .httproutes import RESPONSES_PATHS
from .sse import encode_event
from .websocket import error_body, status_line

MODELS_PATHS = frozenset(("/v1/models", "/models"))
MAX_BODY = 64 * 1024 * 1024
MODEL = "gpt-fake"


def http_exchange(app, environ, start_response, turn_events):
    """One HTTP request to the fake upstream ``app`` (a :class:`~wsrelay.fake_upstream.FakeUpstream`)."""
    method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
    app.http_requests.append((method, path, {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                                             if k.startswith("HTTP_")}))
    app.http_peers.append(environ.get("REMOTE_PORT"))
    if app.require_authorization and environ.get("HTTP_AUTHORIZATION") != app.require_authorization:
        return _error(start_response, 401, "invalid_api_key", "fake upstream: wrong credential")
    if app.refuse:
        status, retry_after = app.refuse
        return _error(start_response, status, "fake_refusal", "fake upstream: refused with %d" % status,
                      [("Retry-After", str(retry_after))] if retry_after is not None else [])
    if path in MODELS_PATHS:
        if method != "GET":
            return _error(start_response, 405, "method_not_allowed", "use GET")
        return _json(start_response, 200, {"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "wsrelay-fake-upstream"}]})
    if path not in RESPONSES_PATHS and not (app.mode == "echo" and method == "POST"):
        return _error(start_response, 404, "not_found", "fake upstream: no route for %s" % path[:200])
    if method != "POST":
        return _error(start_response, 405, "method_not_allowed", "use POST")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not 0 <= length <= MAX_BODY:
        return _error(start_response, 413, "request_too_large", "the body must be at most %d bytes" % MAX_BODY)
    body = environ["wsgi.input"].read(MAX_BODY + 1) if chunked else environ["wsgi.input"].read(length)
    if len(body) > MAX_BODY:
        return _error(start_response, 413, "request_too_large", "the body must be at most %d bytes" % MAX_BODY)
    try:
        request = json.loads(body or b"null")
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return _error(start_response, 400, "invalid_json", "the body must be a JSON object")
    if app.mode == "echo":
        return _json(start_response, 200, request)
    head, tail = turn_events(request, app.mode, app.deltas, app.usage)
    if request.get("stream"):
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
                       + list(app.response_headers))
        return _stream(app, environ, request, head, tail)
    if request.get("generate") is not False and app.silence:
        gevent.sleep(app.silence)
    if app.mode == "error":
        return _error(start_response, 500, "server_error", "fake failure")
    if app.mode == "quota-mid":
        return _error(start_response, 429, "rate_limit_exceeded", "fake upstream: rate limit reached for requests")
    response = dict(tail[-1]["response"])
    response.setdefault("output", [])
    return _json(start_response, 200, response)


def _stream(app, environ, request, head, tail):
    for event in head:
        yield encode_event(event)
    if request.get("generate") is not False:
        if app.silence:
            gevent.sleep(app.silence)
        if app.mode == "close-mid":
            return  # the body ends (last chunk) without a terminal event
        if app.mode == "drop-mid":
            sock = environ["wsgi.input"].socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # pywsgi takes a reset for a client that went away: it closes the socket quietly (now with RST).
            raise ConnectionResetError(errno.ECONNRESET, "fake upstream dropped the connection")
    for event in tail:
        yield encode_event(event)


def _json(start_response, status, payload):
    body = json.dumps(payload).encode("utf-8")
    start_response("200 OK" if status == 200 else status_line(status),
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _error(start_response, status, code, message, headers=()):
    body = error_body(status, code, message)
    start_response(status_line(status), [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
                   + list(headers))
    return [body]
