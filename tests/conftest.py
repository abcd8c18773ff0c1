"""The fixtures: real servers on 127.0.0.1 (fake or scripted upstream, the relay, ``wsrelay serve``), each stopped
at teardown.  Everything else the tests share is in ``tests/helpers.py``.
"""

from wsrelay._gevent import patch

patch()  # before the tests' own imports of socket, ssl and threading

import pytest  # noqa: E402

from tests.helpers import FAST, ListStore, RecordingTracer, ScriptedUpstream, Served
from tests.redisserver import REDIS_MISSING_MESSAGE, RedisServer, redis_binary
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
