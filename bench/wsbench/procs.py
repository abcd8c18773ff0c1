"""Child processes, ports and machine load: the plumbing every other module of the bench uses."""

import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # bench/
ROOT = os.path.dirname(HERE)                                            # the checkout
VENV = os.path.join(ROOT, ".venv")

CLK_TCK = os.sysconf("SC_CLK_TCK")
HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

_PROCS = []          # every process this run started, for cleanup


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def raise_nofile():
    """preexec_fn: children get the soft open-file limit raised to the hard limit."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (HARD_NOFILE, HARD_NOFILE))
    except (ValueError, OSError):
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError("%s exited with %s while starting (see %s)" % (proc.name, proc.popen.returncode,
                                                                            os.path.basename(proc.log_path)))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError("nothing listens on 127.0.0.1:%d after %gs" % (port, timeout))


def http_get_json(port, path, timeout=10.0):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return json.loads(r.read())


# -- processes --------------------------------------------------------------------------------------------------


class Proc:
    """A child process; JSON lines it prints go to a queue, everything else to its log file."""

    def __init__(self, name, argv, log_dir, cwd=None, env=None, json_stdout=True):
        self.name = name
        self.log_path = os.path.join(log_dir, "%s-%d.log" % (name, len(_PROCS)))
        self._log = open(self.log_path, "ab")
        self.lines = queue.Queue()
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE if json_stdout else self._log, stderr=self._log,
                                      preexec_fn=raise_nofile, start_new_session=True)
        self.pid = self.popen.pid
        _PROCS.append(self)
        if json_stdout:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for raw in self.popen.stdout:
                try:
                    self.lines.put(json.loads(raw))
                except ValueError:
                    self._log.write(raw)
        except (OSError, ValueError):  # the process was stopped and its log closed
            pass

    def expect(self, event, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("%s: no %r within %gs" % (self.name, event, timeout))
            try:
                msg = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    raise BenchError("%s exited (%s) before %r" % (self.name, self.popen.returncode, event))
                continue
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "timeout":
                raise BenchError("%s gave up (its own time limit)" % self.name)

    def send(self, line):
        try:
            self.popen.stdin.write((line + "\n").encode())
            self.popen.stdin.flush()
        except (OSError, ValueError):  # gone, or already stopped
            pass

    def cpu_seconds(self):
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return None

    def rss_bytes(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def fd_count(self):
        try:
            return len(os.listdir("/proc/%d/fd" % self.pid))
        except OSError:
            return None

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.send_signal(sig)
            except OSError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self in _PROCS:
            _PROCS.remove(self)
        self._log.close()


def stop_all():
    for proc in list(reversed(_PROCS)):
        try:
            proc.stop(timeout=3.0)
        except Exception:  # cleanup must go on
            pass


def wait_closed(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)


def machine_busy():
    """(busy, total) jiffies over all CPUs from /proc/stat; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def background_load(seconds=0.3):
    """Cores busy on the whole machine over ``seconds`` while the bench itself is idle."""
    m0 = machine_busy()
    time.sleep(seconds)
    m1 = machine_busy()
    return (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * os.cpu_count()


def wait_quiet(ctx):
    """The machine may be shared: wait (bounded) until other work leaves it idle; returns the load seen."""
    deadline = time.monotonic() + ctx.quiet_wait
    load = background_load()
    while load > ctx.quiet_threshold and time.monotonic() < deadline:
        load = background_load(0.5)
    return load
