'use strict';
// Benchmark load generator: raw-socket WebSocket clients (Node built-ins only), one process per instance.
//
// Masking is free: every message is one frame built and masked once at start-up and written again and again
// (RFC 6455 wants a fresh key per frame against cache poisoning by intermediaries; a benchmark on the loopback
// does not care).  Server frames are walked by their headers only; payloads are skipped, never copied.
// Pipelined refills are written with one write per read.
//
// Usage: node loadgen.js '<json spec>'   (see bench/run for the fields).  It talks to the runner with JSON
// lines on standard output and one-word commands on standard input:
//   prints {"event":"ready", ...} once every session is open (and primed when spec.prime is set);
//   "go"     run the measurement (latency / throughput), print {"event":"result", ...}
//   "check"  one round trip on every open session, print {"event":"checked", ...}
//   "report" print {"event":"report", ...}: Pings seen, Pongs sent, broadcast arrival times
//   "close"  close every session with a Close frame (1000), print {"event":"closed", ...} and exit.
// It exits by itself after spec.maxSeconds, or when its standard input closes.
//
// With spec.mode 'sse_ttfb', 'sse_stream' or 'sse_latency' it is an HTTP client of the Responses HTTP transport
// instead (Node's http module, an Agent with keepAlive and spec.conns sockets): POST spec.path with
// {"model", "stream": true, "bench": {"events", "bytes", "interval_ms"}} (the same in x-codex-bench-* headers),
// reading the text/event-stream answer as it arrives.  It prints "ready" at once; "go" runs spec.warmup +
// spec.duration seconds and prints one "result"; "close" drops the kept-alive sockets and exits.  See sseClient.

const net = require('net');

const spec = JSON.parse(process.argv[2]);
const HOST = '127.0.0.1';
const MASK = Buffer.from([0x37, 0xfa, 0x21, 0x3d]);
const now = () => Number(process.hrtime.bigint());   // CLOCK_MONOTONIC ns, shared with the upstream and runner

function maskedFrame(opcode, payload) {
  const n = payload.length;
  const ext = n < 126 ? 0 : n < 65536 ? 2 : 8;
  const f = Buffer.allocUnsafe(2 + ext + 4 + n);
  f[0] = 0x80 | opcode;
  if (n < 126) f[1] = 0x80 | n;
  else if (n < 65536) { f[1] = 0x80 | 126; f.writeUInt16BE(n, 2); }
  else { f[1] = 0x80 | 127; f.writeBigUInt64BE(BigInt(n), 2); }
  MASK.copy(f, 2 + ext);
  const p = 6 + ext;
  for (let i = 0; i < n; i++) f[p + i] = payload[i] ^ MASK[i & 3];
  return f;
}

function messagePayload(size, binary) {
  if (binary) {
    const b = Buffer.allocUnsafe(size);
    for (let i = 0; i < size; i++) b[i] = (i * 31 + 7) & 0xff;
    return b;
  }
  // A Responses-shaped event that is neither a response.create nor a terminal event.
  const headText = '{"type":"response.output_text.delta","delta":"';
  return Buffer.from(headText + 'a'.repeat(Math.max(0, size - headText.length - 2)) + '"}', 'latin1');
}

const size = spec.size || 256;
const FRAME = maskedFrame(spec.binary ? 2 : 1, messagePayload(size, spec.binary));
const WINDOW = Math.max(1, spec.window || 1);
const BATCH = Buffer.concat(Array(WINDOW).fill(FRAME));
const CLOSE = maskedFrame(8, Buffer.from([0x03, 0xe8]));
// 'turns' mode: every session sends a request every spec.turnEvery seconds.  spec.turn 'create' sends a
// response.create (the upstream answers with deltas and a billed response.completed); 'noop' sends a request of
// the same size that no relay takes for a turn (the upstream answers with as many frames of the same sizes).
function turnPayload(kind) {
  const head = kind === 'create' ? '{"type":"response.create","model":"bench","input":"'
                                 : '{"type":"bench.turn","model":"bench","input":"';
  return Buffer.from(head + 'q'.repeat(Math.max(0, 256 - head.length - 2)) + '"}', 'latin1');
}
const TURN = maskedFrame(1, turnPayload(spec.turn || 'create'));
let turnsSent = 0;

const sessions = [];
let received = 0;            // complete echoed/broadcast messages, all sessions
let receivedBytes = 0;       // their payload bytes
let measuring = false;
let latencies = null;        // round trip times (ns) while measuring, latency mode
let pings = 0;
let pongs = 0;
let pingGaps = [];           // ns between a Ping and the previous frame received on its session
let handshakeNs = [];
let failures = 0;
let failureSample = null;

function fail(msg) {
  failures++;
  if (failureSample === null) failureSample = msg;
}

class Session {
  constructor(index) {
    this.index = index;
    this.sock = null;
    this.state = 'connecting';
    this.head = null;
    this.pending = null;
    this.remaining = 0;
    this.opcode = 0;
    this.inflight = 0;
    this.sentAt = 0;
    this.lastRecv = 0;
    this.arrivals = [];
    this.onEcho = null;       // one-shot callback for prime / check
    this.closeSent = false;
    this.done = null;         // close callback
  }

  connect(cb) {
    const started = now();
    this.sock = net.connect({ host: HOST, port: spec.port, noDelay: true });
    this.sock.setNoDelay(true);
    let finished = false;
    const finish = (ok, why) => {
      if (finished) return;
      finished = true;
      if (ok) handshakeNs.push(now() - started); else fail(why);
      cb(ok);
    };
    this.handshakeDone = finish;
    this.sock.on('connect', () => {
      let req = 'GET ' + (spec.path || '/v1/responses') + ' HTTP/1.1\r\nHost: 127.0.0.1:' + spec.port +
        '\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n' +
        'Sec-WebSocket-Version: 13\r\nUser-Agent: wsrelay-bench\r\n';
      if (spec.group) req += 'x-codex-bench-group: ' + spec.group + '\r\n';
      this.sock.write(req + '\r\n');
    });
    this.sock.on('data', (chunk) => this.onData(chunk));
    this.sock.on('error', (err) => { if (this.state === 'connecting') finish(false, err.code || err.message); });
    this.sock.on('close', () => {
      if (this.state === 'connecting') finish(false, 'closed during handshake');
      this.state = 'closed';
      if (this.done) { const d = this.done; this.done = null; d(); }
    });
  }

  onData(chunk) {
    if (this.state === 'connecting') {
      this.head = this.head ? Buffer.concat([this.head, chunk]) : chunk;
      const end = this.head.indexOf('\r\n\r\n');
      if (end < 0) return;
      const status = this.head.subarray(0, 12).toString('latin1');
      const rest = this.head.subarray(end + 4);
      this.head = null;
      if (status !== 'HTTP/1.1 101') {
        this.handshakeDone(false, 'status ' + status.slice(9));
        this.state = 'closed';
        this.sock.destroy();
        return;
      }
      this.state = 'open';
      this.lastRecv = now();
      this.handshakeDone(true);
      if (rest.length === 0) return;
      chunk = rest;
    }
    if (this.pending !== null) { chunk = Buffer.concat([this.pending, chunk]); this.pending = null; }
    const n = chunk.length;
    let p = 0;
    let completed = 0;
    while (p < n) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, n - p);
        p += take;
        this.remaining -= take;
        if (this.remaining === 0) completed += this.message();
        continue;
      }
      if (n - p < 2) break;
      const b0 = chunk[p];
      const b1 = chunk[p + 1];
      let len = b1 & 0x7f;
      let hl = 2;
      if (len === 126) { if (n - p < 4) break; len = chunk.readUInt16BE(p + 2); hl = 4; }
      else if (len === 127) { if (n - p < 10) break; len = Number(chunk.readBigUInt64BE(p + 2)); hl = 10; }
      const opcode = b0 & 0x0f;
      if (opcode >= 8) {
        if (n - p < hl + len) break;
        const payload = chunk.subarray(p + hl, p + hl + len);
        p += hl + len;
        this.control(opcode, payload);
        continue;
      }
      if (opcode !== 0) this.opcode = opcode;
      this.fin = b0 & 0x80;
      this.frameLen = len;
      p += hl;
      this.remaining = len;
      receivedBytes += len;
      if (len === 0) completed += this.message();
    }
    if (p < n) this.pending = Buffer.from(chunk.subarray(p));
    if (completed > 0) this.afterRead(completed);
  }

  message() {
    if (!this.fin) return 0;
    const t = now();
    this.lastRecv = t;
    received++;
    if (spec.mode === 'latency' && measuring) latencies.push(t - this.sentAt);
    if (this.onEcho !== null) { const cb = this.onEcho; this.onEcho = null; cb(true); return 0; }
    if (spec.record) this.arrivals.push(t);
    return 1;
  }

  afterRead(completed) {
    if (!running || this.state !== 'open' || spec.mode === 'turns') return;
    this.inflight -= completed;
    if (this.inflight < 0) this.inflight = 0;
    const k = WINDOW - this.inflight;
    if (k > 0) this.send(k);
  }

  send(k) {
    this.inflight += k;
    this.sentAt = now();
    this.sock.write(k === WINDOW ? BATCH : BATCH.subarray(0, k * FRAME.length));
  }

  control(opcode, payload) {
    const t = now();
    if (opcode === 9) {
      pings++;
      pingGaps.push(t - this.lastRecv);
      this.lastRecv = t;
      if (this.state === 'open') { this.sock.write(maskedFrame(10, payload)); pongs++; }
    } else if (opcode === 8) {
      this.lastRecv = t;
      if (!this.closeSent && this.state === 'open') { this.closeSent = true; this.sock.write(CLOSE); }
      this.state = 'closing';
      this.sock.end();
    }
  }

  roundTrip(timeoutMs, cb) {
    if (this.state !== 'open') { cb(false); return; }
    const timer = setTimeout(() => { this.onEcho = null; cb(false); }, timeoutMs);
    this.onEcho = (ok) => { clearTimeout(timer); cb(ok); };
    this.sock.write(FRAME);
  }

  close(cb) {
    if (this.state === 'closed') { cb(); return; }
    const timer = setTimeout(() => { this.sock.destroy(); }, 3000);
    this.done = () => { clearTimeout(timer); cb(); };
    if (this.state === 'open' && !this.closeSent) { this.closeSent = true; this.sock.write(CLOSE); }
  }
}

let running = false;

const SSE = typeof spec.mode === 'string' && spec.mode.startsWith('sse');

function emit(obj) { process.stdout.write(JSON.stringify(obj) + '\n'); }

function pct(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function openAll(cb) {
  const total = spec.conns || 1;
  const concurrency = Math.max(1, spec.concurrency || total);
  let next = 0;
  let done = 0;
  const t0 = now();
  const launch = () => {
    while (next < total && next - done < concurrency) {
      const s = new Session(next++);
      sessions.push(s);
      s.connect(() => { done++; if (done === total) cb(now() - t0); else launch(); });
    }
  };
  launch();
}

function forEachOpen(fn, timeoutMs, cb) {
  const open = sessions.filter((s) => s.state === 'open');
  let left = open.length;
  let ok = 0;
  if (left === 0) { cb(0, 0); return; }
  for (const s of open) fn(s, timeoutMs, (good) => { if (good) ok++; if (--left === 0) cb(ok, open.length); });
}

function startTurns(open) {
  const every = (spec.turnEvery || 2) * 1000;
  const timers = [];
  open.forEach((s, i) => {
    timers.push(setTimeout(() => {
      const send = () => { if (s.state === 'open') { s.sock.write(TURN); turnsSent++; } };
      send();
      timers.push(setInterval(send, every));
    }, (i * every) / open.length));
  });
  return () => { for (const t of timers) clearTimeout(t); };
}

function runMeasurement() {
  const open = sessions.filter((s) => s.state === 'open');
  running = true;
  latencies = [];
  let stopTurns = null;
  if (spec.mode === 'turns') stopTurns = startTurns(open);
  else for (const s of open) s.send(WINDOW);
  const warmup = (spec.warmup || 0) * 1000;
  const duration = (spec.duration || 1) * 1000;
  let startCount, startBytes, startCpu, startT;
  setTimeout(() => {
    measuring = true;
    latencies = [];
    startCount = received; startBytes = receivedBytes; startCpu = process.cpuUsage(); startT = now();
    const startTurnsSent = turnsSent, startPings = pings;
    setTimeout(() => {
      measuring = false;
      if (stopTurns !== null) stopTurns();
      const elapsed = (now() - startT) / 1e9;
      const cpu = process.cpuUsage(startCpu);
      running = false;
      const sorted = latencies.sort((a, b) => a - b);
      emit({
        event: 'result', seconds: elapsed, messages: received - startCount, bytes: receivedBytes - startBytes,
        msgs_per_s: (received - startCount) / elapsed, bytes_per_s: (receivedBytes - startBytes) / elapsed,
        cpu_s: (cpu.user + cpu.system) / 1e6, sessions: open.length,
        turns_sent: turnsSent - startTurnsSent, pings: pings - startPings,
        lat_p50_ns: pct(sorted, 0.5), lat_p99_ns: pct(sorted, 0.99), lat_max_ns: sorted.length ? sorted[sorted.length - 1] : null,
        lat_mean_ns: sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : null,
        failures, failure_sample: failureSample,
      });
    }, duration);
  }, warmup);
}

function command(line) {
  const cmd = line.trim();
  if (SSE) {
    if (cmd === 'go') sse.run();
    else if (cmd === 'close') sse.close();
    return;
  }
  if (cmd === 'go') runMeasurement();
  else if (cmd === 'check') {
    forEachOpen((s, t, cb) => s.roundTrip(t, cb), 10000, (ok, of) => emit({ event: 'checked', ok, of }));
  } else if (cmd === 'report') {
    emit({
      event: 'report', pings, pongs, ping_gaps_ns: pingGaps, failures, failure_sample: failureSample,
      open: sessions.filter((s) => s.state === 'open').length,
      arrivals: spec.record ? sessions.map((s) => s.arrivals) : null,
    });
  } else if (cmd === 'close') {
    if (closing) return;
    closing = true;
    running = false;
    let left = sessions.length;
    const t0 = now();
    const finish = () => { emit({ event: 'closed', seconds: (now() - t0) / 1e9 }); process.exit(0); };
    if (left === 0) finish();
    for (const s of sessions) s.close(() => { if (--left === 0) finish(); });
  }
}

let stdinBuf = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => {
  stdinBuf += d;
  let i;
  while ((i = stdinBuf.indexOf('\n')) >= 0) { const line = stdinBuf.slice(0, i); stdinBuf = stdinBuf.slice(i + 1); command(line); }
});
let closing = false;
process.stdin.on('end', () => {
  // The runner is gone: close what is open, then leave, whatever happens.
  setTimeout(() => process.exit(0), 5000).unref();
  if (!closing) command('close');
});
setTimeout(() => { emit({ event: 'timeout' }); process.exit(3); }, (spec.maxSeconds || 120) * 1000).unref();

// -- the Responses HTTP transport ---------------------------------------------------------------------------------
//
// sse_ttfb     spec.conns workers, each sending one request after another on its kept-alive socket (turns of
//              spec.events deltas, written by the upstream at once): time to first byte = from the request
//              written to the first body bytes of an event (not a ':' comment) received.
// sse_stream   one stream after another of spec.events deltas of spec.bytes, as fast as they come: events/s and
//              bytes/s from the request written to the end of the stream, over the streams started while measuring.
// sse_latency  one stream of deltas spaced spec.interval ms, long enough for warm-up + duration: each carries the
//              upstream's wall clock at its write ("bench_ts", performance.timeOrigin + performance.now(), ms),
//              the delay is the same clock here when the bytes arrive minus it; the warm-up's events are left out.

function sseClient() {
  const http = require('http');
  const { performance } = require('perf_hooks');
  const wallMs = () => performance.timeOrigin + performance.now();
  const conns = Math.max(1, spec.conns || 1);
  const agent = new http.Agent({ keepAlive: true, maxSockets: conns, maxFreeSockets: conns });
  const mode = spec.mode;
  const warmup = (spec.warmup || 0) * 1000;
  const duration = (spec.duration || 1) * 1000;
  let events = spec.events || 1;
  if (mode === 'sse_latency') events = Math.ceil((warmup + duration) / spec.interval);
  const bench = { events, bytes: spec.bytes || 300, interval_ms: mode === 'sse_latency' ? spec.interval : 0 };
  const body = Buffer.from(JSON.stringify({ model: 'bench', stream: true, input: 'bench', bench }));
  const headers = {
    'Content-Type': 'application/json', 'Content-Length': String(body.length), Accept: 'text/event-stream',
    Authorization: 'Bearer ' + (spec.key || 'bench-key'), 'User-Agent': 'wsrelay-bench',
    'x-codex-bench-events': String(bench.events), 'x-codex-bench-event-bytes': String(bench.bytes),
    'x-codex-bench-interval-ms': String(bench.interval_ms),
  };
  let socketsOpened = 0;
  let requests = 0;
  const COMPLETED = 'event: response.completed';

  // One request; cb(error, stream) once its body ended.  onChunk(stream, chunk, t) sees every body chunk.
  function post(onChunk, cb) {
    let finished = false;
    const end = (err, st) => { if (!finished) { finished = true; cb(err, st); } };
    const st = { t0: 0, first: 0, end: 0, bytes: 0, events: 0, lastNl: false, tail: '' };
    const req = http.request({ host: HOST, port: spec.port, method: 'POST', path: spec.path || '/v1/responses',
                               agent, headers });
    req.on('socket', (sock) => {
      if (!sock.benchCounted) { sock.benchCounted = true; socketsOpened++; sock.setNoDelay(true); }
    });
    req.on('error', (err) => end(err.code || err.message));
    req.on('response', (res) => {
      if (res.statusCode !== 200) {
        let text = '';
        res.setEncoding('latin1');
        res.on('data', (d) => { if (text.length < 300) text += d; });
        res.on('end', () => end('status ' + res.statusCode + ' ' + text.slice(0, 200)));
        res.on('error', () => end('status ' + res.statusCode));
        return;
      }
      res.on('data', (chunk) => {
        const t = now();
        if (st.first === 0 && chunk[0] !== 0x3a) st.first = t;     // ':' starts a comment, not an event
        st.bytes += chunk.length;
        // Events end with a blank line; this upstream writes LF only (a relay passes the bytes as they are).
        if (st.lastNl && chunk[0] === 10) st.events++;
        let i = chunk.indexOf('\n\n');
        while (i >= 0) { st.events++; i = chunk.indexOf('\n\n', i + 2); }
        st.lastNl = chunk[chunk.length - 1] === 10 && !(chunk.length >= 2 && chunk[chunk.length - 2] === 10);
        const keep = Math.min(chunk.length, 2048);
        st.tail = (st.tail + chunk.latin1Slice(chunk.length - keep, chunk.length)).slice(-2048);
        if (onChunk !== null) onChunk(st, chunk, t);
      });
      res.on('end', () => {
        st.end = now();
        if (st.tail.indexOf(COMPLETED) < 0) end('stream ended without response.completed', st);
        else end(null, st);
      });
      res.on('aborted', () => end('stream aborted', st));
      res.on('error', (err) => end('stream error ' + (err.code || err.message), st));
    });
    st.t0 = now();
    req.end(body);
  }

  function sorted(values) { return values.slice().sort((a, b) => a - b); }
  function mean(values) { return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null; }

  function run() {
    const t0 = now();
    const mStart = t0 + warmup * 1e6;
    const mEnd = mStart + duration * 1e6;
    const cpu0 = { v: null };
    setTimeout(() => { cpu0.v = process.cpuUsage(); }, warmup);
    const ttfb = [];
    const totals = [];
    const streams = [];
    const delays = [];
    let active = 0;
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      const cpu = process.cpuUsage(cpu0.v || undefined);
      const seconds = (now() - mStart) / 1e9;
      const out = { event: 'result', mode, seconds, cpu_s: (cpu.user + cpu.system) / 1e6, requests,
                    sockets_opened: socketsOpened, failures, failure_sample: failureSample,
                    wall_minus_mono_ms: wallMs() - Number(process.hrtime.bigint()) / 1e6 };
      if (mode === 'sse_ttfb') {
        const s = sorted(ttfb);
        Object.assign(out, { measured: s.length, ttfb_p50_ns: pct(s, 0.5), ttfb_p99_ns: pct(s, 0.99),
                             ttfb_max_ns: s.length ? s[s.length - 1] : null, ttfb_mean_ns: mean(s),
                             total_p50_ns: pct(sorted(totals), 0.5),
                             requests_per_s: s.length / (duration / 1000) });
      } else if (mode === 'sse_stream') {
        const ev = streams.reduce((a, x) => a + x.events, 0);
        const by = streams.reduce((a, x) => a + x.bytes, 0);
        const secs = streams.reduce((a, x) => a + (x.end - x.t0), 0) / 1e9;
        Object.assign(out, { measured: streams.length, events: ev, bytes: by, stream_seconds: secs,
                             events_per_s: secs > 0 ? ev / secs : null, bytes_per_s: secs > 0 ? by / secs : null,
                             ttfb_p50_ns: pct(sorted(streams.map((x) => x.first - x.t0)), 0.5) });
      } else {
        const s = sorted(delays);
        Object.assign(out, { measured: s.length, expected: Math.floor(duration / spec.interval),
                             delay_p50_ms: pct(s, 0.5), delay_p99_ms: pct(s, 0.99), delay_mean_ms: mean(s),
                             delay_max_ms: s.length ? s[s.length - 1] : null, delay_min_ms: s.length ? s[0] : null });
      }
      emit(out);
    };
    if (mode === 'sse_latency') {
      const skip = Math.floor(warmup / spec.interval);
      let carry = '';
      let seen = 0;
      const onChunk = (st, chunk) => {
        const arrived = wallMs();
        carry += chunk.latin1Slice(0, chunk.length);
        let k = carry.indexOf('\n\n');
        while (k >= 0) {
          const j = carry.lastIndexOf('"bench_ts":', k);
          if (j >= 0 && carry.lastIndexOf('\n\n', j) < 0) {        // this event's own stamp
            if (++seen > skip) delays.push(arrived - parseFloat(carry.slice(j + 11, k)));
          }
          carry = carry.slice(k + 2);
          k = carry.indexOf('\n\n');
        }
      };
      requests++;
      post(onChunk, (err) => { if (err) fail(err); finish(); });
      return;
    }
    const worker = () => {
      if (now() >= mEnd) { if (--active === 0) finish(); return; }
      requests++;
      post(null, (err, st) => {
        if (err) fail(err);
        else if (st.t0 >= mStart && st.t0 < mEnd) {
          if (mode === 'sse_ttfb') { ttfb.push(st.first - st.t0); totals.push(st.end - st.t0); }
          else streams.push(st);
        }
        if (err) setTimeout(worker, 10); else worker();
      });
    };
    const workers = mode === 'sse_ttfb' ? conns : 1;
    active = workers;
    for (let w = 0; w < workers; w++) worker();
  }

  function close() {
    agent.destroy();
    emit({ event: 'closed', seconds: 0, sockets_opened: socketsOpened });
    process.exit(0);
  }

  return { run, close };
}

const sse = SSE ? sseClient() : null;

if (SSE) emit({ event: 'ready', opened: spec.conns || 1, failures: 0, failure_sample: null, t_ready_ns: now() });
else openAll((ns) => {
  const sorted = handshakeNs.slice().sort((a, b) => a - b);
  const readyInfo = {
    event: 'ready', connect_seconds: ns / 1e9, opened: handshakeNs.length, failures, failure_sample: failureSample,
    hs_p50_ns: pct(sorted, 0.5), hs_p99_ns: pct(sorted, 0.99), t_ready_ns: now(),
  };
  if (!spec.prime) { emit(readyInfo); return; }
  forEachOpen((s, t, cb) => s.roundTrip(t, cb), 15000, (ok, of) => {
    readyInfo.primed = ok;
    readyInfo.t_ready_ns = now();
    emit(readyInfo);
  });
});
