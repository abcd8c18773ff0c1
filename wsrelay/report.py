"""Usage records rendered for ``wsrelay usage``: JSON for programs, CSV for spreadsheets, a table for people."""

import csv
import io
import json
import time

FIELDS = ("response_id", "model", "key_id", "input_tokens", "output_tokens", "total_tokens", "cached_tokens",
          "reasoning_tokens", "image_tokens", "terminal_event", "client_disconnected", "started_at", "duration_ms")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
                "image_tokens")
FORMATS = ("table", "json", "csv")
_INT_FIELDS = frozenset(TOKEN_FIELDS + ("duration_ms",))


def iso_utc(epoch):
    """``2026-11-26T06:41:30.123Z``; None stays None."""
    if epoch is None:
        return None
    epoch = float(epoch)
    millis = int(round(epoch * 1000))
    seconds, ms = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % ms


def _as_int(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _normalise(record):
    if hasattr(record, "to_dict"):
        record = record.to_dict()
    out = {}
    for name in FIELDS:
        value = record.get(name)
        if name in _INT_FIELDS:
            value = _as_int(value)
        elif name == "client_disconnected":
            value = bool(value)
        elif name == "started_at":
            value = iso_utc(value)
        out[name] = value
    return out


def format_records(records, fmt):
    """``records`` (dicts with the usage fields) as ``fmt``: "json", "table" or "csv"."""
    rows = [_normalise(r) for r in records]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return _csv(rows)
    if fmt == "table":
        return _table(rows)
    raise ValueError("unknown format %r (choose one of %s)" % (fmt, ", ".join(FORMATS)))


def _csv(rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for row in rows:
        writer.writerow([_csv_value(row[f]) for f in FIELDS])
    return buf.getvalue()


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(rows):
    cells = [[_cell(row[f]) for f in FIELDS] for row in rows]
    totals = {f: sum(row[f] for row in rows) for f in TOKEN_FIELDS}
    total_row = [("TOTAL" if i == 0 else str(totals[f]) if f in totals else "") for i, f in enumerate(FIELDS)]
    widths = [max([len(f)] + [len(c[i]) for c in cells + [total_row]]) for i, f in enumerate(FIELDS)]
    numeric = [f in _INT_FIELDS for f in FIELDS]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(list(FIELDS)), rule]
    out.extend(line(c) for c in cells)
    out.extend([rule, line(total_row)])
    return "\n".join(out) + "\n"
