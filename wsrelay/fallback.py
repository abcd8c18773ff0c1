"""The usage store's fallback file: JSON lines that hold the records while the database cannot be written.

Blocking file I/O, called from the store's thread.  Several relay processes (gunicorn workers) may share one file:
every append, and every import from the reading to the truncation, holds an exclusive ``flock`` on it, so an
import never truncates away records another process appended after it read the file.
"""

import fcntl
import json
import os

from .usage import UsageRecord


def _fsync_dir(path):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parse(raw):
    """(records, skipped) from the file's bytes; skipped lists (line number, reason, text)."""
    records, skipped = [], []
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = lineno == len(lines)  # the last piece has no newline: a write cut short
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            records.append(UsageRecord.from_dict(data).to_dict())
        except (ValueError, TypeError) as exc:
            reason = "torn last line" if torn else "unreadable: %s" % exc
            skipped.append((lineno, reason, line[:4096].decode("utf-8", "replace")))
    return records, skipped


class Claim:
    """The fallback file, locked and read: its ``records`` and ``skipped`` lines.  :meth:`clear` empties it once
    they are in the database; :meth:`release` unlocks it (always call it)."""

    def __init__(self, fh, records, skipped):
        self._fh = fh
        self.records = records
        self.skipped = skipped

    def clear(self):
        if self._fh is not None and (self.records or self.skipped):
            self._fh.truncate(0)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def release(self):
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing drops the lock


class FallbackFile:
    """Append-only JSON lines at ``path`` (None: no fallback file, every append fails)."""

    def __init__(self, path):
        self.path = path

    def append(self, records):
        if not self.path:
            raise OSError("no fallback file configured")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        data = "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in records).encode("utf-8")
        with open(self.path, "ab+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    # A torn line from a crash must not swallow the first record appended after it.
                    data = b"\n" + data
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self.path)

    def read(self):
        """(records, skipped) without locking: what ``wsrelay usage`` shows of the records still waiting."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except (FileNotFoundError, NotADirectoryError, TypeError):
            return [], []
        return parse(raw)

    def claim(self):
        """Lock the file and read it (a :class:`Claim`); appends of other processes wait until it is released."""
        try:
            fh = open(self.path, "r+b")
        except (FileNotFoundError, NotADirectoryError, TypeError):
            return Claim(None, [], [])
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            records, skipped = parse(fh.read())
        except BaseException:
            fh.close()
            raise
        return Claim(fh, records, skipped)
