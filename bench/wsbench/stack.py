"""The stack under test: the Node upstream, a private nginx and wsrelay, each on its own 127.0.0.1 port."""

import json
import os
import shutil
import signal
import subprocess
import time

from .procs import HARD_NOFILE, HERE, ROOT, BenchError, Proc, free_port, log, wait_closed, wait_port


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
events {{
    worker_connections {conns};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_buffer_size 16k;
            proxy_buffers 4 16k;
            proxy_busy_buffers_size 32k;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
    # The Responses HTTP transport, on a port of its own so that the WebSocket location above stays as it is
    # (both use /v1/responses): HTTP/1.1 with kept-alive upstream connections, each event passed on as it comes.
    upstream bench_upstream_http {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{http_port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://bench_upstream_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_buffer_size 16k;
            proxy_buffers 4 16k;
            proxy_busy_buffers_size 32k;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def nginx_binary():
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def _flatten(tree, prefix=""):
    out = set()
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out |= _flatten(value, prefix + key + ".")
        else:
            out.add(prefix + key)
    return out


class Stack:
    """The upstream, nginx and wsrelay processes; targets are (name, port, process measured)."""

    def __init__(self, tmp, node, nginx, wsrelay_cmd=None):
        self.tmp = tmp
        self.wsrelay_cmd = wsrelay_cmd or [os.path.join(ROOT, "bin", "wsrelay")]
        self.node = node
        self.nginx_bin = nginx
        self.upstream = self.nginx = self.wsrelay = None
        self.upstream_port = free_port()
        self.ctrl_port = free_port()
        self.nginx_port = free_port()
        self.nginx_http_port = free_port()
        self.wsrelay_port = free_port()
        self.wsrelay_starts = 0
        self.trace_path = None
        self.upstream_clock = None   # the upstream's wall clock minus CLOCK_MONOTONIC (ms)
        self.wsrelay_settings = self._known_settings()
        self.wsrelay_ping = None
        self.wsrelay_extra = {}      # settings added to every start (bench/usage-pg: usage.database_url)

    def _known_settings(self):
        out = subprocess.run(self.wsrelay_cmd + ["check-config", "--print-defaults"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise BenchError("bin/wsrelay check-config --print-defaults failed: %s" % out.stderr.strip()[-500:])
        import yaml
        return _flatten(yaml.safe_load(out.stdout))

    # upstream
    def start_upstream(self):
        spec = {"port": self.upstream_port, "ctrlPort": self.ctrl_port, "maxSeconds": 7200}
        self.upstream = Proc("upstream", [self.node, os.path.join(HERE, "upstream.js"), json.dumps(spec)], self.tmp)
        self.upstream_clock = self.upstream.expect("listening", 15).get("wall_minus_mono_ms")

    def restart_upstream(self):
        self.upstream.stop()
        self.start_upstream()

    # nginx
    def start_nginx(self):
        if not self.nginx_bin:
            return
        prefix = os.path.join(self.tmp, "nginx")
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(prefix=prefix, port=self.nginx_port, http_port=self.nginx_http_port,
                                      upstream_port=self.upstream_port,
                                      nofile=HARD_NOFILE, conns=max(1024, HARD_NOFILE - 100)))
        self.nginx = Proc("nginx", [self.nginx_bin, "-p", prefix, "-c", conf, "-e",
                                    os.path.join(prefix, "nginx-error.log")], self.tmp, json_stdout=False)
        wait_port(self.nginx_port, 15, self.nginx)
        wait_port(self.nginx_http_port, 15, self.nginx)

    def restart_nginx(self):
        if self.nginx is not None:
            self.nginx.stop(signal.SIGQUIT)
            wait_closed(self.nginx_port)
        self.start_nginx()

    # wsrelay
    def start_wsrelay(self, ping_interval=20.0, ping_timeout=5.0):
        self.wsrelay_starts += 1
        ws = "gateway.openai_ws."
        settings = {
            "server.host": "127.0.0.1",
            "server.port": self.wsrelay_port,
            "server.backlog": 4096,
            "upstream.url": "ws://127.0.0.1:%d/v1/responses" % self.upstream_port,
            "usage.sqlite_path": os.path.join(self.tmp, "usage.db"),
            "trace.path": os.path.join(self.tmp, "trace-%d.log" % self.wsrelay_starts),
            ws + "passthrough_downstream_ping_interval_seconds": ping_interval,
            ws + "passthrough_downstream_ping_timeout_seconds": ping_timeout,
        }
        settings.update(self.wsrelay_extra)
        # Settings the relay may or may not have (the code moves): the bench's traffic is not Codex turns
        # (no response.create), and it holds thousands of sessions under one (absent) credential.
        optional = {
            "server.max_connections": max(10000, (HARD_NOFILE - 200) // 2),
            "server.shutdown_grace_seconds": 1.0,
            ws + "max_ingress_connections_per_api_key": 100000,
            ws + "client_first_message_timeout_seconds": 0,
            ws + "ingress_inter_turn_idle_timeout_seconds": 0,
        }
        settings.update({k: v for k, v in optional.items() if k in self.wsrelay_settings})
        tree = {}
        for key, value in settings.items():
            node = tree
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        conf = os.path.join(self.tmp, "wsrelay.yaml")
        with open(conf, "w") as f:
            json.dump(tree, f, indent=1)  # JSON is YAML
        check = subprocess.run(self.wsrelay_cmd + ["check-config", "--config", conf],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise BenchError("wsrelay rejects the bench config: %s" % (check.stderr or check.stdout).strip()[-800:])
        self.trace_path = settings["trace.path"]
        self.wsrelay = Proc("wsrelay", self.wsrelay_cmd + ["serve", "--config", conf], self.tmp,
                            cwd=self.tmp, json_stdout=False)
        wait_port(self.wsrelay_port, 30, self.wsrelay)
        self.wsrelay_ping = (ping_interval, ping_timeout)

    def restart_wsrelay(self, ping_interval=20.0, ping_timeout=5.0):
        if self.wsrelay is not None:
            self.wsrelay.stop(signal.SIGINT)
            wait_closed(self.wsrelay_port)
        self.start_wsrelay(ping_interval, ping_timeout)

    def ensure_wsrelay(self, ping_interval=20.0, ping_timeout=5.0):
        if self.wsrelay is None or self.wsrelay_ping != (ping_interval, ping_timeout) \
                or self.wsrelay.popen.poll() is not None:
            self.restart_wsrelay(ping_interval, ping_timeout)

    def targets(self):
        out = [("DIRECT", self.upstream_port, self.upstream)]
        if self.nginx is not None:
            out.append(("NGINX", self.nginx_port, self.nginx))
        out.append(("WSRELAY", self.wsrelay_port, self.wsrelay))
        return out

    def target(self, name):
        for t in self.targets():
            if t[0] == name:
                return t
        raise BenchError("no target %s" % name)

    def http_port(self, name):
        """Where ``name`` serves the Responses HTTP transport: nginx has a server of its own for it."""
        return self.nginx_http_port if name == "NGINX" else self.target(name)[1]

    def restart(self, name):
        if name == "DIRECT":
            self.restart_upstream()
        elif name == "NGINX":
            self.restart_nginx()
        else:
            self.restart_wsrelay(*(self.wsrelay_ping or (20.0, 5.0)))

    def check_alive(self):
        for proc in (self.upstream, self.nginx, self.wsrelay):
            if proc is not None and proc.popen.poll() is not None:
                raise BenchError("%s died (exit %s); see its log" % (proc.name, proc.popen.returncode))

    def settle(self, baseline_fds, timeout=20.0, slack=2):
        """Wait until the processes hold no more descriptors than before a run (the sessions are gone), give or
        take ``slack`` (the HTTP scenarios leave kept-alive upstream connections in the proxies' pools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all((p.fd_count() or 0) <= baseline_fds.get(p.name, 1 << 30) + slack for p in self._procs()):
                return True
            time.sleep(0.05)
        log("warning: sessions still open %gs after a run: %s" % (
            timeout, ", ".join("%s=%s" % (p.name, p.fd_count()) for p in self._procs())))
        return False

    def fds(self):
        return {p.name: p.fd_count() or 0 for p in self._procs()}

    def _procs(self):
        return [p for p in (self.upstream, self.nginx, self.wsrelay) if p is not None]
