"""wsrelay: a relay for OpenAI Responses WebSocket sessions that keeps long turns alive and bills them.

The relay runs on gevent and dials upstream with websocket-client, which must see gevent's cooperative sockets
and locks: the standard library is patched when this package is first imported, before anything else can
import ``socket``, ``ssl`` or ``threading`` for websocket-client.
"""

from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all()

__version__ = "0.1.0"
