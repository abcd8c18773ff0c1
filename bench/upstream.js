'use strict';
// Benchmark upstream: a raw-socket WebSocket echo and broadcast server (Node built-ins only).
//
// It must never be the bottleneck, so it does as little as RFC 6455 allows: every client data frame is echoed
// as one server (unmasked) frame with the same FIN bit, opcode and length, large frames streaming back as their
// bytes arrive; all output produced by one read is written at once; Pings get Pongs and a Close gets its Close
// back.  Text payloads are unmasked (relays read text); binary payloads come back as the bytes received, so
// the 1 MiB scenario costs the upstream no per-byte work (neither the relays nor the load generator read them).  A second, plain-HTTP control port serves:
//   GET /broadcast?group=G&bytes=N  one text event (a Responses-shaped delta) to every session of group G,
//                                   answered with {"sent", "t0_ns", "t1_ns"} (CLOCK_MONOTONIC, like the clients)
//   GET /stats                      {"live", "rss", "sse_requests", "http_connections"}
// Sessions join a group with the request header x-codex-bench-group (wsrelay passes x-codex-* upstream).
// A request on the main port that is not a WebSocket handshake goes to Node's HTTP server, which serves the
// Responses HTTP transport (POST /v1/responses, Server-Sent Events: see below) on that kept-alive connection.
//
// Usage: node upstream.js '{"port": P, "ctrlPort": C, "maxSeconds": S}'; prints one JSON line when listening.
// It exits when its standard input closes (the bench runner is gone) or after maxSeconds.

const net = require('net');
const http = require('http');
const crypto = require('crypto');

const spec = JSON.parse(process.argv[2] || '{}');
const HOST = '127.0.0.1';
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const MAX_HEAD = 16384;

const groups = new Map();   // group name -> Set<Session>
let live = 0;
let broadcastSeq = 0;

function xorInto(out, start, len, m0, m1, m2, m3, off) {
  // XOR out[start .. start+len) in place with the 4-byte mask, starting at mask offset `off`.
  const mask = [m0, m1, m2, m3];
  let i = 0;
  const abs = out.byteOffset + start;
  while (i < len && ((abs + i) & 3) !== 0) {
    out[start + i] ^= mask[(off + i) & 3];
    i++;
  }
  const words = (len - i) >>> 2;
  if (words >= 16) {
    const k = off + i;
    const w = mask[k & 3] | (mask[(k + 1) & 3] << 8) | (mask[(k + 2) & 3] << 16) | (mask[(k + 3) & 3] << 24);
    const u32 = new Int32Array(out.buffer, abs + i, words);
    for (let j = 0; j < words; j++) u32[j] ^= w;
    i += words * 4;
  }
  while (i < len) {
    out[start + i] ^= mask[(off + i) & 3];
    i++;
  }
}

// A client text message that starts a turn gets TURN_DELTAS delta events and a final event instead of its echo:
// for a response.create a billed response.completed, for the bench's 'noop' request (same size) a final event of
// the same size that nothing bills, so both kinds of turn put the same frames on the wire.
const TURN_DELTAS = 8;
const CREATE_PREFIX = Buffer.from('{"type":"response.create"', 'latin1');
const NOOP_PREFIX = Buffer.from('{"type":"bench.turn"', 'latin1');
function turnReply(finalType) {
  const delta = '{"type":"response.output_text.delta","item_id":"msg_bench","delta":"' + 'd'.repeat(120) + '"}';
  let done = '{"type":"' + finalType + '","response":{"id":"resp_bench","model":"bench","status":"completed",' +
    '"usage":{"input_tokens":12,"output_tokens":8,"total_tokens":20}}';
  done += ' '.repeat(Math.max(0, 200 - done.length - 1)) + '}';
  const frames = [];
  for (let i = 0; i < TURN_DELTAS; i++) frames.push(serverFrame(1, Buffer.from(delta, 'latin1')));
  frames.push(serverFrame(1, Buffer.from(done, 'latin1')));
  return Buffer.concat(frames);
}

function serverFrame(opcode, payload) {
  const n = payload.length;
  const head = n < 126 ? 2 : n < 65536 ? 4 : 10;
  const f = Buffer.allocUnsafe(head + n);
  f[0] = 0x80 | opcode;
  if (n < 126) f[1] = n;
  else if (n < 65536) { f[1] = 126; f.writeUInt16BE(n, 2); }
  else { f[1] = 127; f.writeBigUInt64BE(BigInt(n), 2); }
  payload.copy(f, head);
  return f;
}

let CREATE_REPLY = null;
let NOOP_REPLY = null;

function startsWith(chunk, start, len, m, prefix) {
  if (len < prefix.length) return false;
  for (let i = 0; i < prefix.length; i++) if ((chunk[start + i] ^ m[i & 3]) !== prefix[i]) return false;
  return true;
}

// The reply to the turn a masked text payload at chunk[start..] starts, or null (no allocation on the way).
function turnFor(chunk, start, len, m) {
  if (startsWith(chunk, start, len, m, CREATE_PREFIX)) {
    return CREATE_REPLY || (CREATE_REPLY = turnReply('response.completed'));
  }
  if (startsWith(chunk, start, len, m, NOOP_PREFIX)) return NOOP_REPLY || (NOOP_REPLY = turnReply('bench.turn_done'));
  return null;
}

class Session {
  constructor(sock) {
    this.sock = sock;
    this.head = null;        // bytes of the HTTP request while it is incomplete
    this.open = false;       // the 101 was sent
    this.pending = null;     // a partial frame header (or control frame) carried to the next read
    this.remaining = 0;      // payload bytes of the current data frame still to echo
    this.m0 = 0; this.m1 = 0; this.m2 = 0; this.m3 = 0; this.maskOff = 0;
    this.group = null;
    this.binary = false;     // the message being echoed is binary
    this.closed = false;
    sock.setNoDelay(true);
    sock.on('data', (chunk) => this.onData(chunk));
    sock.on('error', () => {});
    sock.on('close', () => this.onClose());
  }

  onClose() {
    if (this.open) live--;
    this.open = false;
    this.closed = true;
    if (this.group !== null) {
      const set = groups.get(this.group);
      if (set) { set.delete(this); if (set.size === 0) groups.delete(this.group); }
    }
  }

  handshake(chunk) {
    this.head = this.head ? Buffer.concat([this.head, chunk]) : chunk;
    const end = this.head.indexOf('\r\n\r\n');
    if (end < 0) {
      if (this.head.length > MAX_HEAD) this.sock.destroy();
      return null;
    }
    const whole = this.head;
    const lines = this.head.subarray(0, end).toString('latin1').split('\r\n');
    const rest = this.head.subarray(end + 4);
    this.head = null;
    const headers = {};
    for (let i = 1; i < lines.length; i++) {
      const c = lines[i].indexOf(':');
      if (c > 0) headers[lines[i].slice(0, c).trim().toLowerCase()] = lines[i].slice(c + 1).trim();
    }
    const key = headers['sec-websocket-key'];
    if (!key || !/websocket/i.test(headers['upgrade'] || '')) {
      // Not a WebSocket handshake: plain HTTP (the Responses HTTP transport), served by Node's HTTP server on
      // this very connection, which it keeps for the requests that follow.
      this.toHttp(whole);
      return null;
    }
    const accept = crypto.createHash('sha1').update(key + GUID).digest('base64');
    this.sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
                    'Sec-WebSocket-Accept: ' + accept + '\r\nx-request-id: req_bench\r\n\r\n');
    this.open = true;
    live++;
    const group = headers['x-codex-bench-group'];
    if (group) {
      this.group = group;
      let set = groups.get(group);
      if (!set) { set = new Set(); groups.set(group, set); }
      set.add(this);
    }
    return rest;
  }

  toHttp(bytes) {
    httpConnections++;
    const sock = this.sock;
    sock.removeAllListeners('data');
    sock.removeAllListeners('close');
    this.closed = true;
    sock.pause();
    sock.unshift(bytes);
    httpServer.emit('connection', sock);
    sock.resume();
  }

  onData(chunk) {
    if (!this.open) {
      chunk = this.handshake(chunk);
      if (chunk === null || chunk.length === 0) return;
    }
    if (this.pending !== null) { chunk = Buffer.concat([this.pending, chunk]); this.pending = null; }
    const n = chunk.length;
    // Echo output is never longer than its input: a server header is 4 bytes shorter than the masked one.
    // Text payloads are unmasked into `out`; binary payloads go back as the very bytes received (still
    // masked: nothing on the path reads a binary payload), written as slices of the read buffer, no copy.
    const out = Buffer.allocUnsafe(n);
    const pieces = [];
    let from = 0;   // start of the part of `out` not yet in `pieces`
    let o = 0;
    let p = 0;
    while (p < n) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, n - p);
        if (this.binary) {
          if (o > from) { pieces.push(out.subarray(from, o)); from = o; }
          pieces.push(chunk.subarray(p, p + take));
        } else {
          chunk.copy(out, o, p, p + take);
          xorInto(out, o, take, this.m0, this.m1, this.m2, this.m3, this.maskOff);
          o += take;
        }
        p += take; this.maskOff += take; this.remaining -= take;
        continue;
      }
      if (n - p < 2) break;
      const b0 = chunk[p];
      const b1 = chunk[p + 1];
      let len = b1 & 0x7f;
      let hl = 2;
      if (len === 126) { if (n - p < 4) break; len = chunk.readUInt16BE(p + 2); hl = 4; }
      else if (len === 127) { if (n - p < 10) break; len = Number(chunk.readBigUInt64BE(p + 2)); hl = 10; }
      if (!(b1 & 0x80)) { this.sock.destroy(); return; }   // clients must mask
      if (n - p < hl + 4) break;
      const opcode = b0 & 0x0f;
      const mp = p + hl;
      if (opcode >= 8) {
        if (n - p < hl + 4 + len) break;
        const payload = Buffer.from(chunk.subarray(mp + 4, mp + 4 + len));
        xorInto(payload, 0, len, chunk[mp], chunk[mp + 1], chunk[mp + 2], chunk[mp + 3], 0);
        p = mp + 4 + len;
        if (opcode === 8) {
          if (o > from) pieces.push(out.subarray(from, o));
          for (const piece of pieces) this.sock.write(piece);
          this.sock.end(serverFrame(8, payload.length >= 2 ? payload.subarray(0, 2) : payload));
          this.closed = true;
          return;
        }
        if (opcode === 9) {
          out[o++] = 0x8a; out[o++] = len;
          payload.copy(out, o); o += len;
        }
        continue;
      }
      if ((b0 & 0x8f) === 0x81 && n - p >= hl + 4 + len) {
        const reply = turnFor(chunk, mp + 4, len, chunk.subarray(mp, mp + 4));
        if (reply !== null) {
          if (o > from) { pieces.push(out.subarray(from, o)); from = o; }
          pieces.push(reply);
          p = mp + 4 + len;
          continue;
        }
      }
      out[o++] = b0;
      if (len < 126) out[o++] = len;
      else if (len < 65536) { out[o++] = 126; out.writeUInt16BE(len, o); o += 2; }
      else { out[o++] = 127; out.writeBigUInt64BE(BigInt(len), o); o += 8; }
      if (opcode !== 0) this.binary = opcode === 2;
      this.m0 = chunk[mp]; this.m1 = chunk[mp + 1]; this.m2 = chunk[mp + 2]; this.m3 = chunk[mp + 3];
      this.maskOff = 0;
      this.remaining = len;
      p = mp + 4;
    }
    if (p < n) this.pending = Buffer.from(chunk.subarray(p));
    if (this.closed) return;
    if (pieces.length === 0) {
      if (o > 0) this.sock.write(o === n ? out : out.subarray(0, o));
      return;
    }
    if (o > from) pieces.push(out.subarray(from, o));
    if (pieces.length === 1) { this.sock.write(pieces[0]); return; }
    this.sock.cork();
    for (const piece of pieces) this.sock.write(piece);
    this.sock.uncork();
  }
}

function broadcast(group, bytes) {
  const set = groups.get(group);
  const seq = ++broadcastSeq;
  let text = '{"type":"response.output_text.delta","sequence_number":' + seq + ',"delta":"';
  text += 'x'.repeat(Math.max(0, bytes - text.length - 2)) + '"}';
  const frame = serverFrame(1, Buffer.from(text, 'latin1'));
  const t0 = process.hrtime.bigint();
  let sent = 0;
  if (set) {
    for (const s of set) {
      if (s.open && !s.closed) { s.sock.write(frame); sent++; }
    }
  }
  const t1 = process.hrtime.bigint();
  return { sent, seq, t0_ns: Number(t0), t1_ns: Number(t1) };
}

// -- the Responses HTTP transport ---------------------------------------------------------------------------------
// POST /v1/responses (or /responses) answers text/event-stream in the Responses shape: response.created, `events`
// response.output_text.delta events, response.completed with response.usage (so a relay bills the turn as it
// would in production).  The parameters come from the request body's "bench" object ({"events", "bytes",
// "interval_ms"}), else from the headers x-codex-bench-events, x-codex-bench-event-bytes and
// x-codex-bench-interval-ms: `bytes` is the size of one delta event on the wire (its "event:" and "data:" lines
// and the blank line); with interval_ms 0 the whole stream is written at once (in 64 KiB writes, as fast as the
// reader takes them, from a cache: no per-request work), otherwise one delta every interval_ms, each carrying
// "bench_ts": the wall clock when it was written (performance.timeOrigin + performance.now(), ms).

const { performance } = require('perf_hooks');
const wallMs = () => performance.timeOrigin + performance.now();
const SSE_PATHS = new Set(['/v1/responses', '/responses']);
const SSE_WRITE = 65536;
const MAX_EVENTS = 10000000;
let responseSeq = 0;
let sseRequests = 0;
let httpConnections = 0;   // connections handed to the HTTP server (how many a proxy's pool opened)

function sseEvent(obj) {
  return 'event: ' + obj.type + '\ndata: ' + JSON.stringify(obj) + '\n\n';
}

function responseObject(id, model, status, events) {
  const r = { id, object: 'response', created_at: Math.floor(Date.now() / 1000), status, model, output: [],
              usage: null };
  if (status === 'completed') {
    r.output = [{ type: 'message', id: 'msg_bench', status: 'completed', role: 'assistant',
                  content: [{ type: 'output_text', text: 'bench', annotations: [] }] }];
    r.usage = { input_tokens: 12, input_tokens_details: { cached_tokens: 0 }, output_tokens: events,
                output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 12 + events };
  }
  return r;
}

// One delta event of `bytes` bytes on the wire (at least its fields): the delta text pads it.
function deltaEvent(seq, bytes, ts) {
  const head = { type: 'response.output_text.delta', sequence_number: seq };
  if (ts !== undefined) head.bench_ts = ts;
  Object.assign(head, { item_id: 'msg_bench', output_index: 0, content_index: 0, delta: '' });
  const bare = sseEvent(head);
  head.delta = 'x'.repeat(Math.max(1, bytes - bare.length));
  return sseEvent(head);
}

const streamCache = new Map();   // "events:bytes" -> [Buffer] (the deltas, in writes of SSE_WRITE bytes at most)

function deltaChunks(events, bytes) {
  const key = events + ':' + bytes;
  let chunks = streamCache.get(key);
  if (chunks) return chunks;
  chunks = [];
  let parts = [];
  let size = 0;
  for (let i = 1; i <= events; i++) {
    const ev = deltaEvent(i, bytes);
    if (size + ev.length > SSE_WRITE && parts.length) { chunks.push(Buffer.from(parts.join(''), 'latin1')); parts = []; size = 0; }
    parts.push(ev);
    size += ev.length;
  }
  if (parts.length) chunks.push(Buffer.from(parts.join(''), 'latin1'));
  if (streamCache.size > 16) streamCache.clear();
  streamCache.set(key, chunks);
  return chunks;
}

function sseParams(body, headers) {
  const b = body && typeof body.bench === 'object' && body.bench !== null ? body.bench : {};
  const pick = (field, header, dflt) => {
    const v = b[field] !== undefined ? b[field] : headers[header];
    const n = Number(v);
    return v === undefined || v === '' || !Number.isFinite(n) ? dflt : n;
  };
  return {
    events: Math.min(MAX_EVENTS, Math.max(0, Math.floor(pick('events', 'x-codex-bench-events', 8)))),
    bytes: Math.max(64, Math.floor(pick('bytes', 'x-codex-bench-event-bytes', 300))),
    interval: Math.max(0, pick('interval_ms', 'x-codex-bench-interval-ms', 0)),
  };
}

function httpError(res, status, code, message) {
  const data = JSON.stringify({ error: { message, type: 'invalid_request_error', code } });
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

function onHttpRequest(req, res) {
  const path = req.url.split('?')[0];
  if (!SSE_PATHS.has(path)) { httpError(res, 404, 'not_found', 'bench upstream: no route for ' + path); return; }
  if (req.method !== 'POST') { httpError(res, 405, 'method_not_allowed', 'use POST'); return; }
  const parts = [];
  req.on('data', (c) => parts.push(c));
  req.on('end', () => {
    let body = null;
    try { body = JSON.parse(Buffer.concat(parts).toString('utf8')); } catch (e) { body = null; }
    if (body === null || typeof body !== 'object') { httpError(res, 400, 'invalid_json', 'a JSON object'); return; }
    if (body.stream !== true) { httpError(res, 400, 'stream_required', 'the bench upstream streams only'); return; }
    sseRequests++;
    streamResponse(res, sseParams(body, req.headers), typeof body.model === 'string' ? body.model : 'bench');
  });
}

function streamResponse(res, p, model) {
  const id = 'resp_bench_' + (++responseSeq);
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache', 'x-request-id': 'req_' + id });
  const created = sseEvent({ type: 'response.created', sequence_number: 0,
                             response: responseObject(id, model, 'in_progress', p.events) });
  const completed = sseEvent({ type: 'response.completed', sequence_number: p.events + 1,
                               response: responseObject(id, model, 'completed', p.events) });
  let gone = false;
  res.on('close', () => { gone = true; });
  if (p.interval === 0) {
    const chunks = deltaChunks(p.events, p.bytes);
    if (chunks.length === 1 && created.length + chunks[0].length + completed.length <= SSE_WRITE) {
      // A short turn: one write, as an upstream that has the whole answer at once would send it.
      res.end(Buffer.concat([Buffer.from(created, 'latin1'), chunks[0], Buffer.from(completed, 'latin1')]));
      return;
    }
    res.write(created);
    let i = 0;
    const pump = () => {
      while (!gone && i < chunks.length) {
        if (!res.write(chunks[i++])) { res.once('drain', pump); return; }
      }
      if (!gone) res.end(completed);
    };
    pump();
    return;
  }
  res.write(created);
  let seq = 0;
  const tick = () => {
    if (gone) return;
    if (seq < p.events) {
      seq++;
      res.write(deltaEvent(seq, p.bytes, wallMs()));
      setTimeout(tick, p.interval);
    } else {
      res.end(completed);
    }
  };
  setTimeout(tick, p.interval);
}

const httpServer = http.createServer({ keepAliveTimeout: 3600 * 1000, requestTimeout: 0, headersTimeout: 60000,
                                       noDelay: true }, onHttpRequest);
httpServer.keepAliveTimeout = 3600 * 1000;   // the relays' pools keep connections: never close one under them
httpServer.on('clientError', (err, sock) => sock.destroy());

const server = net.createServer({ noDelay: true }, (sock) => new Session(sock));
server.on('error', (err) => { console.error('upstream: ' + err.message); process.exit(1); });

const control = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  let body;
  if (url.pathname === '/broadcast') {
    body = broadcast(url.searchParams.get('group') || '', parseInt(url.searchParams.get('bytes') || '200', 10));
  } else if (url.pathname === '/stats') {
    body = { live, rss: process.memoryUsage().rss, sse_requests: sseRequests,
             http_connections: httpConnections };
  } else {
    res.writeHead(404); res.end(); return;
  }
  const data = JSON.stringify(body);
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
});

let listening = 0;
function ready() {
  if (++listening === 2) {
    process.stdout.write(JSON.stringify({ event: 'listening', port: server.address().port,
                                          ctrlPort: control.address().port, pid: process.pid,
                                          wall_minus_mono_ms: wallMs() - Number(process.hrtime.bigint()) / 1e6 }) + '\n');
  }
}
server.listen({ host: HOST, port: spec.port || 0, backlog: 8192 }, ready);
control.listen({ host: HOST, port: spec.ctrlPort || 0 }, ready);

process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
setTimeout(() => process.exit(2), (spec.maxSeconds || 3600) * 1000).unref();
