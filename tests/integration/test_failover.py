"""The account pool at the dial, over real sockets: what an upstream's refusal does to the account."""

import pytest

from tests.helpers import raw_request

pytestmark = pytest.mark.timeout(30)


def test_in_passthrough_a_clients_429_does_not_cool_the_account_down_for_other_clients(fake, relay, tracer):
    # Without relay keys each client's own credential goes upstream: its rate limit is its own.
    app, upstream_url = fake(refuse=(429, 30))
    url = relay(upstream_url)
    sock, status, headers, _ = raw_request(url, [("Authorization", "Bearer sk-client-one")])
    sock.close()
    assert (status, headers.get("retry-after")) == (429, "30")
    app.refuse = None
    sock, status, _, body = raw_request(url, [("Authorization", "Bearer sk-client-two")])
    sock.close()
    assert status == 101, body
    assert [h["authorization"] for h in app.handshakes] == ["Bearer sk-client-one", "Bearer sk-client-two"]
    assert tracer.find("account_unavailable") == []
    assert "cooldown_s" not in tracer.find("account_dial")[0]
