"""The HTTP transport's routes and what crosses them: paths, forwarded headers, the relay's own error answers.

Pure functions of a request's path and WSGI environ; :mod:`wsrelay.exchange` does the I/O.
"""

import http

from .httpclient import HOP_BY_HOP

RESPONSES = "responses"
PASSTHROUGH = "passthrough"
RESPONSES_PATHS = frozenset(("/v1/responses", "/responses", "/backend-api/codex/responses"))
PREFIXES = ("/v1/", "/backend-api/codex/")
# Response headers that stay with the relay: framing, the upstream's own identity, and its cookies (they belong
# to the relay's credential, not to this client).
RESPONSE_HOP_BY_HOP = (HOP_BY_HOP - {"content-length"}) | {"set-cookie", "date", "server"}


class Refusal(Exception):
    """A request the relay answers itself: ``status``, ``code`` and ``message`` go into OpenAI's error shape."""

    def __init__(self, status, code, message, headers=()):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


def route(path):
    """``(route, target)`` of a request path: the Responses route with the upstream path ``/responses``, a
    passthrough path under the base URL, or ``(None, None)``."""
    if path in RESPONSES_PATHS:
        return RESPONSES, "/responses"
    for prefix in PREFIXES:
        if path.startswith(prefix):
            return PASSTHROUGH, path[len(prefix) - 1:]
    if path == "/models":
        return PASSTHROUGH, path
    return None, None


def upstream_headers(environ, authorization):
    """The client's request headers for the upstream: all but hop-by-hop ones (and those its Connection header
    names), its credentials and cookies, and its Accept-Encoding (the relay reads what it relays)."""
    drop = set(HOP_BY_HOP) | {"authorization", "cookie", "accept-encoding"}
    drop.update(t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(","))
    out = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
            if name not in drop:
                out.append((name, value))  # latin-1 text, as WSGI decoded it: the same bytes go back out
    if environ.get("CONTENT_TYPE"):
        out.append(("content-type", environ["CONTENT_TYPE"]))
    if authorization:
        out.append(("authorization", authorization))
    out.append(("accept-encoding", "identity"))
    return out


def content_length(environ):
    value = environ.get("CONTENT_LENGTH")
    if not value:
        return None
    try:
        length = int(value)
    except ValueError:
        raise Refusal(400, "bad_request", "Content-Length is not a number")
    if length < 0:
        raise Refusal(400, "bad_request", "Content-Length is negative")
    return length


def status_line_for(status, response=None):
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = (response.reason if response is not None else None) or "Unknown"
    return "%d %s" % (status, reason)
