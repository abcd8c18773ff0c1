"""The HTTP transport's pure parts: routing, and the headers the upstream gets."""

import pytest

from wsrelay.exchange import PASSTHROUGH, RESPONSES, route, upstream_headers


@pytest.mark.parametrize("path, expected", [
    ("/v1/responses", (RESPONSES, "/responses")),
    ("/responses", (RESPONSES, "/responses")),
    ("/backend-api/codex/responses", (RESPONSES, "/responses")),
    ("/v1/responses/compact", (PASSTHROUGH, "/responses/compact")),
    ("/v1/models", (PASSTHROUGH, "/models")),
    ("/models", (PASSTHROUGH, "/models")),
    ("/backend-api/codex/models", (PASSTHROUGH, "/models")),
    ("/v2/models", (None, None)),
    ("/metrics", (None, None)),
])
def test_routes(path, expected):
    assert route(path) == expected


def test_upstream_headers_drop_hop_by_hop_credentials_cookies_and_encodings():
    environ = {
        "HTTP_AUTHORIZATION": "Bearer relay-key", "HTTP_COOKIE": "a=b", "HTTP_CONNECTION": "keep-alive, X-Gone",
        "HTTP_X_GONE": "1", "HTTP_KEEP_ALIVE": "5", "HTTP_TRANSFER_ENCODING": "chunked", "HTTP_HOST": "relay",
        "HTTP_ACCEPT_ENCODING": "gzip, zstd", "HTTP_SESSION_ID": "s-1", "HTTP_ORIGINATOR": "codex_exec",
        "HTTP_ACCEPT": "text/event-stream", "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "10",
    }
    headers = dict(upstream_headers(environ, "Bearer sk-upstream"))
    assert headers == {"session-id": "s-1", "originator": "codex_exec", "accept": "text/event-stream",
                       "content-type": "application/json", "authorization": "Bearer sk-upstream",
                       "accept-encoding": "identity"}


def test_passthrough_mode_sends_no_authorization_when_the_client_had_none():
    assert "authorization" not in dict(upstream_headers({"HTTP_ACCEPT": "*/*"}, None))
