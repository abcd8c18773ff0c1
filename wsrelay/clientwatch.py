"""Noticing that an HTTP client has gone while its streamed response waits for the upstream."""

import socket

import gevent


class ClientGone(Exception):
    """Thrown into an exchange waiting for the upstream when its client has closed the connection."""


class ClientWatch:
    """Notices a streamed response's client closing its connection while the relay waits for the upstream.

    Once the request is read the client has nothing to send (a pipelined next request aside): its socket
    turning readable means EOF or a reset — or that next request, which a one-byte peek tells apart.  Without
    this a client that left during a silent stretch would only be noticed at the next write, and a write into
    the kernel's buffer can succeed after the client has gone.
    """

    def __init__(self, sock, on_gone):
        self.sock = sock
        self.on_gone = on_gone
        self.watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
        self.watcher.start(self._readable)

    def _readable(self):
        self.stop()
        gevent.spawn(self._peek)

    def _peek(self):
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except (OSError, socket.timeout):
            data = b""
        if not data:
            self.on_gone()

    def stop(self):
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None
