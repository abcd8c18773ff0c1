"""The usage table in SQLite, derived from :class:`wsrelay.usage.UsageRecord` (the one declaration of a record's
fields): its columns and types, the insert, and the columns a database made by an older wsrelay lacks."""

from wsrelay import usage

COLUMNS = usage.RECORD_FIELDS
BOOL_COLUMNS = frozenset(name for name, kind in usage.FIELD_TYPES.items() if kind is bool)


def _column_type(name):
    """The SQLite type of a record field: text (nullable where the record allows None), counts and flags as
    integers, times as reals."""
    kind = usage.FIELD_TYPES[name]
    if name == "record_id":
        return "TEXT PRIMARY KEY"
    if kind is str:
        if name in usage.NULLABLE_FIELDS:
            return "TEXT"
        default = usage.UsageRecord.__dataclass_fields__[name].default
        return "TEXT NOT NULL DEFAULT '%s'" % default if default else "TEXT NOT NULL"
    if kind is float:
        return "REAL NOT NULL"
    return "INTEGER NOT NULL DEFAULT 0"


SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
%s
);
CREATE INDEX IF NOT EXISTS usage_started_at ON usage (started_at);
""" % ",\n".join("    %s %s" % (name, _column_type(name)) for name in COLUMNS)
INSERT = "INSERT OR IGNORE INTO usage (%s) VALUES (%s)" % (", ".join(COLUMNS), ", ".join("?" * len(COLUMNS)))


def add_new_columns(conn):
    """A database made by an older wsrelay lacks the record's newer fields: add them (older rows get the
    field's default)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
    for name in COLUMNS:
        if name not in have:
            conn.execute("ALTER TABLE usage ADD COLUMN %s %s" % (name, _column_type(name)))


def as_row(d):
    """A record (as a dict) as the row INSERT takes."""
    return tuple(int(d[c]) if c in BOOL_COLUMNS else d[c] for c in COLUMNS)
