"""Soak load client: one process holding N concurrent, churning WebSocket sessions against the relay.

Started by ``soak/run`` (one process per ``--clients``); not meant to be run by hand, though it can be::

    python soak/client.py --url ws://127.0.0.1:8080/v1/responses --sessions 100 --first-worker 0 \
        --duration 10 --out client-0.json

Each worker (one greenlet) loops until the phase ends: handshake with its own relay key
(``Authorization: Bearer soak-<n>``), 1-3 turns (``response.create`` -> read until ``response.completed``,
answering every Ping with a Pong) with 0..``--think`` s of idling between two turns (Pings still answered),
then, depending on its role (``n % 4``):

* 0, 1  ``clean``     close frame 1000, wait for the relay's close in reply, close the socket;
* 2     ``drop_fin``  in its last turn, right after the first ``response.output_text.delta``: close the TCP
                      socket without a close frame (FIN);
* 3     ``drop_rst``  the same with SO_LINGER 0 (RST).

No new turn starts once the phase is over (a drop worker then closes cleanly instead), so a phase overruns by
at most one turn.  Everything is counted; the response ids of the turns whose ``response.created`` arrived
(and of the dropped ones) go to ``--out`` so the runner can match them against the usage records.

Only gevent and the standard library: the client does its own RFC 6455 framing so it does not depend on the
code under test.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
ROLES = ("clean", "clean", "drop_fin", "drop_rst")


class SessionEnded(Exception):
    """The session cannot go on; ``kind`` says why (an error counter name)."""

    def __init__(self, kind):
        super().__init__(kind)
        self.kind = kind


class IdleOver(Exception):
    """The idle time between two turns is over."""


class Refused(Exception):
    def __init__(self, kind):
        super().__init__(kind)
        self.kind = kind


def mask(payload, key):
    n = len(payload)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def frame(opcode, payload=b""):
    """A masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + mask(payload, key)


class Conn:
    """A client WebSocket over a raw socket: frames in, masked frames out, Pings answered while reading."""

    def __init__(self, sock, initial, stats, timeout):
        self.sock = sock
        self.buf = bytearray(initial)
        self.stats = stats
        self.close_sent = False
        self.timeout = timeout
        self.idle_until = None

    def send(self, opcode, payload=b""):
        self.sock.sendall(frame(opcode, payload))

    def _frame(self):
        buf = self.buf
        while True:
            n = len(buf)
            if n >= 2:
                b1 = buf[1]
                length = b1 & 0x7F
                hl = 2
                if length == 126:
                    hl = 4
                elif length == 127:
                    hl = 10
                if b1 & 0x80:
                    raise SessionEnded("protocol_masked_server_frame")
                if n >= hl:
                    if length == 126:
                        length = struct.unpack_from("!H", buf, 2)[0]
                    elif length == 127:
                        length = struct.unpack_from("!Q", buf, 2)[0]
                    if n >= hl + length:
                        b0 = buf[0]
                        payload = bytes(buf[hl:hl + length])
                        del buf[:hl + length]
                        return bool(b0 & 0x80), b0 & 0x0F, payload
            if self.idle_until is None:
                chunk = self.sock.recv(65536)
            else:
                left = self.idle_until - time.monotonic()
                if left <= 0:
                    raise IdleOver()
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    raise IdleOver()
                finally:
                    self.sock.settimeout(self.timeout)
            if not chunk:
                raise EOFError()
            buf += chunk

    def idle(self, seconds):
        """Stay silent for ``seconds`` between turns, still answering the relay's Pings."""
        self.idle_until = time.monotonic() + seconds
        try:
            self.message()
        except IdleOver:
            return
        finally:
            self.idle_until = None
        raise SessionEnded("message_between_turns")

    def message(self):
        """The next data message's payload; answers Pings; raises SessionEnded on a close frame."""
        parts = []
        while True:
            fin, opcode, payload = self._frame()
            if opcode == OP_PING:
                self.stats["pings"] += 1
                self.send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if not self.close_sent:
                    try:
                        self.send(OP_CLOSE, payload[:2])
                    except OSError:
                        pass
                    self.close_sent = True
                raise SessionEnded("relay_closed_%d" % code)
            parts.append(payload)
            if fin:
                return b"".join(parts)


def handshake(host, port, path, key_no, timeout):
    # An IP literal, connected directly: socket.create_connection() would resolve it through gevent's thread
    # pool on every call, and under load that queue, not the relay, would dominate the handshake time.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        request = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\nAuthorization: Bearer soak-%d\r\n"
                   "User-Agent: wsrelay-soak\r\n\r\n" % (path, host, port, key, key_no))
        sock.sendall(request.encode("ascii"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise Refused("handshake_eof")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode("ascii", "replace") if b" " in head else "?"
        if status != "101":
            raise Refused("refused_%s" % status)
        return sock, rest
    except BaseException:
        sock.close()
        raise


class Worker:
    def __init__(self, n, opts, stats, created, dropped, rng):
        self.n = n
        self.role = ROLES[n % 4]
        self.opts = opts
        self.stats = stats
        self.created = created
        self.dropped = dropped
        self.rng = rng

    def run(self, start_delay):
        gevent.sleep(start_delay)
        opts = self.opts
        while time.monotonic() < opts.deadline:
            t0 = time.monotonic()
            try:
                sock, initial = handshake(opts.host, opts.port, opts.path, self.n, opts.turn_timeout)
            except Refused as exc:
                self.stats["handshake_failures"] += 1
                self.stats["handshake_" + exc.kind] += 1
                gevent.sleep(self.rng.uniform(0.2, 0.5))
                continue
            except (OSError, socket.timeout) as exc:
                self.stats["handshake_failures"] += 1
                self.stats["handshake_" + _os_kind(exc)] += 1
                gevent.sleep(self.rng.uniform(0.2, 0.5))
                continue
            self.stats["handshakes"] += 1
            opts.handshake_ms.append((time.monotonic() - t0) * 1000.0)
            try:
                self.session(Conn(sock, initial, self.stats, opts.turn_timeout))
            finally:
                sock.close()

    def session(self, conn):
        stats = self.stats
        turns = self.rng.randint(1, self.opts.max_turns)
        try:
            for i in range(turns):
                if i and self.opts.think:
                    left = max(0.0, self.opts.deadline - time.monotonic())
                    conn.idle(min(self.rng.uniform(0, self.opts.think), left))
                if i and time.monotonic() >= self.opts.deadline:
                    break  # the phase is over: no new turn, leave cleanly
                drop = self.role != "clean" and i == turns - 1
                if self.turn(conn, drop):
                    return
            self.close(conn)
        except SessionEnded as exc:
            stats["errors"] += 1
            stats["error_" + exc.kind] += 1
        except EOFError:
            stats["errors"] += 1
            stats["error_eof"] += 1
        except (OSError, socket.timeout) as exc:
            stats["errors"] += 1
            stats["error_" + _os_kind(exc)] += 1

    def turn(self, conn, drop):
        """One turn; True if the session was dropped (the socket is then already closed)."""
        stats = self.stats
        request = {"type": "response.create", "model": "gpt-soak",
                   "input": [{"role": "user", "content": [{"type": "input_text", "text": "soak %d" % self.n}]}]}
        t0 = time.monotonic()
        conn.send(OP_TEXT, json.dumps(request, separators=(",", ":")).encode("ascii"))
        stats["turns_sent"] += 1
        response_id = None
        try:
            while True:
                payload = conn.message()
                try:
                    event = json.loads(payload)
                    kind = event.get("type")
                except (ValueError, AttributeError):
                    raise SessionEnded("bad_message")
                if kind == "response.created":
                    response_id = event["response"]["id"]
                    self.created.append(response_id)
                    stats["turns_created"] += 1
                elif kind == "response.output_text.delta":
                    if drop and response_id is not None:
                        self.drop(conn)
                        self.dropped.append((response_id, self.role))
                        stats["turns_dropped"] += 1
                        stats["turns_dropped_" + self.role[5:]] += 1
                        return True
                elif kind == "response.completed":
                    stats["turns_completed"] += 1
                    self.opts.turn_ms.append((time.monotonic() - t0) * 1000.0)
                    return False
                elif kind in ("error", "response.failed", "response.incomplete", "response.cancelled"):
                    raise SessionEnded("event_" + kind)
        except BaseException:
            # The turn ends without its terminal event: either response.created was seen (the relay must still
            # bill it) or not (the relay bills it too if the request reached the upstream).
            stats["turns_broken" if response_id is not None else "turns_unacknowledged"] += 1
            raise

    def drop(self, conn):
        sock = conn.sock
        try:
            if self.role == "drop_rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)  # a FIN, whatever is still unread in the receive buffer
        except OSError:
            pass
        sock.close()

    def close(self, conn):
        conn.send(OP_CLOSE, struct.pack("!H", 1000))
        conn.close_sent = True
        deadline = time.monotonic() + self.opts.close_wait
        try:
            with gevent.Timeout(self.opts.close_wait):
                while time.monotonic() < deadline:
                    conn.message()  # anything before the close reply is read and ignored
        except SessionEnded as exc:
            if exc.kind == "relay_closed_1000":
                self.stats["clean_closes"] += 1
                return
            raise
        except gevent.Timeout:
            raise SessionEnded("close_reply_timeout")


def _os_kind(exc):
    if isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, BrokenPipeError):
        return "broken_pipe"
    return "oserror_%s" % (getattr(exc, "errno", None) or type(exc).__name__)


def percentiles(values):
    if not values:
        return {"count": 0}
    values = sorted(values)

    def at(q):
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    return {"count": len(values), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(values[-1], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--sessions", type=int, required=True, help="concurrent sessions (workers)")
    parser.add_argument("--first-worker", type=int, default=0, help="global number of the first worker")
    parser.add_argument("--duration", type=float, required=True, help="seconds workers keep starting turns")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the workers start")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--think", type=float, default=0.0,
                        help="idle 0..THINK seconds between two turns of a session (Pings still answered)")
    parser.add_argument("--turn-timeout", type=float, default=30.0, help="longest wait for any frame")
    parser.add_argument("--close-wait", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hostport, _, path = opts.url[len("ws://"):].partition("/")
    host, _, port = hostport.partition(":")
    opts.host, opts.port, opts.path = host, int(port), "/" + path
    opts.handshake_ms, opts.turn_ms = [], []
    started = time.monotonic()
    opts.deadline = started + opts.duration

    stats = collections.Counter()
    created, dropped = [], []
    rng = random.Random(opts.seed)
    workers = [Worker(opts.first_worker + i, opts, stats, created, dropped, random.Random(rng.random()))
               for i in range(opts.sessions)]
    greenlets = [gevent.spawn(w.run, opts.ramp * i / max(1, opts.sessions)) for i, w in enumerate(workers)]
    lag_ms = []

    def measure_lag():  # how late this process's event loop wakes a 100 ms sleeper (its own Pong latency)
        while True:
            t = time.monotonic()
            gevent.sleep(0.1)
            lag_ms.append((time.monotonic() - t - 0.1) * 1000.0)

    lag = gevent.spawn(measure_lag)
    # A worker overruns the phase by at most one turn plus a close; past this bound it is stuck: stop it.
    bound = opts.duration + opts.ramp + opts.turn_timeout + opts.close_wait + 10
    gevent.joinall(greenlets, timeout=max(0.0, started + bound - time.monotonic()))
    lag.kill()
    stuck = sum(1 for g in greenlets if not g.dead)
    gevent.killall(greenlets, timeout=5)
    crashed = [repr(g.exception) for g in greenlets if g.exception is not None and
               not isinstance(g.exception, gevent.GreenletExit)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "first_worker": opts.first_worker,
        "sessions": opts.sessions,
        "elapsed_s": round(time.monotonic() - started, 3),
        "stats": dict(stats),
        "stuck_workers": stuck,
        "crashed_workers": crashed[:20],
        "crashed_count": len(crashed),
        "handshake_ms": percentiles(opts.handshake_ms),
        "turn_ms": percentiles(opts.turn_ms),
        "loop_lag_ms": percentiles(lag_ms),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "created_ids": created,
        "dropped": dropped,
    }
    tmp = opts.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, opts.out)
    return 0 if not stuck and not crashed else 3


if __name__ == "__main__":
    sys.exit(main())
