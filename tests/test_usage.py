import json
import os

import pytest

from wsrelay import usage
from wsrelay.usage import (RELAY_DRAIN_TIMEOUT, RELAY_SESSION_CLOSED, RELAY_UPSTREAM_LOST, TERMINAL_EVENTS,
                           TurnLedger, UsageRecord, extract_usage, may_be_ledger_event, parse_event)

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self, now=1_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def terminal(kind, response_id="resp_1", model="gpt-test", usage_block=None):
    response = {"id": response_id, "object": "response", "model": model}
    if usage_block is not None:
        response["usage"] = usage_block
    return {"type": kind, "response": response}


def bare_error(message="boom"):
    return {"type": "error", "error": {"type": "server_error", "message": message}}


USAGE = {"input_tokens": 100, "output_tokens": 40, "total_tokens": 140,
         "input_tokens_details": {"cached_tokens": 30}, "output_tokens_details": {"reasoning_tokens": 10}}


def make_ledger(clock=None):
    return TurnLedger("sess-1", key_id="key-a", clock=clock or FakeClock())


# --- may_be_ledger_event -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TERMINAL_EVENTS))
def test_may_be_ledger_event_accepts_every_terminal_type(kind):
    message = json.dumps({"type": kind, "response": {"id": "resp_1", "output": [{"type": "message"}]}})
    assert may_be_ledger_event(message.encode()[:96])


@pytest.mark.parametrize("prefix", [
    b'{"type":"response.output_text.delta","sequence_number":12,"item_id":"msg_1","output_index":0,"delta":"He',
    b'{"type":"response.output_text.done","item_id":"msg_1","output_index":0,"content_index":0,"text":"Hello"',
    b'{"type":"response.done_something","x":1}',
    b'{"type":"response.create","model":"gpt-5"}',
    b'{"type":"response.in_progress"}',
    b'{"type": "response.reasoning_summary_text.delta", "delta": "thinking"}',
    b'{"type":null}',
])
def test_may_be_ledger_event_rules_out_the_events_the_ledger_does_not_read(prefix):
    assert not may_be_ledger_event(prefix)


@pytest.mark.parametrize("prefix", [
    b'{"type":"response.completed","response":{"id":"resp_1","object":"response","created_at":1700000000,',
    b'{"type": "error",',
    b'{"type" :  "response.done"}',
    b'{"type":\n"response.failed","sequence_number":99}',
    b'  {"type":"response.incomplete","response":{}}',
    b'{"type":"response.created","response":{"id":"resp_1","object":"response","status":"in_progress"',
])
def test_may_be_ledger_event_detects_terminal_events_and_response_created(prefix):
    assert may_be_ledger_event(prefix)


def test_may_be_ledger_event_cannot_rule_out_a_message_whose_type_is_beyond_the_prefix():
    prefix = (b'{"delta":"x' + b"y" * 200 + b'","type":"response.output_text.delta"}')[:96]
    assert b'"type"' not in prefix
    assert may_be_ledger_event(prefix)


def test_may_be_ledger_event_keeps_a_terminal_type_cut_off_by_the_prefix():
    assert may_be_ledger_event(b'{"sequence_number":1,"type":"response.compl')
    assert not may_be_ledger_event(b'{"sequence_number":1,"type":"response.output_te')


def test_may_be_ledger_event_skips_the_word_type_used_as_a_string_value():
    assert may_be_ledger_event(b'{"kind":"type","type":"response.completed"}')
    assert not may_be_ledger_event(b'{"kind":"type","type":"response.output_item.added"}')


def test_may_be_ledger_event_does_not_trust_a_type_key_of_a_nested_object():
    prefix = b'{"response":{"output":[{"type":"message","id":"msg_1"}]},"type":"response.completed"}'
    assert may_be_ledger_event(prefix)


# --- parse_event / extract_usage -------------------------------------------------------------------------------


def test_parse_event_returns_objects_and_rejects_everything_else():
    assert parse_event(b'{"type":"error"}') == {"type": "error"}
    assert parse_event('{"a":1}') == {"a": 1}
    assert parse_event(b"[1,2]") is None
    assert parse_event(b"not json") is None
    assert parse_event(b"\xff\xfe") is None
    assert parse_event(b"") is None


def test_extract_usage_reads_responses_fields_with_cached_reasoning_and_image_tokens():
    event = terminal("response.completed", usage_block={
        "input_tokens": 500, "output_tokens": 300, "total_tokens": 800,
        "input_tokens_details": {"cached_tokens": 200},
        "output_tokens_details": {"reasoning_tokens": 120, "image_tokens": 64}})
    assert extract_usage(event) == {"input_tokens": 500, "output_tokens": 300, "total_tokens": 800,
                                    "cached_tokens": 200, "reasoning_tokens": 120, "image_tokens": 64}


def test_extract_usage_maps_chat_style_aliases():
    event = {"type": "response.completed", "usage": {
        "prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 3}}}
    assert extract_usage(event) == {"input_tokens": 12, "output_tokens": 8, "total_tokens": 20,
                                    "cached_tokens": 4, "reasoning_tokens": 3, "image_tokens": 0}


def test_extract_usage_folds_separately_reported_reasoning_into_output():
    event = terminal("response.completed", usage_block={
        "input_tokens": 100, "output_tokens": 40, "total_tokens": 190,
        "output_tokens_details": {"reasoning_tokens": 50}})
    got = extract_usage(event)
    assert got["output_tokens"] == 90
    assert got["total_tokens"] == 190
    assert got["reasoning_tokens"] == 50


def test_extract_usage_leaves_included_reasoning_alone():
    got = extract_usage(terminal("response.completed", usage_block=USAGE))
    assert got["output_tokens"] == 40 and got["total_tokens"] == 140


def test_extract_usage_computes_a_missing_total():
    got = extract_usage(terminal("response.completed", usage_block={"input_tokens": 7, "output_tokens": 5}))
    assert got["total_tokens"] == 12


@pytest.mark.parametrize("bad", [None, "12", -5, 3.5, True, [], {}, float("nan")])
def test_extract_usage_turns_unusable_counts_into_zero(bad):
    event = terminal("response.completed", usage_block={
        "input_tokens": bad, "output_tokens": 5, "total_tokens": bad,
        "input_tokens_details": {"cached_tokens": bad}, "output_tokens_details": bad})
    got = extract_usage(event)
    assert got == {"input_tokens": 0, "output_tokens": 5, "total_tokens": 5, "cached_tokens": 0,
                   "reasoning_tokens": 0, "image_tokens": 0}


@pytest.mark.parametrize("event", [{}, {"type": "error"}, {"response": None}, {"response": {"usage": "x"}},
                                   {"response": [], "usage": 5}, "not a dict"])
def test_extract_usage_without_usage_is_all_zero(event):
    assert extract_usage(event) == dict.fromkeys(
        ("input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "image_tokens"), 0)


# --- UsageRecord ---------------------------------------------------------------------------------------------


def test_usage_record_round_trips_through_a_dict_and_gets_unique_ids():
    a = UsageRecord(session_id="s", response_id="r", input_tokens=3, terminal_event="response.completed",
                    client_disconnected=True, started_at=12.5, duration_ms=7)
    assert UsageRecord.from_dict(a.to_dict()) == a
    assert UsageRecord().record_id != UsageRecord().record_id
    assert len(a.record_id) == 32


def test_usage_record_from_dict_coerces_sloppy_input():
    r = UsageRecord.from_dict({"record_id": "x", "session_id": None, "input_tokens": "9", "output_tokens": -1,
                               "started_at": "12.5", "client_disconnected": 1, "unknown": "ignored"})
    assert (r.record_id, r.session_id, r.input_tokens, r.output_tokens, r.started_at, r.client_disconnected) == \
        ("x", "", 0, 0, 12.5, True)


# --- TurnLedger ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TERMINAL_EVENTS - {"error"}))
def test_every_terminal_event_settles_the_turn_with_its_usage(kind):
    clock = FakeClock()
    ledger = make_ledger(clock)
    assert ledger.start_turn("hint-model") == []
    assert ledger.in_flight
    clock.advance(2.5)
    [record] = ledger.on_event(terminal(kind, usage_block=USAGE))
    assert not ledger.in_flight
    assert record.terminal_event == kind
    assert (record.session_id, record.key_id, record.response_id, record.model) == \
        ("sess-1", "key-a", "resp_1", "gpt-test")
    assert (record.input_tokens, record.output_tokens, record.total_tokens, record.cached_tokens,
            record.reasoning_tokens) == (100, 40, 140, 30, 10)
    assert record.started_at == 1000.0 and record.duration_ms == 2500
    assert record.client_disconnected is False


def test_bare_error_ends_the_turn_and_is_billed_at_close():
    ledger = make_ledger()
    ledger.start_turn("gpt-hint")
    assert ledger.on_event(bare_error()) == []
    assert not ledger.in_flight
    [record] = ledger.close()
    assert record.terminal_event == "error"
    assert record.model == "gpt-hint" and record.response_id is None
    assert ledger.close() == []


def test_bare_error_followed_by_failed_is_billed_once():
    clock = FakeClock()
    ledger = make_ledger(clock)
    ledger.start_turn("gpt-hint")
    clock.advance(1)
    assert ledger.on_event(bare_error()) == []
    clock.advance(0.5)
    [record] = ledger.on_event(terminal("response.failed", response_id="resp_9", usage_block=USAGE))
    assert record.terminal_event == "response.failed"
    assert record.response_id == "resp_9"
    assert record.input_tokens == 100 and record.total_tokens == 140
    assert record.duration_ms == 1500
    assert ledger.close() == []


def test_bare_error_keeps_its_usage_when_the_following_failed_has_none():
    ledger = make_ledger()
    ledger.start_turn()
    error = dict(bare_error(), usage={"input_tokens": 11, "output_tokens": 2})
    assert ledger.on_event(error) == []
    [record] = ledger.on_event(terminal("response.failed", response_id="resp_2"))
    assert (record.input_tokens, record.output_tokens, record.total_tokens) == (11, 2, 13)
    assert record.response_id == "resp_2"


def test_bare_error_followed_by_a_new_turn_flushes_the_error_record():
    ledger = make_ledger()
    ledger.start_turn()
    ledger.on_event(bare_error())
    [flushed] = ledger.start_turn()
    assert flushed.terminal_event == "error"
    assert ledger.in_flight
    [record] = ledger.on_event(terminal("response.failed"))
    assert record.terminal_event == "response.failed" and record.record_id != flushed.record_id


def test_bare_error_is_flushed_by_an_unrelated_terminal_event():
    ledger = make_ledger()
    ledger.start_turn()
    ledger.on_event(bare_error())
    records = ledger.on_event(terminal("response.completed", usage_block=USAGE))
    assert [r.terminal_event for r in records] == ["error", "response.completed"]


def test_multi_turn_session_produces_one_record_per_turn():
    clock = FakeClock()
    ledger = make_ledger(clock)
    records = []
    for i in range(3):
        records += ledger.start_turn("m")
        clock.advance(1)
        records += ledger.on_event({"type": "response.output_text.delta", "delta": "x"})
        records += ledger.on_event(terminal("response.completed", response_id="resp_%d" % i, usage_block=USAGE))
    records += ledger.close()
    assert [r.response_id for r in records] == ["resp_0", "resp_1", "resp_2"]
    assert [r.started_at for r in records] == [1000.0, 1001.0, 1002.0]
    assert len({r.record_id for r in records}) == 3


def created(response_id):
    return {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}}


def usage_of(input_tokens, output_tokens):
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens}


def test_pipelined_responses_are_each_billed_with_their_own_tokens_when_they_end_out_of_order():
    clock = FakeClock()
    ledger = make_ledger(clock)
    ledger.start_turn("model-a")
    clock.advance(1)
    ledger.start_turn("model-b")
    assert ledger.open_responses == 2
    assert ledger.on_event(created("resp_a")) == [] and ledger.on_event(created("resp_b")) == []
    clock.advance(2)
    [second] = ledger.on_event({"type": "response.completed", "response": {"id": "resp_b",
                                                                           "usage": usage_of(7, 3)}})
    assert ledger.in_flight and ledger.open_responses == 1
    clock.advance(1)
    [first] = ledger.on_event({"type": "response.completed", "response": {"id": "resp_a",
                                                                          "usage": usage_of(50, 20)}})
    assert not ledger.in_flight
    assert (first.response_id, first.model, first.input_tokens, first.output_tokens) == ("resp_a", "model-a", 50, 20)
    assert (first.started_at, first.duration_ms) == (1000.0, 4000)
    assert (second.response_id, second.model, second.input_tokens, second.output_tokens) == \
        ("resp_b", "model-b", 7, 3)
    assert (second.started_at, second.duration_ms) == (1001.0, 2000)
    assert ledger.close() == []


def test_terminal_events_without_response_created_settle_requests_in_order():
    ledger = make_ledger()
    ledger.start_turn("first")
    ledger.start_turn("second")
    [a] = ledger.on_event(terminal("response.completed", response_id="resp_x"))
    [b] = ledger.on_event(terminal("response.completed", response_id="resp_y"))
    assert (a.model, b.model) == ("gpt-test", "gpt-test") and not ledger.in_flight
    assert [r.started_at for r in (a, b)] == [1000.0, 1000.0]


def test_a_terminal_event_for_an_unknown_id_never_settles_a_bound_request():
    ledger = make_ledger()
    ledger.start_turn("bound")
    ledger.on_event(created("resp_a"))
    [stray] = ledger.on_event({"type": "response.completed", "response": {"id": "resp_other"}})
    assert stray.model is None and ledger.in_flight
    [record] = ledger.on_event({"type": "response.completed", "response": {"id": "resp_a"}})
    assert record.model == "bound" and not ledger.in_flight


def test_abandon_settles_every_pipelined_response_in_flight_with_its_id():
    ledger = make_ledger()
    ledger.start_turn("a")
    ledger.start_turn("b")
    ledger.on_event(created("resp_a"))
    records = ledger.abandon(RELAY_DRAIN_TIMEOUT, client_disconnected=True)
    assert [(r.response_id, r.model, r.terminal_event) for r in records] == \
        [("resp_a", "a", RELAY_DRAIN_TIMEOUT), (None, "b", RELAY_DRAIN_TIMEOUT)]
    assert not ledger.in_flight


def test_bare_error_then_failed_of_another_pipelined_response_bills_each_once():
    ledger = make_ledger()
    ledger.start_turn("a")
    ledger.on_event(created("resp_a"))
    ledger.start_turn("b")  # rejected before it is created
    assert ledger.on_event(bare_error()) == []
    [error, failed] = ledger.on_event(terminal("response.failed", response_id="resp_a"))
    assert (error.terminal_event, error.model, error.response_id) == ("error", "b", None)
    assert (failed.terminal_event, failed.model, failed.response_id) == ("response.failed", "gpt-test", "resp_a")
    assert not ledger.in_flight and ledger.close() == []


def test_unprompted_terminal_event_is_still_recorded():
    ledger = make_ledger()
    [record] = ledger.on_event(terminal("response.completed", usage_block=USAGE))
    assert record.started_at == 1000.0 and record.duration_ms == 0 and record.input_tokens == 100


def test_non_terminal_and_malformed_events_are_ignored():
    ledger = make_ledger()
    ledger.start_turn()
    for event in ({"type": "response.output_text.done"}, {"type": 5}, {}, None, "x", {"type": "response.created"}):
        assert ledger.on_event(event) == []
    assert ledger.in_flight


def test_terminal_event_during_drain_marks_client_disconnected():
    ledger = make_ledger()
    ledger.start_turn()
    [record] = ledger.on_event(terminal("response.completed", usage_block=USAGE), client_disconnected=True)
    assert record.client_disconnected is True


@pytest.mark.parametrize("reason", [RELAY_UPSTREAM_LOST, RELAY_DRAIN_TIMEOUT, RELAY_SESSION_CLOSED])
def test_abandon_records_the_turn_in_flight_with_zero_tokens(reason):
    clock = FakeClock()
    ledger = make_ledger(clock)
    ledger.start_turn("gpt-hint")
    clock.advance(4)
    [record] = ledger.abandon(reason, client_disconnected=True)
    assert record.terminal_event == reason and record.client_disconnected is True
    assert record.model == "gpt-hint" and record.duration_ms == 4000
    assert (record.input_tokens, record.output_tokens, record.total_tokens) == (0, 0, 0)
    assert not ledger.in_flight
    assert ledger.abandon(reason, client_disconnected=True) == []


def test_abandon_without_a_turn_only_flushes_a_pending_error():
    ledger = make_ledger()
    assert ledger.abandon(RELAY_UPSTREAM_LOST, False) == []
    ledger.start_turn()
    ledger.on_event(bare_error())
    [record] = ledger.abandon(RELAY_UPSTREAM_LOST, False)
    assert record.terminal_event == "error"


def test_close_records_a_turn_left_in_flight_so_it_is_never_lost():
    ledger = make_ledger()
    ledger.start_turn()
    [record] = ledger.close()
    assert record.terminal_event == usage.RELAY_SESSION_CLOSED
    assert ledger.close() == []


def test_every_record_names_the_process_that_relayed_it_as_host_and_pid():
    ledger = TurnLedger("s1")
    ledger.start_turn()
    [settled] = ledger.on_event(terminal("response.completed"))
    [abandoned] = (ledger.start_turn(), ledger.abandon(RELAY_UPSTREAM_LOST, True))[1]
    expected = "%s:%d" % (os.uname().nodename, os.getpid())
    assert settled.instance == abandoned.instance == usage.current_instance() == expected


def test_a_forked_worker_names_itself_not_its_parent(monkeypatch):
    parent = usage.current_instance()
    monkeypatch.setattr(usage.os, "getpid", lambda: 424242)
    assert usage.current_instance() == "%s:424242" % os.uname().nodename
    assert UsageRecord().instance != parent


def test_a_record_from_before_instances_were_kept_has_none():
    older = UsageRecord.from_dict({"record_id": "r", "terminal_event": "response.completed"})
    assert older.instance is None
    assert UsageRecord.from_dict(UsageRecord(instance="h:1").to_dict()).instance == "h:1"
    assert "instance" in usage.NULLABLE_FIELDS and "instance" in usage.REPORT_FIELDS


def test_responses_in_flight_at_a_resume_are_recorded_as_resumed_and_later_ones_are_not():
    ledger = make_ledger()
    ledger.start_turn()
    ledger.mark_resumed()
    [resumed] = ledger.on_event(terminal("response.completed", usage_block=USAGE))
    assert resumed.resumed is True and resumed.total_tokens == USAGE["total_tokens"]
    ledger.start_turn()
    [later] = ledger.on_event(terminal("response.completed", response_id="resp_2"))
    assert later.resumed is False
    ledger.start_turn()
    ledger.on_event(bare_error())
    ledger.mark_resumed()  # an error held back for a response.failed that may follow
    [held] = ledger.start_turn()
    assert held.terminal_event == "error" and held.resumed is True
    assert UsageRecord.from_dict(held.to_dict()).resumed is True
    assert UsageRecord.from_dict({"record_id": "r"}).resumed is False  # a record from before the field
