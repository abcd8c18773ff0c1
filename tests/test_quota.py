"""Quota errors mid-session: which events say an account is out of quota, and what a session's switch does."""

import pytest

from tests.test_accounts import pool, spec
from wsrelay.accounts import COOLING, USABLE
from wsrelay.quota import AccountSwitch, account_switch, exhausted, retry_after


@pytest.mark.parametrize("event, code", [
    ({"type": "error", "status": 429, "error": {"code": "rate_limit_exceeded"}}, "rate_limit_exceeded"),
    ({"type": "error", "status": 429, "error": {"type": "usage_limit_reached"}}, "429"),
    ({"type": "error", "status_code": 429}, "429"),
    ({"type": "error", "error": {"code": "insufficient_quota"}}, "insufficient_quota"),
    ({"type": "error", "code": "rate_limit_exceeded", "message": "top-level code"}, "rate_limit_exceeded"),
    ({"type": "error", "status": 429, "error": {"code": "tokens"}}, "tokens"),
])
def test_quota_errors_are_told_by_status_429_or_their_code(event, code):
    assert exhausted(event) == code


@pytest.mark.parametrize("event", [
    {"type": "error", "status": 500, "error": {"type": "server_error"}},
    {"type": "error", "status": 400, "error": {"code": "websocket_connection_limit_reached"}},
    {"type": "error", "status": "429"},
    {"type": "error", "status": True, "error": {"code": "x"}},
    {"type": "error"},
    {"type": "response.failed", "status": 429, "error": {"code": "rate_limit_exceeded"}},
    {"type": "response.output_text.delta", "delta": "rate_limit_exceeded"},
])
def test_other_events_are_not_quota_errors(event):
    assert exhausted(event) is None


def test_retry_after_is_read_from_the_events_headers_in_any_case():
    assert retry_after({"headers": {"Retry-After": "7"}}) == "7"
    assert retry_after({"headers": {"retry-after": 12}}) == 12
    assert retry_after({"headers": {"x-codex-primary-used-percent": "100.0"}}) is None
    assert retry_after({"headers": {"retry-after": True}}) is None
    assert retry_after({"headers": "retry-after: 7"}) is None
    assert retry_after({}) is None


def test_a_session_gets_a_switch_only_when_another_account_could_take_its_client():
    single = pool(spec("a"))
    assert account_switch(single, single.accounts["a"], True, 60) is None
    two = pool(spec("a"), spec("b"))
    assert account_switch(two, two.accounts["a"], False, 60) is None  # passthrough: the client's own key
    assert isinstance(account_switch(two, two.accounts["a"], True, 60), AccountSwitch)


def test_the_switch_asks_for_another_usable_account_and_cools_its_own_down():
    now = [100.0]
    p = pool(spec("a"), spec("b"))
    a, b = p.accounts["a"], p.accounts["b"]
    switch = AccountSwitch(p, a, 60.0, clock=lambda: now[0])
    assert switch.elsewhere()
    p.cool_down(b, now[0], 10)
    assert not switch.elsewhere()  # a itself is usable, but it is the one out of quota
    assert switch.cool_down({"type": "error", "headers": {"retry-after": "30"}}, "rate_limit_exceeded") == 30
    assert a.state(now[0] + 29) == COOLING and a.state(now[0] + 31) == USABLE
    assert a.last_failure == "rate_limit_exceeded"
    assert switch.cool_down({"type": "error"}, "429") == 60.0
    assert a.state(now[0] + 59) == COOLING
