import csv
import io
import json

import pytest

from wsrelay.report import FIELDS, format_records
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
