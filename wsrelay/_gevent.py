"""gevent's monkey-patching, done once by the entry points (CLI, WSGI module) before websocket-client loads.

websocket-client must see gevent's cooperative sockets, ssl and locks.  Importing the ``wsrelay`` package
itself patches nothing, so a process that only imports, say, the gunicorn worker class (gunicorn's master)
stays unpatched; the worker patches itself when it starts.
"""

from gevent import monkey


def patch():
    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
