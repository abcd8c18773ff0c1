"""Database URLs (``usage.database_url``): which ones are PostgreSQL's, and their secrets kept out of every line
wsrelay writes (trace, errors, ``check-config``).

A libpq URL may carry a password in its user part (``postgresql://user:secret@host/db``) or as a ``password``
parameter (``?password=secret``); both are replaced by ``***`` wherever the URL or a message quoting it is shown.
"""

import importlib.util
from urllib.parse import parse_qsl, unquote, urlsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MASK = "***"


def is_postgres(url):
    return isinstance(url, str) and url.lower().startswith(POSTGRES_SCHEMES)


def secrets(url):
    """The passwords ``url`` carries, as written and decoded (longest first)."""
    found = set()
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return []
    userinfo, at, _ = netloc.rpartition("@")
    if at and ":" in userinfo:
        found.add(userinfo.split(":", 1)[1])
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "password":
            found.add(value)
    for part in parts.query.split("&"):
        name, eq, value = part.partition("=")
        if eq and unquote(name) == "password":
            found.add(value)
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text, url):
    """``text`` with every password of ``url`` replaced by ``***``."""
    text = str(text)
    for secret in secrets(url):
        text = text.replace(secret, MASK)
    return text


def redact(url):
    """``url`` fit to be shown: its passwords replaced by ``***``."""
    return scrub(url, url)


def problems(url):
    """What is wrong with ``usage.database_url`` (the URL shown redacted); empty when it is usable or unset."""
    if not url:
        return []
    if not is_postgres(url):
        return ["usage.database_url: must start with postgresql:// or postgres://, got %r" % redact(url)]
    if importlib.util.find_spec("psycopg") is None:
        return ["usage.database_url: PostgreSQL needs psycopg: pip install 'wsrelay[postgres]'"]
    return []
