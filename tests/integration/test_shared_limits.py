"""One per-key limit across relay instances through a real Redis (a private redis-server): WebSocket sessions
and HTTP requests in flight count on every instance, a killed instance's leases expire within their TTL, and an
unreachable Redis leaves each instance serving with its own limits, saying so, without a hung handshake."""

import http.client
import json
import time

import gevent
import pytest

from tests.helpers import WS, connect, free_port, port_of, raw_request, read_close, wait_until
from tests.redisserver import RedisServer
from wsrelay.fake_upstream import FrameSocket

pytestmark = pytest.mark.timeout(60)

LIMIT = WS + "max_ingress_connections_per_api_key"
ALICE = [("Authorization", "Bearer key-alice")]
BOB = [("Authorization", "Bearer key-bob")]


@pytest.fixture
def instances(fake, relay, redis_url):
    """``instances(count, fake_options=None, **settings)``: relays in front of one fake upstream, all sharing the
    test's Redis; returns their URLs (their apps are ``relay.apps``)."""

    def start(count=2, fake_options=None, **settings):
        _, url = fake(**(fake_options or {}))
        settings.setdefault("limits__redis_url", redis_url)
        return [relay(url, **settings) for _ in range(count)]

    return start


def attempt(url, headers=ALICE):
    """A handshake: the open client on 101, None on 429 (anything else fails the test)."""
    sock, status, response_headers, rest = raw_request(url, headers)
    if status == 101:
        return FrameSocket(sock, rest, client=True)
    sock.close()
    assert status == 429 and response_headers["retry-after"] == "1", (status, rest)
    attempt.refusal = json.loads(rest)["error"]
    return None


def admitted_within(url, timeout, headers=ALICE):
    with gevent.Timeout(timeout, AssertionError("no slot free within %ss" % timeout)):
        while True:
            client = attempt(url, headers)
            if client is not None:
                return client
            gevent.sleep(0.02)


def get(url, path):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body) if path != "/metrics" else body.decode()


def test_two_instances_sharing_redis_enforce_one_per_key_limit(instances, relay):
    a, b = instances(2, **{LIMIT: 2})
    held = [connect(a, ALICE), connect(b, ALICE)]
    for url in (a, b):
        assert attempt(url) is None
        assert attempt.refusal["code"] == "too_many_connections"
        assert "2 concurrent" in attempt.refusal["message"] and "across the relay's instances" in attempt.refusal[
            "message"]
    bob = connect(b, BOB)  # another key has its own count
    held[0].close(1000)
    assert read_close(held[0]) == (1000, "")
    held.append(admitted_within(b, 5.0))  # the slot freed on one instance is taken on the other
    assert attempt(a) is None
    assert [app.limits.state()["leases"] for app in relay.apps] == [0, 3]
    for client in held[1:] + [bob]:
        client.close(1000)


def test_http_requests_in_flight_count_against_the_shared_limit(instances):
    a, b = instances(2, fake_options={"silence": 1.0}, **{LIMIT: 1})
    conn = http.client.HTTPConnection("127.0.0.1", port_of(a), timeout=10)
    conn.request("POST", "/v1/responses", json.dumps({"model": "m", "input": "hi", "stream": True}),
                 {"Authorization": "Bearer key-alice", "Content-Type": "application/json"})
    streaming = conn.getresponse()
    streaming.read1(65536)  # the turn is in flight on a, its terminal event a second away
    assert attempt(b) is None  # a WebSocket session on b
    other = http.client.HTTPConnection("127.0.0.1", port_of(b), timeout=10)
    other.request("POST", "/v1/responses", json.dumps({"model": "m", "input": "hi"}),
                  {"Authorization": "Bearer key-alice", "Content-Type": "application/json"})
    refused = other.getresponse()
    assert refused.status == 429 and json.loads(refused.read())["error"]["code"] == "too_many_connections"
    streaming.read()  # to the end of the stream: the request's slot is given back
    admitted_within(b, 5.0).close(1000)
    conn.close()
    other.close()


def test_sessions_of_a_killed_instance_free_their_slots_within_the_lease_ttl(fake, relay, serve, redis_url,
                                                                              redis_server, tmp_path):
    ttl = 2.0
    _, upstream = fake()
    port = free_port()
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "server": {"host": "127.0.0.1"}, "upstream": {"url": upstream},
        "usage": {"sqlite_path": str(tmp_path / "usage.db")},
        "gateway": {"openai_ws": {"max_ingress_connections_per_api_key": 2}},
        "limits": {"redis_url": redis_url, "lease_ttl_seconds": ttl, "redis_timeout_seconds": 0.5}}))
    served = serve("--config", str(path), "--port", port)
    served.wait_listening(port)
    assert any("stage=server_listening" in line and "limits=redis" in line for line in served.lines)
    b = "ws://127.0.0.1:%d/v1/responses" % port
    a = relay(upstream, limits__redis_url=redis_url, limits__lease_ttl_seconds=ttl, **{LIMIT: 2})
    on_b = [connect(b, ALICE), connect(b, ALICE)]
    deadline = time.monotonic() + 1.5 * ttl  # renewed while the sessions live: longer than the TTL
    while time.monotonic() < deadline:
        assert attempt(a) is None
        gevent.sleep(0.2)
    served.proc.kill()  # SIGKILL: no session end, no release, nothing said to Redis
    served.proc.wait()
    killed = time.monotonic()
    assert attempt(a) is None  # the leases outlive their instance, for now
    freed = [admitted_within(a, ttl + 2.0)]
    assert time.monotonic() - killed <= ttl + 0.5
    freed.append(admitted_within(a, 1.0))  # both slots
    assert attempt(a) is None
    client = redis_server.client()
    keys = list(client.scan_iter("wsrelay:lease:*"))
    assert len(keys) == 1 and client.zcard(keys[0]) == 2  # a's two; b's expired ones are gone
    client.close()
    for held in freed + on_b:
        held.sock.close()


@pytest.mark.parametrize("outage", ["paused", "stopped"])
def test_without_redis_sessions_are_served_with_local_limits_and_shared_again_when_it_returns(
        instances, relay, redis_server, tracer, outage):
    a, b = instances(2, limits__redis_timeout_seconds=0.3, limits__lease_ttl_seconds=3, **{LIMIT: 2})
    held = [connect(a, ALICE)]
    (redis_server.pause if outage == "paused" else redis_server.stop)()
    started = time.monotonic()
    held.append(connect(b, ALICE))  # b's own count: 0 of 2
    assert time.monotonic() - started < 0.3 + 0.7, "the handshake waited on a dead Redis"
    started = time.monotonic()
    held.append(connect(b, ALICE))
    assert attempt(b) is None and "across" not in attempt.refusal["message"]  # b's local limit
    assert time.monotonic() - started < 0.5, "a known outage must not cost a timeout per handshake"
    unavailable = tracer.wait_for("limits_redis_unavailable")
    assert unavailable["fallback"] == "local" and unavailable["redis"] == redis_server.url
    status, ready = get(b, "/readyz")
    assert status == 200 and ready["ready"] is True
    assert ready["limits"] == "local" and ready["redis"] == "unreachable" and ready["redis_error"]
    metrics = get(b, "/metrics")[1]
    assert "wsrelay_limits_redis_up 0.0" in metrics and "wsrelay_limits_redis_outages_total 1.0" in metrics

    (redis_server.resume if outage == "paused" else redis_server.start)()
    wait_until(lambda: all(app.redis.up for app in relay.apps), 5.0, "both instances back on Redis")
    assert tracer.find("limits_redis_recovered")
    status, ready = get(b, "/readyz")
    assert ready["limits"] == "redis" and ready["redis"] == "ok" and ready["leases"] == 2
    assert "wsrelay_limits_redis_up 1.0" in get(b, "/metrics")[1]
    # Shared again, with what each instance admitted alone: 3 sessions held, the limit is 2.
    assert attempt(a) is None and "across the relay's instances" in attempt.refusal["message"]
    for client in held:
        client.close(1000)
        read_close(client)
    admitted_within(a, 5.0).close(1000)


def test_an_unreachable_redis_at_start_is_reported_without_its_password(fake, relay, tracer):
    _, upstream = fake()
    url = "redis://:hunter2@127.0.0.1:%d/0" % free_port()
    a = relay(upstream, limits__redis_url=url, **{LIMIT: 1})
    client = connect(a, ALICE)  # served: local limits
    assert attempt(a) is None
    unavailable = tracer.wait_for("limits_redis_unavailable")
    assert unavailable["redis"] == url.replace("hunter2", "***")
    status, ready = get(a, "/readyz")
    assert status == 200 and ready["redis"] == "unreachable"
    seen = json.dumps(tracer.events) + json.dumps(ready) + get(a, "/metrics")[1]
    assert "hunter2" not in seen
    client.close(1000)


def test_a_redis_with_a_password_is_used_and_the_password_never_shown(fake, relay, tracer):
    secured = RedisServer(password="hunter2").start()
    try:
        _, upstream = fake()
        a, b = (relay(upstream, limits__redis_url=secured.url, **{LIMIT: 1}) for _ in range(2))
        client = connect(a, ALICE)
        assert attempt(b) is None and "across" in attempt.refusal["message"]
        assert not tracer.find("limits_redis_unavailable")
        assert "hunter2" not in json.dumps(tracer.events)
        client.close(1000)
    finally:
        secured.close()
