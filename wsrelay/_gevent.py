"""gevent's monkey-patching, done once by the entry points (CLI, WSGI module) before websocket-client loads.

websocket-client must see gevent's cooperative sockets, ssl and locks.  Importing the ``wsrelay`` package
itself patches nothing, so a process that only imports, say, the gunicorn worker class (gunicorn's master)
stays unpatched; the worker patches itself when it starts.
"""

import gevent
from gevent import monkey


def patch():
    # A relay spawns greenlets per connection (the handler, two pumps): gevent's default records each one's
    # spawning stack and tree, which nothing here reads (3.6 KiB per session measured, and time per spawn).
    gevent.config.track_greenlet_tree = False
    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
