"""Per-key limits counted in the process, and what the Redis side shows of its URL (never the password)."""

import pytest

from wsrelay.limits import LocalLimits
from wsrelay.redisstate import _describe, redact

pytestmark = pytest.mark.timeout(30)


def test_local_limits_count_per_key_and_give_slots_back():
    limits = LocalLimits()
    first, held = limits.acquire("k1", 2)
    assert first is not None and held == 1
    second, held = limits.acquire("k1", 2)
    assert held == 2
    assert limits.acquire("k1", 2) == (None, 2)
    assert limits.acquire("k2", 2)[0] is not None  # another key has its own count
    limits.release(first)
    assert limits.acquire("k1", 2)[0] is not None
    assert limits.state() == {"limits": "local"}


def test_a_lowered_limit_refuses_new_sessions_without_touching_live_ones():
    limits = LocalLimits()
    leases = [limits.acquire(None, 5)[0] for _ in range(3)]
    assert limits.acquire(None, 2) == (None, 3)
    for lease in leases:
        limits.release(lease)
    assert limits.per_key == {}


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
    ("redis://relay:s3cret@10.0.0.5/2", "redis://relay:***@10.0.0.5/2"),
    ("rediss://relay@redis.internal:6380", "rediss://relay@redis.internal:6380"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
])
def test_the_redis_url_is_shown_without_its_password(url, shown):
    assert redact(url) == shown


def test_an_error_text_never_carries_the_password():
    url = "redis://:p%40ss@redis.internal:6379/0"
    text = _describe(OSError("AUTH p@ss failed for redis://:p%40ss@redis.internal:6379/0"), url)
    assert "p@ss" not in text and "p%40ss" not in text and "***" in text
