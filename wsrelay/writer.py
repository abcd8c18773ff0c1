"""Writing to the relay's sockets: the one writer to the client, and the bounded write both sides use.

Everything that goes to a client goes through its session's :class:`DownstreamWriter`: forwarded upstream bytes,
the relay's Pings, app keepalives and close frames.  Its lock keeps the relay's own frames at frame boundaries (a
Ping inside a forwarded frame would corrupt the stream), and a failed write is reported one way, through the
``on_failure(what, error)`` callback the session gives it (``what`` says which kind of write failed).
"""

import socket
import ssl
import time

import gevent
from gevent import ssl as gevent_ssl
from gevent.event import Event
from gevent.lock import Semaphore

from . import frames
from .frames import OP_PING

# What a failed write was, as on_failure is told.
FORWARD = "forward"
CONTROL = "control"
PING = "ping"
APP_KEEPALIVE = "app_keepalive"


class PingUnsupported(Exception):
    """The downstream transport cannot carry a Ping frame."""


def send_all(sock, data, timeout):
    """Write all of ``data`` or raise: :class:`socket.timeout` when the peer takes none of it for ``timeout``
    (per wait), OSError when the connection is gone.

    Only while a write is under way does the socket carry a timeout: a read that starts waiting meanwhile may time
    out, which the pumps take as nothing read.  One ``send`` (no timer, no ``getsockopt`` as in gevent's
    ``sendall``) is all it takes unless the kernel's buffer is full.
    """
    sock.settimeout(timeout)
    try:
        sent = sock.send(data)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    finally:
        sock.settimeout(None)


def describe(exc):
    """A failed write or read, in a few words for a trace line."""
    if isinstance(exc, socket.timeout):
        return "write timed out"
    return exc.strerror or str(exc) or exc.__class__.__name__


class DownstreamWriter:
    """The only writer to one client.

    ``open`` is whether forwarded bytes still go to the client (the session clears it when the client is gone or
    being closed; the relay's close frame still goes out with :meth:`control`).  ``wrote_business``,
    ``first_business_write``, ``last_write`` and ``last_business_write`` are what the keepalives go by.
    """

    def __init__(self, sock, write_timeout, on_failure, ping_supported=True):
        self.sock = sock
        self.write_timeout = write_timeout
        self.open = True
        self.ping_supported = ping_supported
        # A TLS write that would block must be retried with the same bytes, so only a plain TCP client gets Pings
        # written straight from the hub (try_ping); a TLS one always gets them from a greenlet.
        self.hub_pings = not isinstance(sock, (ssl.SSLSocket, gevent_ssl.SSLSocket))
        self.wrote_business = False
        self.first_business_write = Event()
        self.last_write = self.last_business_write = time.monotonic()
        self.bytes = 0
        self._on_failure = on_failure
        self._lock = Semaphore()
        self._held = False  # held across a half-forwarded frame: nothing may follow it but its own bytes

    def forward(self, data, mid_frame, business):
        """Write forwarded bytes (``mid_frame``: they end inside a frame, so the lock stays held)."""
        if not self.open:
            self._release()
            return False
        if not self._held:
            self._lock.acquire()
            self._held = True
        try:
            send_all(self.sock, data, self.write_timeout)
        except (OSError, socket.timeout) as exc:
            self._release()
            self._fail(FORWARD, exc)
            return False
        self.bytes += len(data)
        self.last_write = now = time.monotonic()
        if business:
            self.last_business_write = now
            if not self.wrote_business:
                self.wrote_business = True
                self.first_business_write.set()
        if not mid_frame:
            self._release()
        return True

    def close(self):
        """No more forwarding.  A half-forwarded frame keeps the lock: nothing of the relay's own may follow it."""
        self.open = False

    def control(self, frame):
        """Write a frame of the relay's own (a close frame) at a frame boundary; False if that is impossible."""
        if self._held:
            return False  # a forwarded frame is half written; nothing may follow it but its own bytes
        with self._lock:
            try:
                send_all(self.sock, frame, self.write_timeout)
            except (OSError, socket.timeout) as exc:
                self._fail(CONTROL, exc)
                return False
        return True

    def send_if(self, frame, condition):
        """Write ``frame`` if the client is still open and ``condition()`` holds once the lock is taken (the app
        keepalive: only at a message boundary, only during a turn); False when it was not written."""
        with self._lock:
            if not self.open or not condition():
                return False
            try:
                send_all(self.sock, frame, self.write_timeout)
            except (OSError, socket.timeout) as exc:
                self._fail(APP_KEEPALIVE, exc)
                return False
            self.last_write = time.monotonic()
        return True

    def ping(self, payload, interval):
        """Write a Ping at a frame boundary (blocking): its send time, or None when none was needed (a write went
        out meanwhile) or the write failed (reported).  Raises :class:`PingUnsupported`."""
        if not self.ping_supported:
            raise PingUnsupported()
        with self._lock:
            if not self.open:
                self._fail(PING, OSError("client already gone"))
                return None
            if time.monotonic() - self.last_write < interval:
                return None
            try:
                send_all(self.sock, frames.build_frame(OP_PING, payload), self.write_timeout)
            except (OSError, socket.timeout) as exc:
                self._fail(PING, exc)
                return None
            self.last_write = sent_at = time.monotonic()
        return sent_at

    def try_ping(self, payload):
        """Write a Ping from the hub if that cannot block: its send time, or None when the lock is taken, the
        socket's buffer is full or the client is a TLS one (:meth:`ping`, from a greenlet, then does it) — or when
        the write failed (reported)."""
        if not (self.hub_pings and self.ping_supported and self.open) or not self._lock.acquire(blocking=False):
            return None
        frame = frames.build_frame(OP_PING, payload)
        sock = self.sock
        sock.settimeout(0.0)
        try:
            sent = sock.send(frame)
        except BlockingIOError:
            self._lock.release()
            return None
        except OSError as exc:
            self._lock.release()
            self._fail(PING, exc)
            return None
        finally:
            sock.settimeout(None)
        self.last_write = sent_at = time.monotonic()
        if sent < len(frame):
            # Rare (a nearly full buffer): the rest of the frame follows from a greenlet, under the lock taken.
            gevent.spawn(self._finish_ping, frame[sent:])
        else:
            self._lock.release()
        return sent_at

    def _finish_ping(self, rest):
        try:
            send_all(self.sock, rest, self.write_timeout)
        except (OSError, socket.timeout) as exc:
            self._fail(FORWARD, exc)
        finally:
            self._lock.release()

    def _release(self):
        if self._held:
            self._held = False
            self._lock.release()

    def _fail(self, what, exc):
        self.open = False
        self._on_failure(what, exc)

    def detach(self):
        """The session is over: drop its callback (a cycle with it that only the cyclic GC would free)."""
        self._on_failure = _ignore_failure


def _ignore_failure(what, exc):
    pass
