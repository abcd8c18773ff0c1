"""The account pool's decisions, with the time passed in."""

import collections

from wsrelay.accounts import (COOLING, DISABLED, FULL, USABLE, AccountPool, AccountSpec, identity,
                              retry_after_seconds)


def spec(name, weight=1, max_sessions=None, key="sk-" + "x" * 8):
    return AccountSpec(name, "wss://%s/v1/responses" % name, "https://%s/v1" % name, api_key=key, weight=weight,
                       max_sessions=max_sessions)


def pool(*specs, ttl=3600.0):
    return AccountPool(list(specs), sticky_ttl=ttl)


def test_choices_follow_the_weights_evenly_interleaved():
    p = pool(spec("a", 3), spec("b", 1))
    picks = [p.choose(0).name for _ in range(8)]
    assert collections.Counter(picks) == {"a": 6, "b": 2}
    assert picks[:4].count("b") == 1  # interleaved, not a run of a's then b's


def test_a_cooled_account_is_skipped_until_its_cooldown_ends():
    p = pool(spec("a"), spec("b"))
    a = p.accounts["a"]
    p.cool_down(a, now=10, seconds=5)
    assert a.state(12) == COOLING
    assert {p.choose(12).name for _ in range(4)} == {"b"}
    assert a.state(15.1) == USABLE
    assert "a" in {p.choose(15.1).name for _ in range(4)}


def test_a_disabled_account_is_skipped_and_disabling_twice_is_logged_once():
    p = pool(spec("a"), spec("b"))
    a = p.accounts["a"]
    assert p.disable(a, now=0, seconds=600) is True
    assert p.disable(a, now=1, seconds=600) is False
    assert a.state(100) == DISABLED
    assert {p.choose(100).name for _ in range(4)} == {"b"}


def test_an_account_at_max_sessions_is_full_until_one_ends():
    p = pool(spec("a", max_sessions=1), spec("b", max_sessions=1))
    first = p.choose(0)
    p.acquire(first)
    second = p.choose(0)
    p.acquire(second)
    assert {first.name, second.name} == {"a", "b"}
    assert first.state(0) == FULL and p.choose(0) is None
    assert p.ready(0)  # full is busy, not broken
    p.release(first)
    assert p.choose(0) is first


def test_nothing_usable_means_not_ready_and_a_retry_after_from_the_first_cooldown_end():
    p = pool(spec("a"), spec("b"))
    p.cool_down(p.accounts["a"], now=0, seconds=30)
    p.disable(p.accounts["b"], now=0, seconds=600)
    assert p.choose(1) is None and not p.ready(1)
    assert p.retry_after(1) == 29


def test_a_conversation_sticks_to_its_account_and_moves_when_it_cools_down():
    p = pool(spec("a"), spec("b"), spec("c"))
    who = identity("k1", {"session-id": "s-1"})
    first = p.choose(0, who)
    p.stick(who, first, 0)
    assert all(p.choose(t, who) is first for t in range(1, 20))
    p.cool_down(first, now=20, seconds=60)
    moved = p.choose(21, who)
    assert moved is not first
    p.stick(who, moved, 21)
    assert all(p.choose(t, who) is moved for t in range(22, 40))
    assert p.choose(100, who) is moved  # the first account is back, the conversation stays where it went


def test_stickiness_expires_after_its_ttl_from_last_use():
    p = pool(spec("a"), spec("b"), ttl=10)
    who = identity("k1", {"thread-id": "t"})
    first = p.choose(0, who)
    p.stick(who, first, 0)
    p.stick(who, first, 8)  # used again: the TTL counts from here
    assert p.choose(17, who) is first
    picks = {p.choose(19, who).name for _ in range(4)}
    assert picks == {"a", "b"}


def test_excluded_accounts_are_not_chosen_even_when_sticky():
    p = pool(spec("a"), spec("b"))
    who = identity("k", {"session-id": "s"})
    p.stick(who, p.accounts["a"], 0)
    assert p.choose(1, who, exclude={"a"}).name == "b"
    assert p.choose(1, who, exclude={"a", "b"}) is None


def test_identity_prefers_headers_then_the_prompt_cache_key_and_is_scoped_by_key():
    assert identity("k", {"session-id": "s", "thread-id": "t"}) == ("k", "session-id", "s")
    assert identity("k", {"x-client-request-id": "r"}) == ("k", "x-client-request-id", "r")
    assert identity("k", {}, "pck") == ("k", "prompt_cache_key", "pck")
    assert identity("k", {}) is None
    assert identity("k1", {"session-id": "s"}) != identity("k2", {"session-id": "s"})


def test_a_reload_keeps_state_by_name_and_stops_choosing_removed_accounts():
    p = pool(spec("a"), spec("b"))
    a, b = p.accounts["a"], p.accounts["b"]
    p.acquire(b)
    p.cool_down(a, now=0, seconds=100)
    p.reload([spec("a", weight=5), spec("c")])
    assert p.accounts["a"] is a and a.spec.weight == 5 and a.state(1) == COOLING
    assert b.removed and "b" not in p.accounts
    p.release(b)  # a session of a removed account ends: harmless
    assert {p.choose(2).name for _ in range(3)} == {"c"}


def test_status_never_shows_a_credential():
    p = pool(spec("a", key="sk-secret-value"))
    p.cool_down(p.accounts["a"], now=0, seconds=10)
    status = p.status(now=0, wall=1000)
    assert "sk-secret-value" not in repr(status)
    assert status[0]["state"] == COOLING and status[0]["until"] == 1010 and status[0]["credential"] == "set"


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds("7", 60) == 7
    assert retry_after_seconds(None, 60) == 60
    assert retry_after_seconds("soon", 60) == 60
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", 60, now_wall=1445412500) == 10
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 60, now_wall=1445412500) == 0


def test_retry_after_that_is_not_a_finite_number_gets_the_default():
    # "inf" would cool an account down for ever (and break the 503's Retry-After); "nan" would not at all.
    for value in ("inf", "-inf", "nan", "Infinity", "1e999"):
        assert retry_after_seconds(value, 60) == 60, value


def test_an_account_removed_and_added_again_keeps_counting_its_live_sessions():
    p = pool(spec("a"), spec("b"))
    a = p.accounts["a"]
    p.acquire(a)
    p.reload([spec("b")])
    p.reload([spec("a"), spec("b")])
    assert p.accounts["a"] is a and a.live == 1 and not a.removed


def test_a_cooldown_learnt_from_another_instance_stops_the_choice_and_never_shortens_a_local_one():
    p = pool(spec("a"), spec("b"))
    a, b = p.accounts["a"], p.accounts["b"]
    p.learn("a", cooldown_until=20, why="429")
    assert a.state(10) == COOLING and a.last_failure == "429"
    assert {p.choose(10).name for _ in range(4)} == {"b"}
    p.cool_down(b, now=10, seconds=50)
    p.learn("b", cooldown_until=30)  # shorter than what this instance knows
    assert b.cooldown_until == 60
    p.learn("b", disabled_until=100, why="401")
    assert b.state(70) == DISABLED and b.last_failure == "401"
    p.learn("gone", cooldown_until=99)  # an account this instance does not have: nothing to learn
    assert a.state(20.1) == USABLE


def test_a_sticky_choice_learnt_from_another_instance_wins_over_the_local_one():
    p = pool(spec("a"), spec("b"))
    conversation = identity("k1", {"session-id": "s1"})
    p.stick(conversation, p.accounts["a"], now=0)
    p.learn_sticky(conversation, "b", until=100)  # another instance moved it later
    assert p.choose(50, conversation).name == "b"
    assert p.choose(100.5, conversation) is not None  # expired: an ordinary choice
    off = pool(spec("a"), spec("b"), ttl=0)
    off.learn_sticky(conversation, "b", until=100)
    assert off.sticky == {}
