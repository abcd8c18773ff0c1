"""Trace lines: their format, and how they reach the stream."""

import subprocess
import sys
import time

import gevent

from wsrelay import trace


class CountingStream:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_timestamp_is_utc_with_milliseconds_across_second_boundaries():
    for now in (1795680090.0, 1795680090.999, 1795680091.0005, 1795680089.5, 1795680091.25):
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % int((now % 1) * 1000)
        assert trace.format_line("x", {}, now=now) == "ts=%s stage=x" % expected


def test_lines_of_one_loop_turn_go_out_in_one_write_in_order():
    stream = CountingStream()
    tracer = trace.Tracer(stream=stream)
    for i in range(5):
        tracer.emit("stage_%d" % i, session="s1", n=i)
    assert stream.writes == []  # not yet: at the end of this turn of the loop
    gevent.sleep(0)
    assert len(stream.writes) == 1
    lines = stream.writes[0].splitlines()
    assert [trace.parse_line(line)["stage"] for line in lines] == ["stage_%d" % i for i in range(5)]
    tracer.emit("later")
    gevent.sleep(0)
    assert len(stream.writes) == 2 and "stage=later" in stream.writes[1]


def test_lines_from_another_thread_are_written_at_once():
    stream = CountingStream()
    tracer = trace.Tracer(stream=stream)
    pool = gevent.get_hub().threadpool  # real threads, as the usage store's
    pool.apply(tracer.emit, ("from_thread",))
    assert len(stream.writes) == 1 and "stage=from_thread" in stream.writes[0]


def test_lines_emitted_just_before_the_process_ends_are_not_lost(tmp_path):
    path = tmp_path / "trace.log"
    script = ("from wsrelay import trace\n"
              "t = trace.Tracer(path=%r)\n"
              "t.emit('first')\n"
              "t.emit('last', code=0)\n" % str(path))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    stages = [trace.parse_line(line)["stage"] for line in path.read_text().splitlines()]
    assert stages == ["first", "last"]


def test_a_broken_stream_never_raises():
    class Broken(CountingStream):
        def write(self, text):
            raise OSError("disk full")

    tracer = trace.Tracer(stream=Broken())
    tracer.emit("x")
    tracer.flush()
    gevent.sleep(0)


def test_context_fields_follow_the_stage_on_every_line_and_listeners_get_the_fields_alone():
    stream = CountingStream()
    tracer = trace.Tracer(stream=stream, context={"worker": 4242}, immediate=True)
    heard = []
    tracer.listeners.append(lambda stage, fields: heard.append(fields))
    tracer.emit("dial_ok", key_id="k1")
    tracer.emit("server_listening", worker=4242)  # a field named like the context's is written once
    assert [line.split(" ", 1)[1] for line in "".join(stream.writes).splitlines()] == [
        "stage=dial_ok worker=4242 key_id=k1", "stage=server_listening worker=4242"]
    assert heard == [{"key_id": "k1"}, {"worker": 4242}]


def test_an_immediate_tracer_writes_each_line_without_a_running_loop():
    stream = CountingStream()
    tracer = trace.Tracer(stream=stream, immediate=True)  # (gunicorn's arbiter runs no gevent loop)
    tracer.emit("a")
    assert len(stream.writes) == 1
    tracer.emit("b")
    assert len(stream.writes) == 2
