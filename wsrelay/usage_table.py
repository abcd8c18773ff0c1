"""The usage table, derived from :class:`wsrelay.usage.UsageRecord` (the one declaration of a record's fields): its
columns and their types in SQLite and in PostgreSQL, and the columns a database made by an older wsrelay lacks."""

from wsrelay import usage

COLUMNS = usage.RECORD_FIELDS
BOOL_COLUMNS = frozenset(name for name, kind in usage.FIELD_TYPES.items() if kind is bool)

# The types a field's Python type maps to: (SQLite, PostgreSQL).
_TYPES = {str: ("TEXT", "TEXT"), int: ("INTEGER", "BIGINT"), bool: ("INTEGER", "BOOLEAN"),
          float: ("REAL", "DOUBLE PRECISION")}
_FALSE = {"sqlite": "0", "postgresql": "false"}


def column_type(name, dialect="sqlite"):
    """The column type of a record field in ``dialect`` ("sqlite" or "postgresql"): text (nullable where the
    record allows None), counts as integers, flags as integers (SQLite) or booleans, times as floats."""
    kind = usage.FIELD_TYPES[name]
    sql = _TYPES[kind][dialect == "postgresql"]
    if name == "record_id":
        return sql + " PRIMARY KEY"
    if name in usage.NULLABLE_FIELDS:
        return sql
    if kind is str:
        default = usage.UsageRecord.__dataclass_fields__[name].default
        return "%s NOT NULL DEFAULT '%s'" % (sql, default) if default else sql + " NOT NULL"
    if kind is float:
        return sql + " NOT NULL"
    return "%s NOT NULL DEFAULT %s" % (sql, _FALSE[dialect] if kind is bool else "0")


def create_table(dialect):
    """``CREATE TABLE IF NOT EXISTS usage`` with every field, and the index on ``started_at``."""
    columns = ",\n".join("    %s %s" % (name, column_type(name, dialect)) for name in COLUMNS)
    return ("CREATE TABLE IF NOT EXISTS usage (\n%s\n);\n"
            "CREATE INDEX IF NOT EXISTS usage_started_at ON usage (started_at);\n" % columns)


def missing_columns(have, dialect):
    """``ALTER TABLE`` statements adding the fields a table with the columns ``have`` lacks (older rows get the
    field's default)."""
    return ["ALTER TABLE usage ADD COLUMN %s %s" % (name, column_type(name, dialect))
            for name in COLUMNS if name not in have]


SCHEMA = create_table("sqlite")
INSERT = "INSERT OR IGNORE INTO usage (%s) VALUES (%s)" % (", ".join(COLUMNS), ", ".join("?" * len(COLUMNS)))


def add_new_columns(conn):
    """A SQLite database made by an older wsrelay lacks the record's newer fields: add them."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
    for statement in missing_columns(have, "sqlite"):
        conn.execute(statement)


def as_row(d):
    """A record (as a dict) as the row the SQLite INSERT takes."""
    return tuple(int(d[c]) if c in BOOL_COLUMNS else d[c] for c in COLUMNS)
