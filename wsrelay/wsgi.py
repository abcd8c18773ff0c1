"""WSGI entry point for existing gevent deployments: ``gunicorn -k wsrelay.gunicorn.Worker wsrelay.wsgi:application``.

The configuration file is named by ``$WSRELAY_CONFIG`` (defaults apply without it). WebSocket upgrades need
wsrelay's handler, which the worker class installs; behind any other WSGI server only ``/healthz``, ``/readyz``
and ``/metrics`` work.
"""

from ._gevent import patch

patch()

import os  # noqa: E402

from . import config as config_mod  # noqa: E402
from .server import RelayApp  # noqa: E402
from .store import UsageStore  # noqa: E402
from .trace import Tracer  # noqa: E402


def create_app(path=None):
    """A :class:`RelayApp` for the file at ``path`` (or ``$WSRELAY_CONFIG``); its usage store is not started
    yet (a forking server starts it in each worker: see :mod:`wsrelay.gunicorn`)."""
    config = config_mod.load(path or os.environ.get("WSRELAY_CONFIG") or None)
    tracer = Tracer(path=config.trace.path)
    store = UsageStore(config.usage_database, config.usage_fallback_path, trace=tracer)
    return RelayApp(config, tracer, store)


application = create_app()
