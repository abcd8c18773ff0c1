"""Leases in a real Redis (a private redis-server), without a relay around them: atomic across instances,
renewed while held, expired when their instance dies, handed back after an outage."""

import time

import gevent
import pytest

from tests.helpers import RecordingTracer, wait_until
from wsrelay.limits import RedisLimits
from wsrelay.redisstate import SharedRedis

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def instances(redis_url):
    """``instances(count, ttl=1.0, timeout=0.2)``: RedisLimits sharing the test's Redis (each its own process
    in production), closed at teardown; they trace to ``instances.tracer``."""
    made = []
    tracer = RecordingTracer()

    def make(count=1, ttl=1.0, timeout=0.2, url=None):
        new = [RedisLimits(SharedRedis(url or redis_url, timeout, "wsrelay:", tracer), ttl, tracer)
               for _ in range(count)]
        made.extend(new)
        return new

    make.tracer = tracer
    yield make
    for limits in made:
        limits.close()


def held_in_redis(redis_server, key_id="k"):
    client = redis_server.client()
    try:
        return client.zcount("wsrelay:lease:" + key_id, "(%d" % (client.time()[0] * 1000), "+inf")
    finally:
        client.close()


def test_concurrent_acquires_on_two_instances_never_exceed_the_limit(instances, redis_server):
    a, b = instances(2)
    results = []
    gevent.joinall([gevent.spawn(lambda limits: results.append(limits.acquire("k", 5)), (a, b)[i % 2])
                    for i in range(40)])
    admitted = [lease for lease, _ in results if lease is not None]
    assert len(admitted) == 5
    assert sorted(held for lease, held in results if lease is None) == [5] * 35
    assert held_in_redis(redis_server) == 5
    assert b.acquire("other-key", 5)[0] is not None  # each key has its own count


def test_a_released_lease_leaves_redis_at_once(instances, redis_server):
    a, b = instances(2)
    lease, _ = a.acquire("k", 1)
    assert b.acquire("k", 1) == (None, 1)
    a.release(lease)
    wait_until(lambda: held_in_redis(redis_server) == 0, 2.0, "the lease taken out of Redis")
    assert b.acquire("k", 1)[0] is not None


def test_held_leases_are_renewed_past_their_ttl(instances, redis_server):
    a, b = instances(2, ttl=0.6, timeout=0.1)
    a.acquire("k", 1)
    deadline = time.monotonic() + 2.0  # over three TTLs
    while time.monotonic() < deadline:
        assert b.acquire("k", 1) == (None, 1)
        gevent.sleep(0.1)


def test_the_leases_of_a_dead_instance_expire_within_the_ttl(instances, redis_server):
    a, b = instances(2, ttl=0.6, timeout=0.1)
    a.acquire("k", 2)
    a.acquire("k", 2)
    a._keeper.kill()  # the instance is gone: nothing renews its leases, nothing releases them
    a._keeper = None
    a.start = lambda: None
    dead = time.monotonic()
    assert b.acquire("k", 2)[0] is None
    wait_until(lambda: b.acquire("k", 2)[0] is not None, 2.0, "a slot free again")
    assert time.monotonic() - dead <= 0.6 + 0.3


def test_close_gives_the_leases_back(instances, redis_server):
    a, = instances(1)
    for _ in range(3):
        a.acquire("k", 3)
    assert held_in_redis(redis_server) == 3
    a.close()
    assert held_in_redis(redis_server) == 0


def test_a_forked_child_holds_none_of_its_parents_leases(instances):
    a, = instances(1)
    lease, _ = a.acquire("k", 1)
    instance = a.instance
    a._pid = -1  # what a fork looks like from the child: another pid than the one that took the leases
    a.start()
    assert a.live == {} and a.instance != instance
    a.release(lease)  # the parent's lease: not the child's to give back
    assert a.per_key == {}


def test_while_redis_is_paused_acquires_go_local_in_bounded_time_and_come_back_shared(instances, redis_server):
    a, b = instances(2, ttl=1.5, timeout=0.2)
    tracer = instances.tracer
    a.acquire("k", 2)
    redis_server.pause()
    started = time.monotonic()
    lease, held = b.acquire("k", 2)
    assert lease is not None and held == 1  # b's own count: Redis did not answer
    assert time.monotonic() - started < 0.5
    assert tracer.find("limits_redis_unavailable")[0]["fallback"] == "local"
    started = time.monotonic()
    assert b.acquire("k", 2)[0] is not None and b.acquire("k", 2) == (None, 2)
    assert time.monotonic() - started < 0.05, "a known outage must not cost a timeout per handshake"
    assert b.state()["limits"] == "local" and b.state()["redis"] == "unreachable"
    redis_server.resume()
    wait_until(lambda: a.redis.up and b.redis.up, 5.0, "both instances back on Redis")
    assert held_in_redis(redis_server) == 3  # b handed back the leases it took while Redis was away
    assert a.acquire("k", 3) == (None, 3)  # shared again: a alone holds one
    recovered = tracer.find("limits_redis_recovered")
    assert recovered and all(r["redis"] == redis_server.url for r in recovered)


def test_a_lease_released_while_redis_is_away_is_taken_out_when_it_returns(instances, redis_server):
    a, = instances(1, ttl=10.0, timeout=0.2)
    lease, _ = a.acquire("k", 2)
    other, _ = a.acquire("k", 2)
    redis_server.pause()
    a.release(lease)
    wait_until(lambda: not a.redis.up, 3.0, "the outage noticed")
    redis_server.resume()
    wait_until(lambda: a.redis.up, 5.0, "back on Redis")
    client = redis_server.client()
    assert client.zscore("wsrelay:lease:k", lease.member) is None
    assert client.zscore("wsrelay:lease:k", other.member) is not None
    client.close()
