"""Structured trace lines: one ``key=value`` line per life-cycle stage.

``ts=2026-11-26T06:41:30.123Z stage=downstream_ping_ok session=3f2a direction=downstream_keepalive graceful=true``

Values are written bare when they are simple tokens and JSON-quoted otherwise, so a line always splits back into
its fields (:func:`parse_line`).  Callers never pass secrets: keys
are only ever named by their key_id, and request headers are not traced.
"""

import atexit
import json
import re
import sys
import threading
import time

import gevent
from gevent import monkey

_BARE = re.compile(r"[A-Za-z0-9_\-.:/@+]+\Z").match  # values written without quotes


def _format_value(value):
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        value = "%.6g" % value
    text = str(value)
    if _BARE(text):
        return text
    return json.dumps(text)


_last_second = (None, "")  # the last whole second formatted, and its text (strftime costs more than a line's rest)


def _stamp(now):
    global _last_second
    second = int(now)
    cached = _last_second  # one read: the usage store's thread may replace it meanwhile
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return "%s.%03dZ" % (cached[1], int((now - second) * 1000))


def format_line(stage, fields, now=None):
    now = time.time() if now is None else now
    parts = ["ts=" + _stamp(now), "stage=" + _format_value(stage)]
    parts.extend("%s=%s" % (key, _format_value(value)) for key, value in fields.items())
    return " ".join(parts)


def parse_line(line):
    """Split a trace line back into a dict of strings (the inverse of :func:`format_line`)."""
    out, i, n = {}, 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            decoder = json.JSONDecoder()
            value, end = decoder.raw_decode(line, i)
            i = end
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            value, i = line[i:end], end
        out[key] = value
    return out


_native_thread_id = monkey.get_original("_thread", "get_ident")


class Tracer:
    """Writes trace lines to a stream (standard error by default) or appends them to ``path``.

    Lines emitted by the hub's thread within one turn of the event loop go out in one write at its end (a
    handshake emits several); lines from other threads (the usage store's) are written at once, and so is every
    line when ``immediate`` (a process with no event loop running, such as gunicorn's arbiter).  ``context``
    fields go on every line, after the stage (``worker=<pid>`` when several processes share one trace).
    """

    def __init__(self, stream=None, path=None, context=None, immediate=False):
        self._path = path
        self.context = dict(context or {})
        self.immediate = immediate
        self._stream = open(path, "a", encoding="utf-8") if path else (stream or sys.stderr)
        self._lock = threading.Lock()
        self._pending = []
        self._hub_thread = _native_thread_id()
        self.listeners = []
        atexit.register(self.flush)  # lines of the loop's last turn, when the process ends inside it

    def emit(self, stage, **fields):
        line = format_line(stage, dict(self.context, **fields) if self.context else fields)
        for listener in self.listeners:
            listener(stage, fields)
        with self._lock:
            self._pending.append(line)
            if len(self._pending) > 1:
                return  # a flush is already due
        if _native_thread_id() == self._hub_thread and not self.immediate:
            gevent.get_hub().loop.run_callback(self.flush)
        else:
            self.flush()

    def flush(self):
        with self._lock:
            lines, self._pending = self._pending, []
            if not lines:
                return
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken trace stream must never take a session down

    def close(self):
        self.flush()
        if self._path:
            self._stream.close()


class NullTracer:
    """A tracer that writes nothing (tests and library use); its listeners still hear every line."""

    def __init__(self):
        self.listeners = []

    def emit(self, stage, **fields):
        for listener in self.listeners:
            listener(stage, fields)

    def flush(self):
        pass

    def close(self):
        pass
