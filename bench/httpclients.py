#!/usr/bin/env python3
"""Upstream HTTP clients for wsrelay's HTTP transport under gevent: geventhttpclient vs urllib3.

    bench/httpclients.py [--quick] [--rounds N] [--scenarios a,b,...] [--out results-httpclients.json]

Starts one upstream (Node.js, built-in ``http`` module only) on 127.0.0.1 on a free port and measures, in this
process under ``gevent.monkey.patch_all()`` as in the relay, both clients on the same requests:

* ``small``: keep-alive POSTs of a ~2 KiB JSON body answered with a ~1 KiB JSON body (Content-Length), from 1
  and from 64 greenlets (a pool of as many connections): requests/s, latency p50/p99, client CPU per request;
* ``stream``: one long SSE response (``text/event-stream``, chunked, one chunk per ~200-byte event, written as
  fast as the client takes them): events/s, MB/s, client CPU per event;
* ``first``: time from the start of a request to its first SSE event, the event written as soon as the request
  is in, repeated on a kept connection: p50/p99;
* ``ticks``: one event every 2 ms carrying the upstream's wall clock (sub-millisecond): delay from that stamp to
  the event's arrival in the client, p50/p99.

Each client reads a stream with its lowest-latency call, never a fixed-size blocking read: geventhttpclient's
``HTTPSocketPoolResponse`` extended by ``read_some()`` below (the body bytes its C parser has, after at most one
``recv``: whatever has arrived); urllib3's ``HTTPResponse.stream()`` with ``preload_content=False``, which on a
chunked body yields each chunk as soon as it is complete (here one chunk per event), or with
``--urllib3-read read1`` its ``read1()`` (what has arrived, at most to the end of the current chunk; slower).
The small requests go through geventhttpclient's ``ConnectionPool`` with a request head built here (as the relay,
which forwards a client's headers, would) and through urllib3's ``HTTPConnectionPool.urlopen()``.  The two
clients take turns within every round (the order flips from round to round); the table shows medians over the
rounds.  See bench/README.md.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(ROOT, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")

if (os.path.exists(VENV_PYTHON) and os.path.realpath(sys.prefix) != os.path.realpath(VENV)
        and not os.environ.get("WSRELAY_BENCH_REEXEC")):
    os.environ["WSRELAY_BENCH_REEXEC"] = "1"
    os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__)] + sys.argv[1:])

from gevent import monkey  # noqa: E402

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import geventhttpclient  # noqa: E402
import urllib3  # noqa: E402
from geventhttpclient.connectionpool import ConnectionPool  # noqa: E402
from geventhttpclient.response import HTTPConnectionClosed, HTTPSocketPoolResponse  # noqa: E402

CLIENTS = ("geventhttpclient", "urllib3")
READ_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
BLOCK = 65536            # geventhttpclient's recv size (its default is 4 KiB); urllib3 reads through http.client


def log(msg):
    print("[httpclients %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# -- the upstream -----------------------------------------------------------------------------------------------

UPSTREAM_JS = r"""
'use strict';
const http = require('http');
const { performance } = require('perf_hooks');
const limitSeconds = Number(process.argv[1] || 600);
const now = () => performance.timeOrigin + performance.now();   // wall clock, ms, sub-ms resolution

const small = Buffer.from(JSON.stringify({
  id: 'resp_bench', object: 'response', status: 'completed', model: 'bench',
  output: [{ type: 'message', role: 'assistant', content: [{ type: 'output_text', text: 'x'.repeat(820) }] }],
  usage: { input_tokens: 512, output_tokens: 128, total_tokens: 640 },
}));

function sse(type, obj) { return 'event: ' + type + '\ndata: ' + JSON.stringify(obj) + '\n\n'; }
function delta(i, size) {
  const obj = { type: 'response.output_text.delta', sequence_number: i, item_id: 'msg_bench', output_index: 0,
                content_index: 0, delta: '' };
  const pad = size - Buffer.byteLength(sse(obj.type, obj));
  obj.delta = 'x'.repeat(Math.max(0, pad));
  return sse(obj.type, obj);
}
const completed = (i) => sse('response.completed', { type: 'response.completed', sequence_number: i });
const SSE_HEAD = { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' };

// The long stream is encoded once (one chunk per event, as Node would frame one write per event) and written in
// 64 KiB slices with Node's own framing turned off after the head, so that the upstream does not limit the rate.
const encoded = new Map();
function encodeStream(n, size) {
  const key = n + '/' + size;
  if (!encoded.has(key)) {
    const parts = [];
    const chunk = (s) => { const b = Buffer.from(s); parts.push(Buffer.from(b.length.toString(16) + '\r\n'), b,
                                                               Buffer.from('\r\n')); };
    for (let i = 0; i < n; i++) chunk(delta(i, size));
    chunk(completed(n));
    parts.push(Buffer.from('0\r\n\r\n'));
    encoded.set(key, Buffer.concat(parts));
  }
  return encoded.get(key);
}

function stream(res, n, size) {           // n events as fast as the client takes them
  const body = encodeStream(n, size);
  res.writeHead(200, Object.assign({ 'Transfer-Encoding': 'chunked' }, SSE_HEAD));
  res.chunkedEncoding = false;            // the body is chunked already
  let off = 0;
  const pump = () => {
    while (off < body.length) {
      if (res.destroyed) return;
      const ok = res.write(body.subarray(off, off + 65536));
      off += 65536;
      if (!ok) { res.once('drain', pump); return; }
    }
    res.end();
  };
  pump();
}

function first(res, delay) {              // one event at once, the end `delay` ms later
  res.writeHead(200, SSE_HEAD);
  res.write(delta(0, 200));
  setTimeout(() => { if (!res.destroyed) res.end(completed(1)); }, delay);
}

function ticks(res, n, interval) {        // one stamped event every `interval` ms
  res.writeHead(200, SSE_HEAD);
  let i = 0;
  const timer = setInterval(() => {
    if (res.destroyed) { clearInterval(timer); return; }
    res.write(sse('bench.tick', { type: 'bench.tick', sequence_number: i, t: now() }));
    if (++i >= n) { clearInterval(timer); res.end(completed(n)); }
  }, interval);
}

let connections = 0;
const server = http.createServer((req, res) => {
  let received = 0;
  req.on('data', (c) => { received += c.length; });
  req.on('end', () => {
    const u = new URL(req.url, 'http://upstream');
    const q = (name, dflt) => Number(u.searchParams.get(name) || dflt);
    if (u.pathname === '/small') {
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': small.length });
      res.end(small);
    } else if (u.pathname === '/stream') {
      stream(res, q('n', 1000), q('size', 200));
    } else if (u.pathname === '/first') {
      first(res, q('delay', 3));
    } else if (u.pathname === '/ticks') {
      ticks(res, q('n', 100), q('interval', 2));
    } else if (u.pathname === '/stats') {
      const body = JSON.stringify({ connections, received });
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
      res.end(body);
    } else {
      res.writeHead(404, { 'Content-Length': 0 });
      res.end();
    }
  });
});
server.on('connection', (sock) => { connections++; sock.setNoDelay(true); });
server.keepAliveTimeout = 120000;
server.headersTimeout = 130000;
server.requestTimeout = 0;
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
setTimeout(() => { process.stderr.write('upstream: time limit reached\n'); process.exit(3); }, limitSeconds * 1000)
  .unref();
"""


class Upstream:
    """The Node upstream: exits when our pipe to its stdin closes (this process ending, however) or at its limit."""

    def __init__(self, limit_seconds):
        node = shutil.which("node")
        if not node:
            sys.exit("httpclients: node (Node.js) is not on PATH")
        self.node = node
        self.popen = subprocess.Popen([node, "-e", UPSTREAM_JS, str(int(limit_seconds))], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)
        with gevent.Timeout(10, RuntimeError("the upstream did not start")):
            line = self.popen.stdout.readline()
        self.port = json.loads(line)["port"]

    def connections(self):
        """Connections the upstream has accepted so far (this query's own included)."""
        pool = urllib3.HTTPConnectionPool("127.0.0.1", self.port, retries=False, timeout=CONNECT_TIMEOUT)
        try:
            return json.loads(pool.request("GET", "/stats").data)["connections"] - 1
        finally:
            pool.close()

    def stop(self):
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
                self.popen.wait(timeout=3)
            except Exception:   # it did not go: make it
                self.popen.kill()
                self.popen.wait()


# -- the two clients, behind the same three calls ---------------------------------------------------------------


class StreamResponse(HTTPSocketPoolResponse):
    """HTTPSocketPoolResponse plus the call a relay needs: body bytes as soon as there are some."""

    def read_some(self):
        """The body bytes parsed so far, after at most one ``recv`` when there are none; b"" at the end."""
        buf = self._body_buffer
        while not buf:
            if self.message_complete:
                return b""
            sock = self._sock
            if sock is None:
                raise HTTPConnectionClosed("connection closed.")
            try:
                data = sock.recv(self.block_size)
                self.feed(data)
                if not data and not self.message_complete:
                    raise HTTPConnectionClosed("connection closed before the end of the body")
            except BaseException:
                self.release()
                raise
        data = bytes(buf)
        del buf[:]
        return data


class GeventHTTPClient:
    name = "geventhttpclient"

    def __init__(self, port, size):
        self.pool = ConnectionPool("127.0.0.1", port, "127.0.0.1", port, size=size,
                                   connection_timeout=CONNECT_TIMEOUT, network_timeout=READ_TIMEOUT)
        self.head = ("POST %%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: wsrelay-bench\r\n"
                     "Content-Type: application/json\r\nAccept: %%s\r\nContent-Length: %%d\r\n\r\n" % port)

    def _request(self, path, body, accept):
        data = (self.head % (path, accept, len(body))).encode("latin-1") + body
        for attempt in (1, 2):         # a kept connection the upstream has just closed: once more on a new one
            sock = self.pool.get_socket()
            try:
                sock.sendall(data)
            except OSError:
                self.pool.release_socket(sock)
                if attempt == 2:
                    raise
                continue
            try:
                return StreamResponse(sock, self.pool, method="POST", block_size=BLOCK)
            except HTTPConnectionClosed:   # the response released the socket
                if attempt == 2:
                    raise

    def post(self, path, body):
        resp = self._request(path, body, "application/json")
        try:
            return resp.read()
        finally:
            resp.release()

    def stream(self, path, body):
        resp = self._request(path, body, "text/event-stream")
        try:
            read_some = resp.read_some
            while True:
                data = read_some()
                if not data:
                    return
                yield data
        finally:
            resp.release()

    def close(self):
        self.pool.close()


class Urllib3Client:
    name = "urllib3"
    read_call = "stream"       # or "read1" (--urllib3-read)

    def __init__(self, port, size):
        self.pool = urllib3.HTTPConnectionPool(
            "127.0.0.1", port, maxsize=size, block=True, retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT))
        self.headers = {"User-Agent": "wsrelay-bench", "Content-Type": "application/json"}
        self.sse_headers = dict(self.headers, Accept="text/event-stream")
        self.json_headers = dict(self.headers, Accept="application/json")

    def post(self, path, body):
        return self.pool.urlopen("POST", path, body=body, headers=self.json_headers, retries=False).data

    def stream(self, path, body):
        resp = self.pool.urlopen("POST", path, body=body, headers=self.sse_headers, retries=False,
                                 preload_content=False)
        try:
            if self.read_call == "read1":
                read1 = resp.read1
                while True:
                    data = read1(BLOCK)
                    if not data:
                        return
                    yield data
            else:
                yield from resp.stream(BLOCK)
        finally:
            resp.release_conn()

    def close(self):
        self.pool.close()


FACTORIES = {"geventhttpclient": GeventHTTPClient, "urllib3": Urllib3Client}


# -- measurements -----------------------------------------------------------------------------------------------


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q / 100.0 * len(values) + 0.5)) - 1))]


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2.0


def request_body(size=2048):
    """A Responses-shaped JSON request body of ``size`` bytes."""
    doc = {"model": "bench", "stream": True, "input": [{"role": "user", "content": ""}]}
    pad = size - len(json.dumps(doc, separators=(",", ":")))
    doc["input"][0]["content"] = "x" * max(0, pad)
    return json.dumps(doc, separators=(",", ":")).encode()


BODY = request_body()


def small(client_cls, up, cfg, concurrency):
    client = client_cls(up.port, concurrency)
    c0 = up.connections()
    state = {"measure": False, "stop": False}
    lat = []

    def worker():
        post = client.post
        while not state["stop"]:
            t0 = time.perf_counter()
            data = post("/small", BODY)
            t1 = time.perf_counter()
            if len(data) < 1000:
                raise RuntimeError("short answer: %d bytes" % len(data))
            if state["measure"]:
                lat.append(t1 - t0)

    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    try:
        gevent.sleep(cfg.warmup)
        state["measure"] = True
        cpu0, w0 = time.process_time(), time.perf_counter()
        gevent.sleep(cfg.duration)
        state["measure"] = False
        cpu1, w1 = time.process_time(), time.perf_counter()
        state["stop"] = True
        gevent.joinall(workers, timeout=READ_TIMEOUT, raise_error=True)
    finally:
        gevent.killall(workers)
        client.close()
    n = len(lat)
    return {
        "req_per_s": n / (w1 - w0),
        "p50_us": percentile(lat, 50) * 1e6,
        "p99_us": percentile(lat, 99) * 1e6,
        "cpu_us_per_req": (cpu1 - cpu0) / n * 1e6,
        "requests": n,
        "connections_opened": up.connections() - c0 - 1,
    }


def stream(client_cls, up, cfg):
    client = client_cls(up.port, 1)
    c0 = up.connections()
    try:
        path = "/stream?n=%d&size=%d" % (cfg.stream_events, cfg.event_size)
        for _ in client.stream(path, BODY):       # warm-up: opens the connection, has the upstream encode the stream
            pass
        events = nbytes = 0
        tail_nl = False
        cpu0, w0 = time.process_time(), time.perf_counter()
        for data in client.stream(path, BODY):
            nbytes += len(data)
            events += data.count(b"\n\n") + (tail_nl and data[:1] == b"\n")
            tail_nl = data[-1:] == b"\n"
        cpu1, w1 = time.process_time(), time.perf_counter()
    finally:
        client.close()
    if events != cfg.stream_events + 1:
        raise RuntimeError("%s: %d events, expected %d" % (client_cls.name, events, cfg.stream_events + 1))
    return {
        "events_per_s": events / (w1 - w0),
        "mb_per_s": nbytes / (w1 - w0) / 1e6,
        "cpu_us_per_event": (cpu1 - cpu0) / events * 1e6,
        "connections_opened": up.connections() - c0 - 1,
    }


def first_event(client_cls, up, cfg):
    client = client_cls(up.port, 1)
    c0 = up.connections()
    lat = []
    try:
        for i in range(cfg.first_requests + 5):           # the first 5 open the connection and warm up
            t0 = time.perf_counter()
            it = client.stream("/first?delay=%g" % cfg.first_delay_ms, BODY)
            got = b""
            for data in it:
                got += data
                if b"\n\n" in got:
                    break
            t1 = time.perf_counter()
            for data in it:
                got += data
            if got.count(b"\n\n") != 2:
                raise RuntimeError("%s: unexpected body %r" % (client_cls.name, got[:200]))
            if i >= 5:
                lat.append(t1 - t0)
    finally:
        client.close()
    return {
        "p50_us": percentile(lat, 50) * 1e6,
        "p99_us": percentile(lat, 99) * 1e6,
        "connections_opened": up.connections() - c0 - 1,
    }


def ticks(client_cls, up, cfg):
    client = client_cls(up.port, 1)
    delays = []
    try:
        buf = b""
        for data in client.stream("/ticks?n=%d&interval=%g" % (cfg.tick_events, cfg.tick_interval_ms), BODY):
            now = time.time() * 1000.0
            buf += data
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                event, buf = buf[:end], buf[end + 2:]
                if event.startswith(b"event: bench.tick\n"):
                    delays.append(now - json.loads(event.split(b"data: ", 1)[1])["t"])
    finally:
        client.close()
    if len(delays) != cfg.tick_events:
        raise RuntimeError("%s: %d ticks, expected %d" % (client_cls.name, len(delays), cfg.tick_events))
    delays = delays[10:]                                  # the first ones include the connection's start
    return {
        "p50_us": percentile(delays, 50) * 1e3,
        "p99_us": percentile(delays, 99) * 1e3,
    }


# -- reporting --------------------------------------------------------------------------------------------------

# (scenario, key in its result, label, higher is better)
METRICS = [
    ("small_c1", "req_per_s", "small c=1: requests/s", True),
    ("small_c1", "p50_us", "small c=1: latency p50 (us)", False),
    ("small_c1", "p99_us", "small c=1: latency p99 (us)", False),
    ("small_c1", "cpu_us_per_req", "small c=1: client CPU us/request", False),
    ("small_c64", "req_per_s", "small c=64: requests/s", True),
    ("small_c64", "p50_us", "small c=64: latency p50 (us)", False),
    ("small_c64", "p99_us", "small c=64: latency p99 (us)", False),
    ("small_c64", "cpu_us_per_req", "small c=64: client CPU us/request", False),
    ("stream", "events_per_s", "stream: events/s", True),
    ("stream", "mb_per_s", "stream: MB/s", True),
    ("stream", "cpu_us_per_event", "stream: client CPU us/event", False),
    ("first", "p50_us", "first event: p50 (us)", False),
    ("first", "p99_us", "first event: p99 (us)", False),
    ("ticks", "p50_us", "ticks every 2 ms: delay p50 (us)", False),
    ("ticks", "p99_us", "ticks every 2 ms: delay p99 (us)", False),
]


def background_load(seconds=0.3):
    """Cores busy on the whole machine over ``seconds`` while the bench itself sleeps (from /proc/stat)."""
    def sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        total = sum(fields[:8])
        return total - fields[3] - fields[4], total
    s0 = sample()
    gevent.sleep(seconds)
    s1 = sample()
    if s0 is None or s1 is None:
        return None
    return (s1[0] - s0[0]) / max(1, s1[1] - s0[1]) * (os.cpu_count() or 1)


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return "{:,.0f}".format(v)
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.2f" % v


def summarize(runs):
    summary = {}
    for scenario, key, label, higher in METRICS:
        if scenario not in runs[0][CLIENTS[0]]:
            continue
        row = {}
        for name in CLIENTS:
            row[name] = median([r[name][scenario][key] for r in runs])
        g, u = row["geventhttpclient"], row["urllib3"]
        row["geventhttpclient/urllib3"] = g / u if g and u else None
        paired = [r["geventhttpclient"][scenario][key] / r["urllib3"][scenario][key] for r in runs
                  if r["urllib3"][scenario][key]]
        row["geventhttpclient/urllib3 paired"] = median(paired)
        if g and u:
            better = "geventhttpclient" if (g > u) == higher else "urllib3"
            row["better"] = better
            row["factor"] = max(g, u) / min(g, u)
        summary[label] = row
    return summary


def print_table(summary, runs, out=sys.stdout):
    head = ["metric", "geventhttpclient", "urllib3", "ghc/urllib3", "better by"]
    rows = []
    for label, row in summary.items():
        better = "%s x%.2f" % ("ghc" if row.get("better") == "geventhttpclient" else "urllib3",
                               row["factor"]) if row.get("better") else "-"
        rows.append([label, fmt(row["geventhttpclient"]), fmt(row["urllib3"]),
                     fmt(row["geventhttpclient/urllib3"]), better])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)
    loads = [r["background_cpu"] for r in runs if r.get("background_cpu") is not None]
    if loads:
        print("\nmedian of %d rounds; machine busy before each round (cores of %d): %s" % (
            len(runs), os.cpu_count(), " ".join("%.2f" % x for x in loads)), file=out)
    conns = {name: {sc: max(r[name][sc]["connections_opened"] for r in runs)
                    for sc in ("small_c1", "small_c64", "stream", "first") if sc in runs[0][name]}
             for name in CLIENTS}
    print("connections opened per run (keep-alive check): %s" % "; ".join(
        "%s %s" % (name, " ".join("%s=%d" % kv for kv in conns[name].items())) for name in CLIENTS), file=out)


# -- main -------------------------------------------------------------------------------------------------------


def configure(args):
    cfg = argparse.Namespace()
    quick = args.quick
    cfg.rounds = args.rounds or (2 if quick else 3)
    cfg.warmup = 0.3 if quick else 0.5
    cfg.duration = args.duration or (0.8 if quick else 2.0)
    cfg.stream_events = args.stream_events or (5000 if quick else 20000)
    cfg.event_size = 200
    cfg.first_requests = 100 if quick else 300
    cfg.first_delay_ms = 3
    cfg.tick_events = 300 if quick else 1000
    cfg.tick_interval_ms = 2
    return cfg


SCENARIOS = [
    ("small_c1", lambda cls, up, cfg: small(cls, up, cfg, 1)),
    ("small_c64", lambda cls, up, cfg: small(cls, up, cfg, 64)),
    ("stream", stream),
    ("first", first_event),
    ("ticks", ticks),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, the whole run in well under a minute")
    ap.add_argument("--rounds", type=int, help="rounds, the clients alternating within each (3; quick 2)")
    ap.add_argument("--duration", type=float, help="seconds measured per small-request run (2; quick 0.8)")
    ap.add_argument("--stream-events", type=int, help="events in the long stream (20000; quick 5000)")
    ap.add_argument("--scenarios", default=",".join(name for name, _ in SCENARIOS),
                    help="comma-separated subset of: %(default)s")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    ap.add_argument("--urllib3-read", choices=("stream", "read1"), default="stream",
                    help="urllib3's streaming call: stream() (on a chunked body: each chunk as soon as it is "
                         "complete; the default, the faster) or read1() (what has arrived, at most one chunk)")
    args = ap.parse_args()
    scenarios = [(name, fn) for name, fn in SCENARIOS if name in args.scenarios.split(",")]
    unknown = set(args.scenarios.split(",")) - {name for name, _ in SCENARIOS}
    if unknown or not scenarios:
        ap.error("unknown scenarios: %s" % ",".join(sorted(unknown)) if unknown else "no scenario")
    cfg = configure(args)
    cfg.scenarios = [name for name, _ in scenarios]
    cfg.urllib3_read = Urllib3Client.read_call = args.urllib3_read

    started = time.perf_counter()
    up = Upstream(limit_seconds=120 + cfg.rounds * 120)
    runs = []
    try:
        for rnd in range(cfg.rounds):
            order = CLIENTS if rnd % 2 == 0 else CLIENTS[::-1]
            run = {"round": rnd + 1, "order": list(order), "background_cpu": background_load()}
            for name in CLIENTS:
                run[name] = {}
            for scenario, fn in scenarios:
                for name in order:
                    run[name][scenario] = fn(FACTORIES[name], up, cfg)
            runs.append(run)
            log("round %d/%d done (%.0f s)" % (rnd + 1, cfg.rounds, time.perf_counter() - started))
    finally:
        up.stop()

    summary = summarize(runs)
    print_table(summary, runs)
    if args.out:
        result = {
            "environment": {
                "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                "node": subprocess.run([up.node, "--version"], capture_output=True, text=True).stdout.strip(),
                "gevent": gevent.__version__, "geventhttpclient": geventhttpclient.__version__,
                "urllib3": urllib3.__version__,
            },
            "settings": vars(cfg),
            "runs": runs,
            "summary": summary,
            "wall_seconds": time.perf_counter() - started,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        log("wrote %s" % args.out)


if __name__ == "__main__":
    main()
