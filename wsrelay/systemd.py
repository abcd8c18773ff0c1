"""systemd service notifications (``Type=notify``): READY, STOPPING, STATUS and the watchdog.

The protocol is one datagram per message on the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (``@`` is the
abstract namespace).  systemd-python needs libsystemd's headers to build, and the protocol is small enough that
this module is shorter than a pure-Python dependency would be.

``WATCHDOG=1`` is sent from a greenlet, so a blocked event loop stops the pings and systemd restarts the service
(``WatchdogSec=`` in the unit).
"""

import os
import socket

import gevent


def _address(env):
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


def notify(message, env=None):
    """Send ``message`` (e.g. ``"READY=1"``); False when not run under systemd or the socket is gone."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
        sock.sendall(message.encode("utf-8"))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def watchdog_interval(env=None):
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is set
    for this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.strip() != str(os.getpid())):
        return None
    try:
        usec = int(usec)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """READY/STOPPING/STATUS for one server process, plus the watchdog greenlet while it runs."""

    def __init__(self, status=None, env=None, status_interval=10.0):
        self.env = os.environ if env is None else env
        self.status = status  # callable returning the STATUS= text
        self.status_interval = status_interval
        self._greenlet = None

    @property
    def enabled(self):
        return _address(self.env) is not None

    def ready(self):
        if not self.enabled:
            return
        notify("READY=1\nSTATUS=%s" % self._status_text(), self.env)
        self._greenlet = gevent.spawn(self._tick)

    def stopping(self):
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        notify("STOPPING=1\nSTATUS=stopping: %s" % self._status_text(), self.env)

    def _status_text(self):
        return self.status() if self.status else "running"

    def _tick(self):
        watchdog = watchdog_interval(self.env)
        step = min(watchdog or self.status_interval, self.status_interval)
        since_status = 0.0
        while True:
            gevent.sleep(step)
            since_status += step
            lines = ["WATCHDOG=1"] if watchdog else []
            if since_status >= self.status_interval:
                lines.append("STATUS=" + self._status_text())
                since_status = 0.0
            if lines:
                notify("\n".join(lines), self.env)
