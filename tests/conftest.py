"""The fixtures: real servers on 127.0.0.1 (fake or scripted upstream, the relay, ``wsrelay serve``, a private
PostgreSQL), each stopped at teardown.  Everything else the tests share is in ``tests/helpers.py``.
"""

from wsrelay._gevent import patch

patch()  # before the tests' own imports of socket, ssl and threading

import uuid  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import FAST, ListStore, RecordingTracer, ScriptedUpstream, Served
from tests.redisserver import REDIS_MISSING_MESSAGE, RedisServer, redis_binary
from tests.postgres import PostgresMissing, PrivatePostgres
from wsrelay import config as config_mod
from wsrelay import fake_upstream, server


@pytest.fixture
def tracer():
    return RecordingTracer()


@pytest.fixture
def store():
    return ListStore()


@pytest.fixture
def start_server():
    """Start a gevent WSGI server for an app on 127.0.0.1:0; stopped at teardown.  Returns its port."""
    servers = []

    def start(app):
        srv = fake_upstream.make_server(app)
        srv.start()
        servers.append(srv)
        return srv.server_port

    yield start
    for srv in servers:
        srv.stop(timeout=1)


@pytest.fixture
def fake(start_server):
    """``fake(**options)`` starts a :class:`FakeUpstream`; returns ``(app, url)``."""

    def make(**options):
        app = fake_upstream.FakeUpstream(**options)
        port = start_server(app)
        return app, "ws://127.0.0.1:%d/v1/responses" % port

    return make


@pytest.fixture
def scripted(start_server):
    made = []

    def make(**options):
        app = ScriptedUpstream(**options)
        port = start_server(app)
        made.append(app)
        return app, "ws://127.0.0.1:%d/v1/responses" % port

    yield make
    for app in made:
        while not app.connections.empty():
            app.connections.get().done.set()


@pytest.fixture
def relay(tracer, store):
    """``relay(upstream_url, **settings)`` starts a relay server; returns its ws:// base URL (``/v1/responses``)."""
    servers = []

    def start(upstream_url, **settings):
        overrides = dict(FAST)
        overrides["upstream.url"] = upstream_url
        overrides.update({k.replace("__", "."): v for k, v in settings.items()})
        cfg = config_mod.load(None, overrides)
        srv = server.make_server(cfg, tracer, store, listener=("127.0.0.1", 0))
        srv.start()
        servers.append(srv)
        start.apps.append(srv.app)
        return "ws://127.0.0.1:%d/v1/responses" % srv.server_port

    start.apps = []  # the RelayApp of each relay started, in order
    yield start
    for srv in servers:
        srv.stop(timeout=1)
        srv.app.close()


@pytest.fixture
def serve():
    started = []

    def start(*args, env=None, preexec_fn=None):
        served = Served(*args, env=env, preexec_fn=preexec_fn)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 made with the openssl command line: ``(cert, key)`` paths."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server for the test module (free port, temporary directory, no persistence); it fails,
    never skips, when redis-server is not installed."""
    if redis_binary() is None:
        pytest.fail(REDIS_MISSING_MESSAGE)
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server):
    """The module's Redis, running (a test may have stopped it) and empty: its URL."""
    if redis_server.paused:
        redis_server.resume()
    if not redis_server.running():
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server for the whole run (a temporary data directory, a free port), destroyed at the
    end.  A machine without PostgreSQL fails the tests that need it: bin/run-tests installs it."""
    try:
        server = PrivatePostgres()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    yield server
    server.destroy()


@pytest.fixture
def postgres(postgres_server):
    """``(server, url)``: a fresh database of the test's own on the private server (running at the start)."""
    name = "t_" + uuid.uuid4().hex[:12]
    url = postgres_server.create_database(name)
    yield postgres_server, url
    try:
        if not postgres_server.running():
            postgres_server.start()  # a test that stopped it and failed before starting it again
        postgres_server.execute("postgres", 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    except Exception:
        pass  # a database left behind goes with the server at the end of the run
