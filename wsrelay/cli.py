"""``wsrelay`` command line: serve, usage, check-config, fake-upstream."""

import sys

import click

import wsrelay

from . import config as config_mod
from ._gevent import patch


def _load(path, overrides=None):
    try:
        return config_mod.load(path, overrides)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            click.echo("wsrelay: config: %s" % problem, err=True)
        raise SystemExit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(wsrelay.__version__, prog_name="wsrelay")
@click.pass_context
def main(ctx):
    """Relay OpenAI Responses WebSocket sessions: keep long turns alive, record every turn's usage."""
    if ctx.invoked_subcommand != "serve":
        patch()  # first: the command, and every server it starts, runs on gevent (serve decides for itself)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML configuration file.")
@click.option("--host", help="Listen address (server.host).")
@click.option("--port", type=int, help="Listen port (server.port).")
@click.option("--upstream", help="Upstream WebSocket URL (upstream.url).")
@click.option("--workers", type=click.IntRange(min=1), help="Relay processes sharing the listening socket "
              "(server.workers); more than one needs the gunicorn extra.")
def serve(config_path, host, port, upstream, workers):
    """Run the relay.  Flags beat the file, the file beats the defaults."""
    overrides = {"server.host": host, "server.port": port, "upstream.url": upstream, "server.workers": workers}
    cfg = _load(config_path, overrides)
    if cfg.server.workers > 1:
        sys.exit(_serve_workers(cfg, lambda: config_mod.load(config_path, overrides)))
    patch()  # before the relay's modules load: one process, on gevent
    from .server import serve as run
    from .store import UsageStore
    from .trace import Tracer

    tracer = Tracer(path=cfg.trace.path)
    store = UsageStore(cfg.usage_database, cfg.usage_fallback_path, trace=tracer)
    try:
        store.start()
    except Exception as exc:  # the relay still runs: records then wait in the fallback file
        tracer.emit("usage_store_failed", error=str(exc))
    try:
        sys.exit(run(cfg, tracer, store, reload=lambda: config_mod.load(config_path, overrides)))
    except OSError as exc:
        click.echo("wsrelay: cannot listen on %s:%s: %s" % (cfg.server.host, cfg.server.port,
                                                            exc.strerror or exc), err=True)
        sys.exit(1)


def _serve_workers(cfg, read_config):
    """gunicorn's arbiter over ``server.workers`` relay processes (:mod:`wsrelay.workers`).  This process is
    not patched for gevent: the arbiter forks, and each worker patches itself."""
    try:
        from . import workers
    except (ImportError, RuntimeError) as exc:  # gunicorn's gevent worker raises RuntimeError for an old gevent
        click.echo("wsrelay: %d workers need the gunicorn extra: pip install 'wsrelay[gunicorn]' (%s)"
                   % (cfg.server.workers, exc), err=True)
        return 2
    problem = workers.tls_problem(cfg)
    if problem:
        click.echo("wsrelay: %s" % problem, err=True)
        return 1
    from .trace import Tracer

    return workers.serve(cfg, read_config, Tracer(path=cfg.trace.path, immediate=True))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML configuration file.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False),
              help="Usage database: a SQLite file or a postgresql:// URL (default: usage.database_url, else "
              "usage.sqlite_path).")
@click.option("--since", help="Only turns started since: a duration (24h, 7d), a UTC date (2026-11-01) or epoch.")
@click.option("--group-by", "group_by",
              help="Sum per group instead of listing turns: key,model,day,event,account,transport,instance.")
@click.option("--format", "fmt", type=click.Choice(["json", "table", "csv"]), default="table", show_default=True)
def usage(config_path, db_path, since, group_by, fmt):
    """Print the recorded usage: one row per turn, or sums per group; tables end with a TOTAL row."""
    from .report import GROUP_KEYS, format_records, parse_since
    from .store import UsageStore

    groups = tuple(g.strip() for g in (group_by or "").split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUP_KEYS]
    if unknown:
        raise click.BadParameter("cannot group by %s; choose from %s" % (", ".join(unknown), ",".join(GROUP_KEYS)),
                                 param_hint="--group-by")
    try:
        since_epoch = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since")
    cfg = _load(config_path)
    try:
        store = UsageStore(db_path or cfg.usage_database, None if db_path else cfg.usage_fallback_path)
    except ImportError:
        click.echo("wsrelay: reading PostgreSQL needs psycopg: pip install 'wsrelay[postgres]'", err=True)
        sys.exit(1)
    try:
        records = store.query(since=since_epoch)
    except store.backend.errors as exc:
        click.echo("wsrelay: cannot read the usage records from %s: %s"
                   % (store.backend.describe(), store.backend.redact(exc)), err=True)
        sys.exit(1)
    finally:
        store.close(timeout=5)
    click.echo(format_records(records, fmt, groups), nl=False)


@main.command("hash-key")
def hash_key():
    """Print the sha256: form of a relay key read from standard input (for auth.keys)."""
    from .auth import digest

    key = sys.stdin.readline().strip()
    if not key:
        raise click.UsageError("give the key on standard input, e.g.: printf %s \"$KEY\" | wsrelay hash-key")
    click.echo("sha256:" + digest(key))


@main.command("check-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML configuration file.")
@click.option("--print-defaults", is_flag=True, help="Print the commented default configuration and exit.")
@click.option("--print-reference", is_flag=True, help="Print the settings reference (reStructuredText) and exit.")
def check_config(config_path, print_defaults, print_reference):
    """Validate a configuration file: one message per invalid key or value, non-zero exit if any."""
    if print_reference:
        from . import configdoc

        click.echo(configdoc.render_reference(), nl=False)
        return
    if print_defaults:
        from . import configdoc

        click.echo(configdoc.render_yaml(), nl=False)
        return
    if not config_path:
        raise click.UsageError("--config is required (or --print-defaults)")
    cfg = _load(config_path)
    warnings = []
    if cfg.auth.keys and not cfg.upstream_api_key():
        warnings.append("auth.keys is set but there is no upstream credential (upstream.api_key or the "
                        "variable named by upstream.api_key_env): every session would be refused")
    for warning in warnings:
        click.echo("wsrelay: config: warning: %s" % warning, err=True)
    click.echo("%s: OK" % config_path)


@main.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9090, show_default=True)
@click.option("--silence", type=float, default=0.0, show_default=True,
              help="Seconds of silence before a turn's terminal event.")
@click.option("--mode", type=click.Choice(["normal", "error", "quota-mid", "close-mid", "drop-mid", "echo"]),
              default="normal", show_default=True)
@click.option("--deltas", type=int, default=3, show_default=True, help="Text deltas per turn.")
@click.option("--refuse-websocket", "refuse_websocket", type=click.IntRange(400, 599), default=None,
              metavar="STATUS", help="Answer every WebSocket handshake with this HTTP status (e.g. 426) and an "
              "OpenAI-shaped JSON error: an HTTP-only upstream.")
@click.option("--refuse", type=click.IntRange(400, 599), default=None, metavar="STATUS",
              help="Answer every request (both transports) with this status: 429, 401, 503, ...")
@click.option("--retry-after", "retry_after", default=None, metavar="SECONDS",
              help="The Retry-After sent with --refuse.")
def fake_upstream(host, port, silence, mode, deltas, refuse_websocket, refuse, retry_after):
    """A Responses-shaped upstream for tests and smoke tests (no model behind it): WebSocket at /v1/responses,
    and HTTP: POST /v1/responses (SSE with "stream": true, else JSON) and GET /v1/models."""
    import signal

    import gevent
    import gevent.event

    from .fake_upstream import FakeUpstream, make_server

    app = FakeUpstream(mode=mode, silence=silence, deltas=deltas, refuse_websocket=refuse_websocket,
                       refuse=(refuse, retry_after) if refuse else None)
    server = make_server(app, host, port)
    try:
        server.start()
    except OSError as exc:
        click.echo("wsrelay: cannot listen on %s:%s: %s" % (host, port, exc.strerror or exc), err=True)
        sys.exit(1)
    if refuse_websocket:
        click.echo("fake upstream listening on http://%s:%d/v1, refusing WebSocket with %d (mode=%s silence=%gs)"
                   % (host, server.server_port, refuse_websocket, mode, silence), err=True)
    else:
        click.echo("fake upstream listening on ws://%s:%d/v1/responses and http://%s:%d/v1 (mode=%s silence=%gs)"
                   % (host, server.server_port, host, server.server_port, mode, silence), err=True)
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    server.stop(timeout=1)


if __name__ == "__main__":
    main()
