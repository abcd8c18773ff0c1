"""A relay session's shared state and plumbing: the writes, the exits, the hooks the keepalive uses.

:class:`Splice` holds what the two pumps (:mod:`wsrelay.pumps`), the keepalive and the session life cycle
(:mod:`wsrelay.relay`) share: the sockets, the write lock that keeps the relay's own frames at frame boundaries,
the frame walkers, the turn ledger, and how a side ended as an :class:`Exit` value (the first one wins).
"""

import socket
import ssl
import time
import uuid
from dataclasses import dataclass

import gevent
from gevent import ssl as gevent_ssl
from gevent.event import Event
from gevent.lock import Semaphore

from . import frames, usage
from .frames import OP_PING
from .keepalive import STAGE_FAILED, PingUnsupported
from .walk import Walker

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
KEEPALIVE = "downstream_keepalive"

_READ_DIRECTION = {"client": CLIENT_TO_UPSTREAM, "upstream": UPSTREAM_TO_CLIENT}


@dataclass(frozen=True)
class Exit:
    """How a session's first side ended.

    ``side`` is the connection that ended (``client`` or ``upstream``; the relay's own timers and shutdown end
    the client side).  ``close_code``/``close_reason``: for ``client_close`` and ``upstream_close`` the code the
    peer sent; for any other client-side end the close the relay sends the client (None: no close frame).
    """

    stage: str
    direction: str
    side: str
    graceful: bool
    error: str = None
    close_code: int = None
    close_reason: str = ""
    close_forwarded: bool = False


class Splice:
    """Per-connection state shared by the pumps, the keepalive and the session life cycle."""

    def __init__(self, down_sock, up_sock, config, tracer, store=None, key_id=None, initial=b"",
                 session_id=None, ping_supported=True, up_initial=b"", app_keepalive=(False, "not_codex")):
        self.id = session_id or uuid.uuid4().hex[:12]
        self.down_sock = down_sock
        self.up_sock = up_sock
        self.tracer = tracer
        self.store = store
        self.key_id = key_id
        self.initial = initial        # client bytes read along with its handshake
        self.up_initial = up_initial  # upstream bytes read along with its 101
        # Bytes a pump had read but not walked when it ended on a bad frame (from that frame's header on): where a
        # lingering close starts walking.
        self.down_pending = b""
        self.up_pending = b""
        self.ping_supported = ping_supported
        # A TLS write that would block must be retried with the same bytes, so only a plain TCP client gets
        # Pings written straight from the hub (try_send_ping); a TLS one always gets them from a greenlet.
        self._hub_pings = not isinstance(down_sock, (ssl.SSLSocket, gevent_ssl.SSLSocket))
        ws = "gateway.openai_ws."
        self.ping_interval = config[ws + "passthrough_downstream_ping_interval_seconds"]
        self.ping_timeout = config[ws + "passthrough_downstream_ping_timeout_seconds"]
        self.drain_timeout = config[ws + "upstream_drain_timeout_seconds"]
        self.read_limit = config[ws + "client_read_limit_bytes"]
        # (on, why): whether this client gets the app keepalive (see keepalive.app_keepalive_choice).
        self.app_keepalive, self.app_keepalive_why = app_keepalive
        self.app_keepalive_interval = config[ws + "passthrough_downstream_app_keepalive_interval_seconds"]
        self.first_message_timeout = config[ws + "client_first_message_timeout_seconds"]
        self.idle_timeout = config[ws + "ingress_inter_turn_idle_timeout_seconds"]
        self.read_timeout = config[ws + "read_timeout_seconds"]
        self.close_timeout = config[ws + "close_timeout_seconds"]
        self.write_timeout = config[ws + "write_timeout_seconds"]
        self.linger_timeout = config[ws + "lingering_close_timeout_seconds"]
        self.linger_max_bytes = config[ws + "lingering_close_max_bytes"]
        # Reads wait without a timer (a gevent socket with a timeout arms one per blocking read); writes are
        # bounded by write_timeout in _write.
        down_sock.settimeout(None)
        up_sock.settimeout(None)
        self.max_event_bytes = config["usage.max_event_bytes"]
        self.ledger = usage.TurnLedger(self.id, key_id)
        # The frame walk of each direction; its state is the pump's fragmentation state.
        self.down_walker = Walker(True, self.read_limit)
        self.up_walker = Walker(False, 0, _LEDGER_TYPES)

        self.downstream_open = True
        self.upstream_open = True
        self.draining = False
        self.wrote_downstream = False
        self.first_business_write = Event()
        self.started = self.last_downstream_write = self.last_upstream_read = time.monotonic()
        self.turns_started = 0
        self.turn_ended_at = None
        self.turn_watchers = []  # Events set when a turn starts or ends (the app keepalive waits on one)
        self._timer = None
        self.last_business_write = self.started
        self.shutting_down = False
        self.pong_event = Event()
        self.expected_pong = None
        self._down_lock = Semaphore()
        self._down_locked = False  # held by the upstream pump while a frame is half forwarded
        self._up_mid_frame = False
        self._exit = None
        self._exit_event = Event()
        self._drain_done = Event()
        self._lingering = []  # greenlets reading what a peer still sends after the relay's own close
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0

    # Frames read from each side (control frames the relay consumes included).
    @property
    def frames_to_upstream(self):
        return self.down_walker.frames

    @property
    def frames_to_client(self):
        return self.up_walker.frames

    @property
    def down_in_message(self):
        """A fragmented upstream message is being forwarded (nothing of the relay's own may interleave)."""
        return self.up_walker.in_message

    # -- shared plumbing -----------------------------------------------------------------------------------

    def trace(self, stage, **fields):
        self.tracer.emit(stage, session=self.id, **fields)

    def _write(self, sock, data):
        """Write all of ``data`` or raise: :class:`socket.timeout` when the peer takes none of it for
        ``write_timeout`` (per wait), OSError when the connection is gone.

        Only while a write is under way does the socket carry a timeout: a read that starts waiting meanwhile
        may time out, which the pumps take as nothing read.  One ``send`` (no timer, no ``getsockopt`` as in
        gevent's ``sendall``) is all it takes unless the kernel's buffer is full.
        """
        sock.settimeout(self.write_timeout)
        try:
            sent = sock.send(data)
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        finally:
            sock.settimeout(None)

    def _report(self, exit_):
        """Record how a side ended (the first report wins) and stop using a connection that is broken."""
        if self._exit is None:
            self._exit = exit_
            self._exit_event.set()
        if exit_.side == "client":
            self.downstream_open = False
        elif exit_.stage != "upstream_close":
            self.upstream_open = False  # after a close frame the upstream still expects our close in reply
        return exit_

    def _record(self, records):
        for record in records:
            self.trace("usage_recorded", response_id=record.response_id, model=record.model,
                       terminal_event=record.terminal_event, input_tokens=record.input_tokens,
                       output_tokens=record.output_tokens, total_tokens=record.total_tokens,
                       client_disconnected=record.client_disconnected)
            if self.store is not None:
                self.store.put(record)

    def _send_down(self, data, mid_frame, business):
        """Write forwarded bytes to the client; holds the write lock across a half-forwarded frame."""
        if not self.downstream_open:
            if self._down_locked:
                self._down_locked = False
                self._down_lock.release()
            return
        if not self._down_locked:
            self._down_lock.acquire()
            self._down_locked = True
        try:
            self._write(self.down_sock, data)
        except (OSError, socket.timeout) as exc:
            self._down_locked = False
            self._down_lock.release()
            self._report(Exit("client_write_failed", UPSTREAM_TO_CLIENT, "client", True, error=_describe(exc)))
            return
        self.bytes_to_client += len(data)
        self.last_downstream_write = now = time.monotonic()
        if business:
            self.last_business_write = now
            if not self.wrote_downstream:
                self.wrote_downstream = True
                self.first_business_write.set()
        if not mid_frame:
            self._down_locked = False
            self._down_lock.release()

    def _send_down_control(self, frame):
        """Write a frame of the relay's own to the client, at a frame boundary; False if that is impossible."""
        if self._down_locked:
            return False  # a forwarded frame is half written; nothing may follow it but its own bytes
        with self._down_lock:
            try:
                self._write(self.down_sock, frame)
            except (OSError, socket.timeout):
                return False
        return True

    def _turn_changed(self):
        self.arm_timers()
        for event in self.turn_watchers:
            event.set()

    def arm_timers(self):
        """The session timers (see :class:`wsrelay.relay.Session`)."""

    def send_app_keepalive(self, frame):
        """Write a text frame of the relay's own at a *message* boundary; False when not possible right now."""
        with self._down_lock:
            if not self.downstream_open or self.down_in_message or not self.ledger.in_flight:
                return False
            self._write(self.down_sock, frame)
            self.last_downstream_write = time.monotonic()
        return True

    def shutdown(self, force=False):
        """The server is stopping: close the client with 1001 now if no turn is in flight (or ``force``),
        else as soon as the turn's terminal event has been forwarded."""
        self.shutting_down = True
        if force or not self.ledger.in_flight:
            self._report(Exit("server_shutdown", CLIENT_TO_UPSTREAM, "client", True,
                              close_code=frames.CLOSE_GOING_AWAY, close_reason="server shutting down"))

    def send_ping(self, payload, interval):
        """Write a Ping at a frame boundary; returns its send time, or None if a write made it unnecessary."""
        if not self.ping_supported:
            raise PingUnsupported()
        with self._down_lock:
            if not self.downstream_open:
                raise OSError("client already gone")
            if time.monotonic() - self.last_downstream_write < interval:
                return None
            self._write(self.down_sock, frames.build_frame(OP_PING, payload))
            self.last_downstream_write = sent_at = time.monotonic()
        return sent_at

    def try_send_ping(self, payload):
        """Write a Ping from the hub if that cannot block: its send time, or None when the write lock is taken or
        the socket's buffer is full (the keepalive then does it in a greenlet, with :meth:`send_ping`).
        Raises OSError when the client is gone."""
        if not (self._hub_pings and self.ping_supported and self.downstream_open) \
                or not self._down_lock.acquire(blocking=False):
            return None
        frame = frames.build_frame(OP_PING, payload)
        sock = self.down_sock
        sock.settimeout(0.0)
        try:
            sent = sock.send(frame)
        except BlockingIOError:
            self._down_lock.release()
            return None
        except BaseException:
            self._down_lock.release()
            raise
        finally:
            sock.settimeout(None)
        self.last_downstream_write = sent_at = time.monotonic()
        if sent < len(frame):
            # Rare (a nearly full buffer): the rest of the frame follows from a greenlet, under the lock taken.
            gevent.spawn(self._finish_ping, frame[sent:])
        else:
            self._down_lock.release()
        return sent_at

    def _finish_ping(self, rest):
        try:
            self._write(self.down_sock, rest)
        except (OSError, socket.timeout) as exc:
            self._report(Exit("client_write_failed", KEEPALIVE, "client", True, error=_describe(exc)))
        finally:
            self._down_lock.release()

    def keepalive_failed(self, error):
        if self._exit is not None:
            return None  # the session already ended another way; the failed Ping is not news
        self.trace(STAGE_FAILED, direction=KEEPALIVE, graceful=True,
                   wrote_downstream=self.wrote_downstream, error=error)
        return self._report(Exit("downstream_ping_failed", KEEPALIVE, "client", True, error=error))

    def _send_up(self, data, mid_frame=False):
        if not self.upstream_open:
            return True
        try:
            self._write(self.up_sock, data)
        except (OSError, socket.timeout) as exc:
            self._report(Exit("upstream_write_failed", CLIENT_TO_UPSTREAM, "upstream", False, error=_describe(exc)))
            return False
        self.bytes_to_upstream += len(data)
        self._up_mid_frame = mid_frame
        return True

    def _receive(self, sock, view, end, side):
        """One read into ``view[end:]``: the byte count; None after a read timeout (possible only while a write on
        the same socket carries the write timeout; reading simply goes on); or, when ``side`` is gone, its
        reported :class:`Exit`."""
        try:
            n = sock.recv_into(view[end:])
        except socket.timeout:
            return None
        except OSError as exc:
            return self._report(Exit(side + "_reset", _READ_DIRECTION[side], side, side == "client",
                                     error=_describe(exc)))
        if not n:
            return self._report(Exit(side + "_eof", _READ_DIRECTION[side], side, side == "client",
                                     error="%s closed the connection without a close frame" % side))
        return n


_LEDGER_TYPES = tuple(t.encode("ascii") for t in usage.LEDGER_EVENTS)


def _describe(exc):
    if isinstance(exc, socket.timeout):
        return "write timed out"
    return exc.strerror or str(exc) or exc.__class__.__name__
