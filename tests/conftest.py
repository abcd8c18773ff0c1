"""The fixtures: real servers on 127.0.0.1 (fake or scripted upstream, the relay, ``wsrelay serve``), each stopped
at teardown.  Everything else the tests share is in ``tests/helpers.py``.
"""

from wsrelay._gevent import patch

patch()  # before the tests' own imports of socket, ssl and threading

import subprocess  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import FAST, ListStore, RecordingTracer, ScriptedUpstream, Served
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
