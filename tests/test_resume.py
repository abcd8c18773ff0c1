"""Which retried request resumes which held turn."""

import json

from wsrelay.resume import (MISS_ACCOUNT, MISS_DEAD, MISS_EXPIRED, MISS_INPUT, MISS_NO_TURN_ID, MISS_NONE_HELD,
                            MISS_OVERFLOW, MISS_TRANSPORT, MISS_TURN, HeldTurn, ResumeRegistry, conversation,
                            input_items, is_suffix, turn_id)

ITEMS = [{"type": "message", "id": "msg_%d" % i, "role": "user", "content": [{"type": "input_text", "text": str(i)}]}
         for i in range(4)]


def request(turn="t-1", items=ITEMS, previous=None, in_header=False):
    metadata = json.dumps({"turn_id": turn, "request_kind": "turn"})
    body = {"type": "response.create", "model": "m", "input": list(items)}
    if not in_header:
        body["client_metadata"] = {"x-codex-turn-metadata": metadata}
    if previous:
        body["previous_response_id"] = previous
    return body


def held(turn="t-1", items=ITEMS[-1:], expires=100.0, key="k", session="s-1", size=10):
    return HeldTurn(conversation("k" if key is None else key, {"session-id": session}), "a", turn, list(items),
                    expires, size=size)


def test_turn_id_comes_from_client_metadata_or_the_handshake_header():
    assert turn_id(request("t-9")) == "t-9"
    header = json.dumps({"turn_id": "t-h"})
    assert turn_id(request(in_header=True), header) == "t-h"
    assert turn_id(request(""), None) is None  # Codex's prewarm
    assert turn_id({"client_metadata": {"x-codex-turn-metadata": "not json"}}) is None
    assert turn_id({}) is None


def test_the_cut_requests_input_must_end_the_retry_item_for_item():
    assert is_suffix(ITEMS[-1:], ITEMS)
    assert is_suffix(ITEMS, ITEMS)
    assert not is_suffix(ITEMS[1:2], ITEMS)
    changed = [dict(ITEMS[-1], content=[{"type": "input_text", "text": "other"}])]
    assert not is_suffix(changed, ITEMS)
    assert not is_suffix([], ITEMS)
    assert input_items({"input": "hi"}) == ["hi"]


def test_a_matching_retry_takes_the_held_turn_once():
    registry = ResumeRegistry(1 << 20)
    turn = held()
    registry.hold(turn)
    assert registry.match(turn.conversation, request(), None, now=50) == (turn, None)
    assert registry.match(turn.conversation, request(), None, now=50) == (None, MISS_NONE_HELD)


def test_every_mismatch_has_its_reason_and_leaves_the_turn_held():
    registry = ResumeRegistry(1 << 20)
    turn = held()
    registry.hold(turn)
    other_key = conversation("k2", {"session-id": "s-1"})
    assert registry.match(other_key, request(), None, 50) == (None, MISS_NONE_HELD)
    assert registry.match(turn.conversation, request("t-2"), None, 50) == (None, MISS_TURN)
    assert registry.match(turn.conversation, request(items=ITEMS[:2]), None, 50) == (None, MISS_INPUT)
    assert registry.match(turn.conversation, request(""), None, 50) == (None, MISS_NO_TURN_ID)
    assert registry.match(turn.conversation, request(), None, 100) == (None, MISS_EXPIRED)
    turn.alive = False
    assert registry.match(turn.conversation, request(), None, 50) == (None, MISS_DEAD)
    turn.alive, turn.overflowed = True, True
    assert registry.match(turn.conversation, request(), None, 50) == (None, MISS_OVERFLOW)
    assert registry.held[turn.conversation] is turn


def test_conversations_need_a_session_or_thread_header_and_include_the_key():
    assert conversation("k", {"thread-id": "t"}) == ("k", "thread-id", "t")
    assert conversation("k", {"session-id": "s", "thread-id": "t"}) == ("k", "session-id", "s")
    assert conversation("k", {"x-client-request-id": "r"}) is None


def test_expiry_and_memory_bounds():
    registry = ResumeRegistry(100)
    first = held(session="a", size=60, expires=10)
    second = held(session="b", size=30, expires=20)
    registry.hold(first)
    registry.hold(second)
    assert registry.total_bytes == 90 and registry.room_for(10) and not registry.room_for(11)
    assert registry.expired(15) == [first]
    assert registry.total_bytes == 30
    replaced = registry.hold(held(session="b", size=5))
    assert replaced is second and registry.total_bytes == 5
    registry.release(registry.held[second.conversation])
    assert registry.total_bytes == 0


def test_a_resume_never_crosses_accounts_or_transports():
    registry = ResumeRegistry(1 << 20)
    turn = held()
    turn.transport = "websocket"
    registry.hold(turn)
    assert registry.match(turn.conversation, request(), None, 50, account="b") == (None, MISS_ACCOUNT)
    assert registry.match(turn.conversation, request(), None, 50, transport="http") == (None, MISS_TRANSPORT)
    assert registry.match(turn.conversation, request(), None, 50, account="a", transport="websocket") == (turn, None)
