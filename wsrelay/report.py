"""Usage records rendered for ``wsrelay usage``: JSON for programs, CSV for spreadsheets, a table for people."""

import calendar
import csv
import io
import json
import time

from .usage import FIELD_TYPES, TOKEN_FIELDS
from .usage import REPORT_FIELDS as FIELDS

FORMATS = ("table", "json", "csv")
_INT_FIELDS = frozenset(name for name in FIELDS if FIELD_TYPES[name] is int)


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
        kind = FIELD_TYPES[name]
        if kind is int:
            value = _as_int(value)
        elif kind is bool:
            value = bool(value)
        elif kind is float:  # a time: started_at
            value = iso_utc(value)
        out[name] = value
    return out


GROUP_KEYS = {"key": "key_id", "model": "model", "day": "day", "event": "terminal_event", "account": "account",
              "transport": "transport", "instance": "instance"}
GROUP_SUMS = ("turns",) + TOKEN_FIELDS + ("disconnected_turns",)


def format_records(records, fmt, group_by=()):
    """``records`` (dicts with the usage fields) as ``fmt``: "json", "table" or "csv".

    ``group_by`` (names from :data:`GROUP_KEYS`) sums the records per group instead of listing them.
    """
    if fmt not in FORMATS:
        raise ValueError("unknown format %r (choose one of %s)" % (fmt, ", ".join(FORMATS)))
    if group_by:
        columns, rows = group_records(records, group_by)
        numeric = set(GROUP_SUMS)
    else:
        columns, rows, numeric = FIELDS, [_normalise(r) for r in records], _INT_FIELDS
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return _csv(rows, columns)
    return _table(rows, columns, numeric)


def group_records(records, group_by):
    """``(columns, rows)``: one row per distinct value of the ``group_by`` keys, with the turn count and the
    token sums, ordered by group."""
    unknown = [g for g in group_by if g not in GROUP_KEYS]
    if unknown:
        raise ValueError("cannot group by %s (choose from %s)" % (", ".join(unknown), ", ".join(GROUP_KEYS)))
    keys = [GROUP_KEYS[g] for g in group_by]
    groups = {}
    for record in records:
        row = _normalise(record)
        row["day"] = (row["started_at"] or "")[:10] or None
        group = tuple(row[k] for k in keys)
        sums = groups.setdefault(group, dict.fromkeys(GROUP_SUMS, 0))
        sums["turns"] += 1
        sums["disconnected_turns"] += int(row["client_disconnected"])
        for name in TOKEN_FIELDS:
            sums[name] += row[name]
    rows = [dict(zip(keys, group), **sums)
            for group, sums in sorted(groups.items(), key=lambda item: [(v is None, str(v)) for v in item[0]])]
    return tuple(keys) + GROUP_SUMS, rows


def parse_since(text, now=None):
    """Epoch seconds for ``--since``: a duration back from now (``90s``, ``30m``, ``24h``, ``7d``), a UTC date or
    date-time (``2026-11-01``, ``2026-11-01T12:00:00``), or epoch seconds."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[-1:] in units:
        try:
            return now - float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    for layout in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(text, layout))
        except ValueError:
            continue
    raise ValueError("--since takes a duration (24h, 7d), a UTC date (2026-11-01[T12:00:00]) or epoch seconds, "
                     "got %r" % text)


def _csv(rows, columns):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row[f]) for f in columns])
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


def _table(rows, columns, numeric):
    cells = [[_cell(row[f]) for f in columns] for row in rows]
    summed = [f for f in columns if f in numeric and f != "duration_ms"]
    totals = {f: sum(row[f] for row in rows) for f in summed}
    total_row = [("TOTAL" if i == 0 else str(totals[f]) if f in totals else "") for i, f in enumerate(columns)]
    widths = [max([len(f)] + [len(c[i]) for c in cells + [total_row]]) for i, f in enumerate(columns)]
    right = [f in numeric for f in columns]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(list(columns)), rule]
    out.extend(line(c) for c in cells)
    out.extend([rule, line(total_row)])
    return "\n".join(out) + "\n"
