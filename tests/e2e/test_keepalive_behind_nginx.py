"""A long silent turn behind a real idle-timeout proxy: kept alive by downstream Pings, cut without them.

nginx closes a proxied WebSocket when the relay side has been silent for ``proxy_read_timeout``; here that is
1 s and the fake upstream stays silent for 3.5 s (over 3x longer) before the turn's terminal event.
"""

import gevent
import pytest

from tests.helpers import CREATE, INTERVAL, PING_TIMEOUT, connect
from tests.e2e.nginx import NGINX_MISSING_MESSAGE, NginxProxy, nginx_binary
from wsrelay.fake_upstream import ConnectionClosed
from wsrelay.frames import OP_PING, OP_PONG, OP_TEXT

pytestmark = pytest.mark.timeout(60)

PROXY_READ_TIMEOUT = 1.0
SILENCE = 3.5


def run_turn_through_nginx(fake, relay, interval):
    if nginx_binary() is None:
        pytest.fail(NGINX_MISSING_MESSAGE)
    _, upstream_url = fake(silence=SILENCE)
    relay_url = relay(upstream_url, **{INTERVAL: interval, PING_TIMEOUT: 0.3})
    relay_port = int(relay_url.split(":")[2].split("/")[0])
    with NginxProxy(relay_port, read_timeout=PROXY_READ_TIMEOUT) as proxy:
        client = connect(proxy.url("/v1/responses"))
        client.send(OP_TEXT, CREATE)
        pings = 0
        with gevent.Timeout(SILENCE + 10):
            while True:
                try:
                    fin, opcode, payload = client.read_frame()
                except (ConnectionClosed, OSError):
                    return "cut", pings
                if opcode == OP_PING:
                    pings += 1
                    client.send(OP_PONG, payload)
                elif b'"response.completed"' in payload:
                    return "completed", pings


def test_silent_turn_three_times_the_proxy_timeout_completes_with_keepalive(fake, relay, store, tracer):
    outcome, pings = run_turn_through_nginx(fake, relay, interval=0.4)
    assert outcome == "completed"
    assert pings >= SILENCE / 0.4 - 2
    record = store.wait(1)[0]
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is False


def test_silent_turn_is_cut_by_the_proxy_without_keepalive(fake, relay, store, tracer):
    outcome, pings = run_turn_through_nginx(fake, relay, interval=0)
    assert (outcome, pings) == ("cut", 0)
    # The relay still bills the turn: nginx dropped the client side, the upstream was drained.
    record = store.wait(1, timeout=10)[0]
    assert record["terminal_event"] == "response.completed" and record["client_disconnected"] is True
