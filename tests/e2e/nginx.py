"""A private nginx reverse proxy for end-to-end tests of wsrelay.

``NginxProxy`` runs its own nginx process with its own prefix in a temporary
directory and its own configuration, listening on 127.0.0.1 only, and proxies
WebSocket connections and plain HTTP requests to an upstream on 127.0.0.1.
HTTP responses are passed on as they arrive (``proxy_buffering off``, HTTP/1.1
to the upstream), so a Server-Sent Events stream reaches the client event by
event. Its ``proxy_read_timeout`` is configurable so tests can check that
wsrelay keeps an otherwise silent connection or event stream alive through a
real proxy.

The module uses only the standard library, so it works both with and without
gevent monkey-patching.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["NginxProxy", "nginx_binary", "NGINX_MISSING_MESSAGE"]

NGINX_MISSING_MESSAGE = (
    "nginx was not found (neither on PATH nor at /usr/sbin/nginx); "
    "run bin/run-tests, which installs Debian's nginx-light and then runs the tests"
)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# nginx's default proxy_send_timeout, used when none is given.
DEFAULT_SEND_TIMEOUT = 60.0

_CONFIG_TEMPLATE = """\
# Private nginx for wsrelay end-to-end tests.
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    access_log off;

    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        # Codex's requests carry the whole conversation (images make MBs).
        client_max_body_size 64m;

        location {path_prefix} {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_connect_timeout 5s;
            proxy_read_timeout {read_timeout_ms}ms;
            proxy_send_timeout {send_timeout_ms}ms;
            # Server-Sent Events: each event goes to the client as it arrives.
            proxy_buffering off;
            proxy_cache off;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """Return the path of the nginx executable, or None if it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    fallback = "/usr/sbin/nginx"
    if os.path.isfile(fallback) and os.access(fallback, os.X_OK):
        return fallback
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _ms(seconds: float) -> int:
    value = int(round(float(seconds) * 1000))
    if value <= 0:
        raise ValueError(f"timeout must be positive, got {seconds!r}")
    return value


class NginxProxy:
    """A private nginx (own prefix in a temp dir, own config, loopback only)
    proxying WebSocket and HTTP (SSE unbuffered) to 127.0.0.1:<upstream_port>."""

    def __init__(
        self,
        upstream_port: int,
        read_timeout: float = 3.0,
        send_timeout: float | None = None,
        path_prefix: str = "/",
    ) -> None:
        if not path_prefix.startswith("/"):
            raise ValueError(f"path_prefix must start with '/', got {path_prefix!r}")
        self.upstream_port = int(upstream_port)
        self.read_timeout = float(read_timeout)
        self.send_timeout = DEFAULT_SEND_TIMEOUT if send_timeout is None else float(send_timeout)
        self.path_prefix = path_prefix
        self.port: int | None = None
        self.prefix: str | None = None
        self.conf_path: str | None = None
        self.error_log_path: str | None = None
        self._proc: subprocess.Popen | None = None

    # -- public API --------------------------------------------------------

    def url(self, path: str = "/") -> str:
        if self.port is None:
            raise RuntimeError("NginxProxy is not started")
        if not path.startswith("/"):
            path = "/" + path
        return f"ws://127.0.0.1:{self.port}{path}"

    def http_url(self, path: str = "/") -> str:
        """The same address as :meth:`url` with the http scheme (e.g. a client's base URL)."""
        return "http" + self.url(path)[len("ws"):]

    def start(self) -> "NginxProxy":
        if self._proc is not None:
            raise RuntimeError("NginxProxy is already started")
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError(NGINX_MISSING_MESSAGE)
        self.prefix = tempfile.mkdtemp(prefix="wsrelay-nginx-")
        try:
            # The free port is picked by binding port 0 and releasing it, so
            # another process may grab it first: retry with a new port then.
            last_error: Exception | None = None
            for _ in range(3):
                try:
                    self._start_once(binary)
                    return self
                except _AddressInUse as exc:
                    last_error = exc
            raise RuntimeError(str(last_error))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)
        prefix, self.prefix = self.prefix, None
        if prefix is not None:
            shutil.rmtree(prefix, ignore_errors=True)

    def error_log(self) -> str:
        """Return the contents of nginx's error log ('' if there is none)."""
        if not self.error_log_path:
            return ""
        return _read_text(self.error_log_path)

    def __enter__(self) -> "NginxProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"NginxProxy(port={self.port}, upstream_port={self.upstream_port}, "
            f"read_timeout={self.read_timeout})"
        )

    # -- internals ---------------------------------------------------------

    def _write_config(self) -> None:
        assert self.prefix is not None and self.port is not None
        for sub in ("logs", "client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
            os.makedirs(os.path.join(self.prefix, sub), exist_ok=True)
        self.conf_path = os.path.join(self.prefix, "nginx.conf")
        self.error_log_path = os.path.join(self.prefix, "error.log")
        text = _CONFIG_TEMPLATE.format(
            prefix=self.prefix,
            port=self.port,
            upstream_port=self.upstream_port,
            path_prefix=self.path_prefix,
            read_timeout_ms=_ms(self.read_timeout),
            send_timeout_ms=_ms(self.send_timeout),
        )
        with open(self.conf_path, "w", encoding="utf-8") as fh:
            fh.write(text)

    def _start_once(self, binary: str) -> None:
        assert self.prefix is not None
        self.port = _free_port()
        self._write_config()
        # Start from an empty log so a failure report shows only this attempt.
        open(self.error_log_path, "w").close()
        stderr_path = os.path.join(self.prefix, "stderr.log")
        with open(stderr_path, "wb") as stderr_file:
            proc = subprocess.Popen(
                [binary, "-p", self.prefix + "/", "-c", self.conf_path, "-e", self.error_log_path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                cwd=self.prefix,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                report = self._failure_report(
                    f"nginx exited with status {proc.returncode}", _read_text(stderr_path)
                )
                if "Address already in use" in report:
                    raise _AddressInUse(report)
                raise RuntimeError(report)
            if self._accepts():
                break
            if time.monotonic() >= deadline:
                self._terminate(proc)
                raise RuntimeError(
                    self._failure_report(
                        f"nginx did not accept connections within {START_TIMEOUT:g} s",
                        _read_text(stderr_path),
                    )
                )
            time.sleep(0.02)
        self._proc = proc

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _failure_report(self, what: str, stderr: str) -> str:
        parts = [f"{what} (port {self.port}, config {self.conf_path})"]
        if stderr.strip():
            parts.append("stderr:\n" + stderr.strip())
        log = self.error_log().strip()
        if log:
            parts.append("error log:\n" + log)
        return "\n".join(parts)

    @staticmethod
    def _terminate(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                # SIGTERM: nginx's fast shutdown.
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)


class _AddressInUse(RuntimeError):
    pass
