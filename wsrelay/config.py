"""Every wsrelay setting, declared once.

The YAML file, the CLI flags, ``bin/wsrelay check-config`` and ``etc/wsrelay.yaml`` are all derived from
:data:`SETTINGS`.  A setting's name is its dotted path in the YAML file
(``gateway.openai_ws.passthrough_downstream_ping_interval_seconds`` is ``gateway: {openai_ws: {...}}``).
"""

import os
from dataclasses import dataclass, field

import yaml

MiB = 1024 * 1024


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists one message per bad key or value."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: object
    doc: str
    minimum: float = None
    maximum: float = None
    exclusive_minimum: bool = False
    nullable: bool = False
    choices: tuple = ()
    items: type = str  # a list's items: str, or dict (mappings checked further in _cross_check)

    def coerce(self, value):
        """Return ``value`` converted to this setting's type, or raise ValueError saying why."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError("must not be empty")
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError("must be true or false, got %r" % (value,))
        if self.type is list and self.items is dict:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
                raise ValueError("must be a list of mappings")
            return [dict(v) for v in value]
        if self.type is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise ValueError("must be a list of non-empty strings")
            return list(value)
        if self.type in (int, float):
            if isinstance(value, bool):
                raise ValueError("must be a number, got %r" % (value,))
            try:
                number = self.type(value)
            except (TypeError, ValueError, OverflowError):
                raise ValueError("must be %s, got %r" % ("an integer" if self.type is int else "a number", value))
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError("must be a finite number, got %r" % (value,))
            if self.type is int and isinstance(value, float) and value != int(value):
                raise ValueError("must be an integer, got %r" % (value,))
            if self.minimum is not None:
                if self.exclusive_minimum and number <= self.minimum:
                    raise ValueError("must be greater than %s, got %s" % (self.minimum, number))
                if not self.exclusive_minimum and number < self.minimum:
                    raise ValueError("must be at least %s, got %s" % (self.minimum, number))
            if self.maximum is not None and number > self.maximum:
                raise ValueError("must be at most %s, got %s" % (self.maximum, number))
            return number
        if not isinstance(value, str):
            raise ValueError("must be a string, got %r" % (value,))
        if self.choices and value not in self.choices:
            raise ValueError("must be one of %s, got %r" % (", ".join(self.choices), value))
        return value


_WS = "gateway.openai_ws."
_HTTP = "gateway.openai_http."

SETTINGS = (
    Setting("server.host", str, "127.0.0.1", "Address to listen on."),
    Setting("server.port", int, 8080, "TCP port to listen on.", minimum=0, maximum=65535),
    Setting("server.backlog", int, 1024, "Listen backlog.", minimum=1),
    Setting("server.max_connections", int, 10000,
            "Live WebSocket sessions and HTTP requests in flight the relay holds at most; past it an upgrade or a "
            "request gets 503 with Retry-After. Each holds two sockets: keep it under half the open-file limit.",
            minimum=1),
    Setting("server.allowed_origins", list, [],
            "Origins a browser client may connect from (exact match, e.g. https://app.example.com). Empty: any. "
            "Requests without an Origin header (Codex, SDKs) are always allowed."),
    Setting("server.tls_cert", str, None, "PEM certificate (chain) to serve wss:// directly; needs server.tls_key.",
            nullable=True),
    Setting("server.tls_key", str, None, "PEM private key for server.tls_cert.", nullable=True),
    Setting("server.metrics_listen", str, None,
            "host:port for a separate listener serving only /metrics, /healthz and /readyz (e.g. 127.0.0.1:9108). "
            "They are always served on the main listener too.", nullable=True),
    Setting("server.handshake_timeout_seconds", float, 10.0,
            "Time a client has to send its whole request head (request line and headers; over TLS the TLS "
            "handshake too), counted from accept and, on a kept-alive plain HTTP connection, from the end of "
            "the previous response. Past it the connection is closed, with 408 if a request line had arrived. "
            "The upstream dial that follows has its own limit, upstream.connect_timeout_seconds.",
            minimum=0, exclusive_minimum=True),
    Setting("server.max_pending_handshakes", int, 1024,
            "Connections the relay holds at most while waiting for their request head; past it a new "
            "connection is answered 503 with Retry-After at once, without being read (closed without an answer "
            "over TLS). Keep it well under the open-file limit.", minimum=1),
    Setting("server.shutdown_grace_seconds", float, 30.0,
            "On SIGTERM, how long live turns may run to their end before their clients are closed with 1001 "
            "(their upstreams are then drained so the turns are still billed).", minimum=0),
    Setting("server.workers", int, 1,
            "Relay processes sharing the listening socket, run by gunicorn's arbiter (needs the gunicorn extra). "
            "1: one process, no arbiter.", minimum=1),
    Setting("upstream.url", str, "wss://api.openai.com/v1/responses",
            "Upstream Responses WebSocket endpoint (ws:// or wss://)."),
    Setting("upstream.api_key", str, None, "Credential sent upstream as 'Authorization: Bearer' when auth.keys "
            "is set. Prefer upstream.api_key_env.", nullable=True),
    Setting("upstream.api_key_env", str, "OPENAI_API_KEY",
            "Environment variable holding the upstream credential (used when upstream.api_key is empty).",
            nullable=True),
    Setting("upstream.connect_timeout_seconds", float, 10.0,
            "Time allowed for the upstream TCP, TLS and WebSocket handshake; past it the client gets 504.",
            minimum=0, exclusive_minimum=True),
    Setting("upstream.http_base_url", str, None,
            "Upstream base URL of the HTTP transport (POST {base}/responses, GET {base}/models, other /v1/* "
            "requests). Default: derived from upstream.url (wss://host/v1/responses -> https://host/v1).",
            nullable=True),
    Setting("upstream.http_read_timeout_seconds", float, 900.0,
            "Longest silence allowed between bytes of an upstream HTTP response (a long turn's event stream "
            "included); past it the client gets 504, or the stream ends.", minimum=0, exclusive_minimum=True),
    Setting("upstream.http_max_connections", int, 1024,
            "Upstream HTTP connections open at once (in use or kept alive for reuse); a request beyond it waits "
            "up to upstream.connect_timeout_seconds for one, then gets 503.", minimum=1),
    Setting("upstream.accounts", list, [],
            "Upstream accounts the relay chooses from at each dial: mappings with name, url and http_base_url "
            "(default: the upstream.* ones), api_key or api_key_env, weight (default 1) and max_sessions "
            "(default: no limit). Empty: one account named 'default' made of upstream.url, upstream.api_key and "
            "upstream.api_key_env. Needs auth.keys (the accounts' credentials are the relay's).", items=dict),
    Setting("upstream.max_failover_attempts", int, 3,
            "After a dial or request answered 429, 401/403, 500-504 or a connect error/timeout, how many other "
            "accounts are tried before the client gets the failure.", minimum=0),
    Setting("upstream.default_cooldown_seconds", float, 60.0,
            "How long an account answered 429 without Retry-After is left out of the choice (at a dial, or by a "
            "quota error event mid-session).", minimum=0),
    Setting("upstream.auth_failure_disable_seconds", float, 600.0,
            "How long an account whose credential was refused (401/403) is left out of the choice.", minimum=0),
    Setting("upstream.sticky_ttl_seconds", float, 3600.0,
            "A conversation (session-id, thread-id or x-client-request-id header, or prompt_cache_key) goes to "
            "the same account while it is usable, until this long after its last request. 0 = off.", minimum=0),
    Setting("upstream.ca_file", str, None, "Extra CA bundle (PEM) for verifying the upstream's TLS certificate. "
            "Verification is always on.", nullable=True),
    Setting("auth.keys", list, [], "Relay keys clients must present as 'Authorization: Bearer <key>'. "
            "Each is the key itself or 'sha256:<hex digest>'. Empty: pure passthrough of the client's own "
            "Authorization."),
    Setting(_WS + "passthrough_downstream_ping_interval_seconds", float, 20.0,
            "Send a WebSocket Ping to the client when the downstream has been idle this long, once the first "
            "business frame was written. 0 disables. Keep it below the idle timeout of every proxy in front "
            "(nginx proxy_read_timeout 60 s, Cloudflare 100 s, AWS ALB 60 s).", minimum=0),
    Setting(_WS + "passthrough_downstream_ping_timeout_seconds", float, 5.0,
            "How long to wait for the Pong; no Pong in time is a graceful client disconnect.",
            minimum=0, exclusive_minimum=True),
    Setting(_WS + "passthrough_downstream_app_keepalive_mode", str, "auto",
            "Which clients get the app keepalive (a {\"type\":\"keepalive\"} text frame during silent turns): "
            "auto = clients that identify as Codex (an originator header or a User-Agent starting with 'codex'), "
            "whose idle watchdog (stream_idle_timeout_ms, 300 s) is reset only by text frames, never by Pings; "
            "always = every client (one that rejects unknown event types would fail); never = none.",
            choices=("auto", "always", "never")),
    Setting(_WS + "passthrough_downstream_app_keepalive_interval_seconds", float, 30.0,
            "During a turn, once a business frame was written, send the app keepalive when no business frame "
            "went down for this long (to the clients passthrough_downstream_app_keepalive_mode selects). Keep it "
            "below the clients' idle watchdog. 0 disables.", minimum=0),
    Setting(_WS + "upstream_drain_timeout_seconds", float, 60.0,
            "After the client leaves mid-turn, keep reading the upstream this long for the terminal event "
            "so the turn's usage is recorded.", minimum=0),
    Setting(_WS + "client_read_limit_bytes", int, 64 * MiB,
            "Largest client message accepted; a larger one is refused with close code 1009.", minimum=1),
    Setting(_WS + "max_ingress_connections_per_api_key", int, 64,
            "Concurrent sessions and HTTP requests in flight one relay key (or, in passthrough, one client "
            "credential) may hold; past it an upgrade or a request gets 429 with Retry-After.", minimum=1),
    Setting(_WS + "client_first_message_timeout_seconds", float, 30.0,
            "A client that sends no response.create this long after connecting is closed with 1008. 0 disables.",
            minimum=0),
    Setting(_WS + "ingress_inter_turn_idle_timeout_seconds", float, 300.0,
            "A session with no turn in flight this long is closed with 1000 'websocket idle timeout', so Pings "
            "never keep an abandoned session and its upstream socket open forever. 0 disables.", minimum=0),
    Setting(_WS + "read_timeout_seconds", float, 900.0,
            "A turn in flight with no upstream frame this long is given up: the client is closed with 1001 and "
            "the turn recorded as failed. 0 disables.", minimum=0),
    Setting(_WS + "write_timeout_seconds", float, 60.0,
            "Longest time one write to the client or the upstream may block (a client that stops reading).",
            minimum=0, exclusive_minimum=True),
    Setting(_WS + "close_timeout_seconds", float, 5.0,
            "How long to wait for the peer's reply to a close frame before dropping the connection.",
            minimum=0, exclusive_minimum=True),
    Setting(_WS + "lingering_close_timeout_seconds", float, 30.0,
            "After the relay closes a connection itself (1009, 1002, 1008, 1001, an idle timeout) it shuts down its "
            "write side and keeps reading, discarding, until the peer's close frame or end of stream, so a peer "
            "still sending reads the close code instead of failing its write with a reset. This bounds that "
            "reading in time; each read also waits at most close_timeout_seconds.", minimum=0,
            exclusive_minimum=True),
    Setting(_WS + "lingering_close_max_bytes", int, 128 * MiB,
            "The most a lingering close reads and discards (the default is twice the default read limit, enough "
            "for a client finishing a message a few MiB over the limit).", minimum=0),
    Setting(_HTTP + "sse_keepalive_interval_seconds", float, 20.0,
            "After the first event of a streamed HTTP response, write an SSE comment (': keepalive') when the "
            "client has had no bytes for this long, so proxies in between do not cut a silent turn. 0 = off. "
            "The app keepalive settings of gateway.openai_ws apply to this transport too, as an SSE event.",
            minimum=0),
    Setting(_HTTP + "max_request_body_bytes", int, 64 * MiB,
            "Largest request body the HTTP transport takes (POST /v1/responses and other /v1/* requests); "
            "larger ones get 413.", minimum=1),
    Setting(_HTTP + "upstream_drain_timeout_seconds", float, 60.0,
            "When an HTTP client leaves mid-stream, how long the upstream's event stream is still read to its "
            "terminal event, so the turn is billed.", minimum=0),
    Setting(_HTTP + "write_timeout_seconds", float, 60.0,
            "Time allowed for one write to an HTTP client; a client that reads nothing for longer is "
            "disconnected (and its turn drained).", minimum=0, exclusive_minimum=True),
    Setting("resume.enabled", bool, True,
            "Hold a turn whose client left without a clean close (its upstream and its response so far) so that "
            "the client's retry of the same turn gets it instead of running and paying for it twice."),
    Setting("resume.window_seconds", float, 60.0,
            "How long a cut turn is held for its retry; then it is drained, billed and closed as without resume.",
            minimum=0, exclusive_minimum=True),
    Setting("resume.max_buffer_bytes", int, 8 * MiB,
            "The most of one response held for a retry; a response that grows past it is not resumable (it is "
            "drained and billed as without resume).", minimum=1),
    Setting("resume.max_total_bytes", int, 256 * MiB,
            "The most held for retries in all; a turn that would go past it is not held.", minimum=1),
    Setting("limits.redis_url", str, None,
            "Redis the relay instances share their state through (redis://[user:password@]host:port/db, "
            "rediss:// for TLS, unix:///path): the per-key limit becomes leases held in Redis, so it counts the "
            "sessions and requests of every instance; with upstream.accounts, the account pool's cooldowns, "
            "disables and sticky conversations are shared too. Needs the redis extra. Empty: each process counts "
            "alone. The limits.* settings are read at start (a reload keeps them).", nullable=True),
    Setting("limits.lease_ttl_seconds", float, 30.0,
            "How long a lease outlives its instance: each instance renews its leases every third of this, so "
            "the slots of an instance that died without a word (kill -9, a lost host) are free again within "
            "it.", minimum=0, exclusive_minimum=True),
    Setting("limits.redis_timeout_seconds", float, 0.5,
            "Longest a Redis call may take (connect included). Past it, or on any error, the relay goes on with "
            "local limits and local account state, says so (trace, /readyz, metrics) and reconnects in the "
            "background; until then no request waits on Redis at all.", minimum=0, exclusive_minimum=True),
    Setting("limits.redis_key_prefix", str, "wsrelay:",
            "Prefix of every key the relay writes in Redis: relays that must not share limits can share one "
            "Redis under different prefixes."),
    Setting("usage.sqlite_path", str, "./wsrelay-usage.db", "SQLite database the usage records go to."),
    Setting("usage.database_url", str, None,
            "PostgreSQL database the usage records go to instead of SQLite (one database for several workers or "
            "hosts): postgresql://user@host:5432/dbname, any libpq URL. Keep a password in PGPASSWORD or "
            "~/.pgpass rather than here (one here is never written to the trace). Needs the postgres extra.",
            nullable=True),
    Setting("usage.fallback_path", str, None, "Append-only file that holds usage records while the database "
            "cannot be written; re-imported on recovery and at start. Default: <sqlite_path>.pending.jsonl.",
            nullable=True),
    Setting("usage.max_event_bytes", int, 64 * MiB,
            "Largest terminal event copied for usage parsing.", minimum=1024),
    Setting("trace.path", str, None, "File the trace lines are appended to. Default: standard error.",
            nullable=True),
)

BY_NAME = {s.name: s for s in SETTINGS}


class Section:
    """One level of the settings tree: its settings as typed attributes (``config.server.port``), and its
    sub-sections (``config.gateway.openai_ws``)."""

    def __init__(self, path):
        self._path = path

    def __repr__(self):
        return "<settings %s>" % self._path


@dataclass
class Config:
    """Validated settings, read as attributes named like the YAML keys: ``config.server.port``,
    ``config.gateway.openai_ws.write_timeout_seconds``.  ``values`` holds them by dotted name as well."""

    values: dict = field(default_factory=dict)
    source: str = None

    def __post_init__(self):
        for name, value in self.values.items():
            node = self
            parts = name.split(".")
            for depth, part in enumerate(parts[:-1]):
                child = node.__dict__.get(part)
                if child is None:
                    child = Section(".".join(parts[:depth + 1]))
                    setattr(node, part, child)
                node = child
            setattr(node, parts[-1], value)

    def upstream_api_key(self):
        """The upstream credential: ``upstream.api_key``, else the environment variable it names."""
        key = self.upstream.api_key
        if not key and self.upstream.api_key_env:
            key = os.environ.get(self.upstream.api_key_env) or None
        return key

    def account_specs(self):
        """The upstream accounts (:class:`wsrelay.accounts.AccountSpec`), the implicit ``default`` one included."""
        from .accounts import parse_specs

        return parse_specs(self.values)[0]

    @property
    def upstream_http_base_url(self):
        """``upstream.http_base_url``, else derived from ``upstream.url``: the scheme's HTTP twin and the path
        without its last ``/responses`` (``wss://host/v1/responses`` -> ``https://host/v1``)."""
        if self.upstream.http_base_url:
            return self.upstream.http_base_url.rstrip("/")
        return http_base_url(self.upstream.url)

    @property
    def usage_database(self):
        """Where the usage records go: ``usage.database_url`` if set, else the SQLite file ``usage.sqlite_path``."""
        return self.usage.database_url or self.usage.sqlite_path

    @property
    def usage_fallback_path(self):
        return self.usage.fallback_path or self.usage.sqlite_path + ".pending.jsonl"


def http_base_url(ws_url):
    """The HTTP base URL a Responses WebSocket URL stands for (see :attr:`Config.upstream_http_base_url`)."""
    scheme, sep, rest = ws_url.partition("://")
    scheme = {"wss": "https", "ws": "http"}.get(scheme.lower(), scheme)
    rest = rest.split("?", 1)[0].rstrip("/")
    if rest.endswith("/responses"):
        rest = rest[:-len("/responses")]
    return scheme + sep + rest


def _flatten(tree, prefix="", out=None, problems=None):
    for key, value in tree.items():
        name = prefix + str(key)
        if isinstance(value, dict) and name not in BY_NAME:
            _flatten(value, name + ".", out, problems)
        elif value is None and name not in BY_NAME and any(n.startswith(name + ".") for n in BY_NAME):
            continue  # a section whose settings are all commented out
        else:
            out[name] = value
    return out


def load(path=None, overrides=None):
    """Build a :class:`Config` from defaults, then the YAML file at ``path``, then ``overrides`` (dotted names).

    Raises :class:`ConfigError` listing every unknown key and every invalid value.
    """
    raw = {}
    problems = []
    if path:
        try:
            with open(path, "r", encoding="utf-8") as fh:
                tree = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(["%s: cannot read: %s" % (path, exc.strerror or exc)])
        except yaml.YAMLError as exc:
            raise ConfigError(["%s: not valid YAML: %s" % (path, exc)])
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(["%s: the top level must be a mapping of settings" % path])
        raw = _flatten(tree, out={})
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values = {}
    for name, value in raw.items():
        setting = BY_NAME.get(name)
        if setting is None:
            problems.append("%s: unknown setting" % name)
            continue
        try:
            values[name] = setting.coerce(value)
        except ValueError as exc:
            problems.append("%s: %s" % (name, exc))
    for setting in SETTINGS:
        values.setdefault(setting.name, list(setting.default) if setting.type is list else setting.default)
    problems.extend(_cross_check(values))
    if problems:
        raise ConfigError(problems)
    return Config(values, path)


def _cross_check(values):
    problems = []
    interval = values[_WS + "passthrough_downstream_ping_interval_seconds"]
    timeout = values[_WS + "passthrough_downstream_ping_timeout_seconds"]
    if interval and timeout >= interval:
        problems.append("%spassthrough_downstream_ping_timeout_seconds: must be less than the ping interval "
                        "(%s), got %s" % (_WS, interval, timeout))
    if bool(values["server.tls_cert"]) != bool(values["server.tls_key"]):
        problems.append("server.tls_cert and server.tls_key must be set together")
    for name in ("server.tls_cert", "server.tls_key", "upstream.ca_file"):
        if values[name] and not os.access(values[name], os.R_OK):
            problems.append("%s: cannot read %s" % (name, values[name]))
    listen = values["server.metrics_listen"]
    if listen:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append("server.metrics_listen: must be host:port, got %r" % listen)
    url = values["upstream.url"]
    if not (url.startswith("ws://") or url.startswith("wss://")):
        problems.append("upstream.url: must start with ws:// or wss://, got %r" % url)
    from .limits import check_settings

    problems.extend(check_settings(values))
    from .accounts import parse_specs

    problems.extend(parse_specs(values)[1])
    base = values["upstream.http_base_url"]
    if base and not (base.startswith("http://") or base.startswith("https://")):
        problems.append("upstream.http_base_url: must start with http:// or https://, got %r" % base)
    from .dburl import problems as database_url_problems

    problems.extend(database_url_problems(values["usage.database_url"]))
    for key in values["auth.keys"]:
        if key.startswith("sha256:"):
            digest = key[len("sha256:"):]
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                problems.append("auth.keys: a sha256: key must be followed by 64 hex digits")
    return problems
