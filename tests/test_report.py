import csv
import io
import json

import pytest

from wsrelay.report import FIELDS, format_records, parse_since
from wsrelay.usage import UsageRecord

pytestmark = pytest.mark.timeout(10)


def record(**overrides):
    base = UsageRecord(session_id="s1", response_id="resp_1", model="gpt-test", key_id="k1", input_tokens=100,
                       output_tokens=40, total_tokens=140, cached_tokens=30, reasoning_tokens=10, image_tokens=0,
                       terminal_event="response.completed", client_disconnected=False,
                       started_at=1764139290.123, duration_ms=2500).to_dict()
    base.update(overrides)
    return base


RECORDS = [record(), record(response_id=None, model=None, input_tokens=5, output_tokens=1, total_tokens=6,
                            cached_tokens=0, reasoning_tokens=0, image_tokens=64,
                            terminal_event="wsrelay.drain_timeout", client_disconnected=True)]


def test_json_has_exactly_the_report_fields_and_iso_timestamps():
    rows = json.loads(format_records(RECORDS, "json"))
    assert [tuple(r) for r in rows] == [FIELDS, FIELDS]
    assert rows[0]["started_at"] == "2025-11-26T06:41:30.123Z"
    assert rows[1]["client_disconnected"] is True and rows[1]["response_id"] is None
    assert rows[0]["input_tokens"] == 100


def test_csv_has_a_header_and_one_row_per_record():
    rows = list(csv.reader(io.StringIO(format_records(RECORDS, "csv"))))
    assert rows[0] == list(FIELDS)
    assert len(rows) == 3
    assert rows[2][FIELDS.index("response_id")] == ""
    assert rows[2][FIELDS.index("client_disconnected")] == "true"
    assert rows[1][FIELDS.index("total_tokens")] == "140"


def test_table_is_aligned_and_ends_with_a_total_row():
    lines = format_records(RECORDS, "table").splitlines()
    assert lines[0].split() == list(FIELDS)
    total = lines[-1].split()
    assert total[0] == "TOTAL"
    assert total[1:] == ["105", "41", "146", "30", "10", "64"]
    # Numbers are right-aligned, so every token column ends at the same offset.
    col = lines[0].index("total_tokens") + len("total_tokens")
    for line in (lines[2], lines[3], lines[-1]):
        assert line[col - 1].isdigit() and (len(line) == col or line[col] == " ")


def test_table_of_no_records_still_totals_zero():
    lines = format_records([], "table").splitlines()
    assert lines[-1].split() == ["TOTAL", "0", "0", "0", "0", "0", "0"]


def test_usage_record_objects_are_accepted_too():
    rows = json.loads(format_records([UsageRecord(response_id="r", started_at=0.0)], "json"))
    assert rows[0]["response_id"] == "r" and rows[0]["started_at"] == "1970-01-01T00:00:00.000Z"


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        format_records(RECORDS, "xml")


def test_group_by_key_model_and_day_sums_turns_and_tokens():
    records = RECORDS + [record(response_id="resp_3", started_at=1764139290.123 + 86400)]
    rows = json.loads(format_records(records, "json", ("key", "model", "day")))
    assert [(r["key_id"], r["model"], r["day"], r["turns"]) for r in rows] == [
        ("k1", "gpt-test", "2025-11-26", 1), ("k1", "gpt-test", "2025-11-27", 1), ("k1", None, "2025-11-26", 1)]
    by_day = {r["day"]: r for r in json.loads(format_records(records, "json", ("day",)))}
    assert by_day["2025-11-26"]["turns"] == 2 and by_day["2025-11-26"]["input_tokens"] == 105
    assert by_day["2025-11-26"]["disconnected_turns"] == 1 and by_day["2025-11-26"]["image_tokens"] == 64
    assert by_day["2025-11-27"]["turns"] == 1 and by_day["2025-11-27"]["total_tokens"] == 140


def test_grouped_table_ends_with_totals_of_every_sum_column():
    text = format_records(RECORDS, "table", ("model",))
    header, rule, *rows, rule2, total = text.rstrip("\n").split("\n")
    assert header.split() == ["model", "turns", "input_tokens", "output_tokens", "total_tokens", "cached_tokens",
                              "reasoning_tokens", "image_tokens", "disconnected_turns"]
    assert total.split() == ["TOTAL", "2", "105", "41", "146", "30", "10", "64", "1"]


def test_grouped_csv_has_the_group_and_sum_columns():
    rows = list(csv.reader(io.StringIO(format_records(RECORDS, "csv", ("event",)))))
    assert rows[0][:2] == ["terminal_event", "turns"]
    assert sorted(r[0] for r in rows[1:]) == ["response.completed", "wsrelay.drain_timeout"]


def test_group_by_instance_sums_each_relay_process_apart():
    records = [record(instance="relay-a:101"), record(instance="relay-b:202"), record(instance="relay-a:101"),
               record(instance=None)]
    rows = json.loads(format_records(records, "json", ("instance",)))
    assert [(r["instance"], r["turns"]) for r in rows] == [("relay-a:101", 2), ("relay-b:202", 1), (None, 1)]


def test_grouping_by_an_unknown_key_is_refused():
    with pytest.raises(ValueError, match="cannot group by colour"):
        format_records(RECORDS, "json", ("colour",))


@pytest.mark.parametrize("text, expected", [
    ("24h", 1000000 - 86400), ("30m", 1000000 - 1800), ("7d", 1000000 - 7 * 86400), ("90s", 1000000 - 90),
    ("1.5h", 1000000 - 5400), ("2025-11-26", 1764115200), ("2025-11-26T06:00:00", 1764136800),
    ("2025-11-26T06:00:00Z", 1764136800), ("1764139290.5", 1764139290.5),
])
def test_since_accepts_durations_dates_and_epochs(text, expected):
    assert parse_since(text, now=1000000) == expected


def test_since_rejects_anything_else_with_a_message():
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday")
