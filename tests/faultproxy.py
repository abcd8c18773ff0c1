"""A small TCP proxy on 127.0.0.1 that the tests put between a peer and the relay to break the connection on cue.

* :meth:`FaultProxy.freeze` stops forwarding in both directions and leaves both sockets open: to each end the
  other end looks alive but silent, like a client whose machine vanished without a FIN (a half-open connection).
* :meth:`FaultProxy.cut` resets both sockets (RST, no FIN), like a middlebox dropping the connection.

It runs as greenlets of the tests' gevent hub (``wsrelay`` patches the standard library on import).
"""

import socket
import struct

import gevent
import gevent.event

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, timeout 0: close() sends a RST


class _Link:
    """One proxied connection: the accepted socket and the one dialled to the target."""

    def __init__(self, proxy, outer, inner):
        self.proxy = proxy
        self.outer = outer
        self.inner = inner
        self.closed = False
        self.pumps = [gevent.spawn(self._pump, outer, inner), gevent.spawn(self._pump, inner, outer)]

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if self.proxy.frozen.is_set():
                    self.proxy.thawed.wait()  # never set while frozen: the bytes are held, never forwarded
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # pass a FIN on as a FIN
                    return
                dst.sendall(data)
        except OSError:
            self.close()

    def close(self, reset=False):
        if self.closed:
            return
        self.closed = True
        for sock in (self.outer, self.inner):
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.close()
            except OSError:
                pass
        current = gevent.getcurrent()
        gevent.killall([p for p in self.pumps if p is not current], block=False)


class FaultProxy:
    """``FaultProxy(port)`` forwards connections on ``proxy.port`` to ``127.0.0.1:port``."""

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.links = []
        self.accepted = gevent.event.Event()
        self.frozen = gevent.event.Event()
        self.thawed = gevent.event.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._acceptor = gevent.spawn(self._accept)

    def url(self, path="/v1/responses"):
        return "ws://127.0.0.1:%d%s" % (self.port, path)

    def _accept(self):
        while True:
            try:
                outer, _ = self._listener.accept()
            except OSError:
                return
            try:
                inner = socket.create_connection(self.target, timeout=5)
            except OSError:
                outer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                outer.close()
                continue
            inner.settimeout(None)
            for sock in (outer, inner):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.links.append(_Link(self, outer, inner))
            self.accepted.set()

    def freeze(self):
        """Stop forwarding both ways; both sockets stay open and nothing is closed or reset."""
        self.thawed.clear()
        self.frozen.set()

    def cut(self):
        """Reset both sockets of every connection."""
        for link in list(self.links):
            link.close(reset=True)

    def close(self):
        self._acceptor.kill(block=False)
        try:
            self._listener.close()
        except OSError:
            pass
        for link in list(self.links):
            link.close()
