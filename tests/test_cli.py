"""The ``wsrelay`` command line, run as a real process: check-config, usage, serve."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import websocket

from tests.helpers import REPO, free_port
from wsrelay import configdoc
from wsrelay.auth import KeyRing
from wsrelay.report import FIELDS
from wsrelay.store import UsageStore
from wsrelay.usage import UsageRecord

pytestmark = pytest.mark.timeout(30)


def run(*args, timeout=20):
    """Run ``python -m wsrelay ARGS`` from the repository root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "wsrelay"] + [str(a) for a in args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, text, name="wsrelay.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def good_config(tmp_path, port=None, extra=""):
    return write_config(tmp_path, """
server:
  host: 127.0.0.1
  port: %d
usage:
  sqlite_path: %s
gateway:
  openai_ws:
    close_timeout_seconds: 1
    upstream_drain_timeout_seconds: 2
%s""" % (port or free_port(), json.dumps(str(tmp_path / "usage.db")), extra))


# -- check-config ------------------------------------------------------------------------------------------------


def test_check_config_accepts_a_good_file(tmp_path):
    path = good_config(tmp_path)
    result = run("check-config", "--config", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "%s: OK" % path


def test_check_config_accepts_the_sample_file():
    result = run("check-config", "--config", os.path.join("etc", "wsrelay.yaml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_lists_every_bad_key_and_value(tmp_path):
    path = write_config(tmp_path, """
server:
  port: 99999
  colour: blue
upstream:
  url: https://api.openai.com/v1/responses
  connect_timeout_seconds: 0
gateway:
  openai_ws:
    passthrough_downstream_ping_interval_seconds: 2
    passthrough_downstream_ping_timeout_seconds: 3
""")
    result = run("check-config", "--config", path)
    assert result.returncode != 0
    assert "OK" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("wsrelay: config: ")]
    assert len(lines) == 5, result.stderr
    for name in ("server.port", "server.colour", "upstream.url", "upstream.connect_timeout_seconds",
                 "gateway.openai_ws.passthrough_downstream_ping_timeout_seconds"):
        assert len([line for line in lines if line.startswith("wsrelay: config: %s: " % name)]) == 1, \
            (name, result.stderr)
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file_fails_with_a_message(tmp_path):
    path = str(tmp_path / "absent.yaml")
    result = run("check-config", "--config", path)
    assert result.returncode != 0
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_check_config_needs_a_file_or_print_defaults():
    result = run("check-config")
    assert result.returncode != 0
    assert "--config" in result.stderr


def test_check_config_warns_when_keys_have_no_upstream_credential(tmp_path):
    path = good_config(tmp_path, extra="auth:\n  keys: [relay-key]\nupstream:\n  api_key_env: WSRELAY_TEST_UNSET\n")
    env = dict(os.environ)
    env.pop("WSRELAY_TEST_UNSET", None)
    result = subprocess.run([sys.executable, "-m", "wsrelay", "check-config", "--config", path], cwd=REPO,
                            capture_output=True, text=True, timeout=20, env=env)
    assert result.returncode == 0
    assert "warning" in result.stderr and "upstream credential" in result.stderr


def test_print_defaults_prints_the_rendered_sample():
    result = run("check-config", "--print-defaults")
    assert result.returncode == 0, result.stderr
    assert result.stdout == configdoc.render_yaml()
    with open(os.path.join(REPO, "etc", "wsrelay.yaml"), encoding="utf-8") as fh:
        assert result.stdout == fh.read()


# -- usage -------------------------------------------------------------------------------------------------------

T0 = 1764139290.123


def make_records():
    return [
        UsageRecord(session_id="s1", response_id="resp_one", model="gpt-5-codex", key_id="k0123456789abcdef",
                    input_tokens=1200, output_tokens=300, total_tokens=1500, cached_tokens=200,
                    reasoning_tokens=100, image_tokens=0, terminal_event="response.completed",
                    client_disconnected=False, started_at=T0, duration_ms=4200),
        UsageRecord(session_id="s2", response_id=None, model="gpt-5", key_id=None, input_tokens=50,
                    output_tokens=7, total_tokens=57, cached_tokens=0, reasoning_tokens=0, image_tokens=64,
                    terminal_event="wsrelay.drain_timeout", client_disconnected=True, started_at=T0 + 60,
                    duration_ms=60000),
    ]


@pytest.fixture
def usage_db(tmp_path):
    """A config whose usage database holds the two records of :func:`make_records`."""
    path = good_config(tmp_path)
    store = UsageStore(str(tmp_path / "usage.db"))
    store.start()
    for record in make_records():
        store.put(record)
    assert store.flush(10)
    store.close()
    return path


def test_usage_json_lists_the_records_with_the_documented_fields(usage_db):
    result = run("usage", "--config", usage_db, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and len(rows) == 2
    documented = ["response_id", "model", "key_id", "input_tokens", "output_tokens", "total_tokens",
                  "cached_tokens", "reasoning_tokens", "image_tokens", "terminal_event", "client_disconnected",
                  "started_at", "duration_ms", "transport", "account", "resumed", "instance"]
    assert list(FIELDS) == documented
    for row in rows:
        assert list(row) == documented
    first, second = rows
    assert first["response_id"] == "resp_one" and first["model"] == "gpt-5-codex"
    assert first["key_id"] == "k0123456789abcdef"
    assert (first["input_tokens"], first["output_tokens"], first["total_tokens"]) == (1200, 300, 1500)
    assert (first["cached_tokens"], first["reasoning_tokens"], first["image_tokens"]) == (200, 100, 0)
    assert first["terminal_event"] == "response.completed" and first["client_disconnected"] is False
    assert first["started_at"] == "2025-11-26T06:41:30.123Z"
    assert first["duration_ms"] == 4200
    assert second["response_id"] is None and second["key_id"] is None
    assert second["client_disconnected"] is True and second["image_tokens"] == 64
    assert second["terminal_event"] == "wsrelay.drain_timeout"


def test_usage_db_flag_reads_that_database(usage_db, tmp_path):
    result = run("usage", "--db", tmp_path / "usage.db", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [r["model"] for r in json.loads(result.stdout)] == ["gpt-5-codex", "gpt-5"]


def test_usage_reads_postgresql_when_the_config_names_a_database_url(tmp_path, postgres):
    url = postgres[1]
    store = UsageStore(url, fallback_path=str(tmp_path / "pending.jsonl"))
    store.start()
    for record in make_records():
        store.put(record)
    assert store.flush(10)
    store.close()
    path = write_config(tmp_path, "usage: {database_url: %s, fallback_path: %s}\n"
                        % (json.dumps(url), json.dumps(str(tmp_path / "pending.jsonl"))))
    result = run("usage", "--config", path, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [r["response_id"] for r in json.loads(result.stdout)] == ["resp_one", None]
    by_flag = run("usage", "--config", good_config(tmp_path), "--db", url, "--format", "json")
    assert by_flag.returncode == 0 and len(json.loads(by_flag.stdout)) == 2, by_flag.stderr


def test_check_config_accepts_a_database_url_and_never_prints_its_password(tmp_path):
    path = write_config(tmp_path, "usage: {database_url: 'postgresql://relay:hunter2@db.internal/usage'}\n")
    result = run("check-config", "--config", path)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_usage_since_filters_by_start_time(usage_db):
    result = run("usage", "--config", usage_db, "--format", "json", "--since", T0 + 1)
    assert result.returncode == 0, result.stderr
    assert [r["model"] for r in json.loads(result.stdout)] == ["gpt-5"]


def test_usage_table_shows_the_records_and_a_total_row(usage_db):
    result = run("usage", "--config", usage_db, "--format", "table")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == list(FIELDS)
    assert any("resp_one" in line and "gpt-5-codex" in line for line in lines)
    assert any("wsrelay.drain_timeout" in line for line in lines)
    total = lines[-1].split()
    assert total[0] == "TOTAL"
    assert total[1:] == ["1250", "307", "1557", "200", "100", "64"]


def test_usage_csv_has_a_header_and_one_line_per_record(usage_db):
    result = run("usage", "--config", usage_db, "--format", "csv")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ",".join(FIELDS)
    assert len(lines) == 3 and lines[1].startswith("resp_one,gpt-5-codex,")


def test_usage_default_format_is_the_table(usage_db):
    result = run("usage", "--config", usage_db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split()[0] == "TOTAL"


def test_usage_of_an_empty_database_is_an_empty_json_array(tmp_path):
    result = run("usage", "--config", good_config(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_usage_with_an_invalid_config_fails_with_a_message(tmp_path):
    result = run("usage", "--config", write_config(tmp_path, "usage:\n  sqlite_pth: x.db\n"), "--format", "json")
    assert result.returncode != 0
    assert "usage.sqlite_pth: unknown setting" in result.stderr


# -- serve -------------------------------------------------------------------------------------------------------


def test_serve_with_an_invalid_config_exits_with_a_clear_message(tmp_path):
    path = write_config(tmp_path, "server:\n  port: not-a-port\nupstream:\n  url: http://x.example/\n")
    result = run("serve", "--config", path)
    assert result.returncode != 0
    assert "wsrelay: config: server.port: " in result.stderr
    assert "wsrelay: config: upstream.url: " in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_an_invalid_upstream_flag_exits_with_a_clear_message(tmp_path):
    result = run("serve", "--config", good_config(tmp_path), "--upstream", "https://api.openai.com/v1/responses")
    assert result.returncode != 0
    assert "wsrelay: config: upstream.url: " in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_busy_port_exits_with_a_clear_message(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        result = run("serve", "--config", good_config(tmp_path), "--port", busy.getsockname()[1])
    finally:
        busy.close()
    assert result.returncode != 0
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_workers_but_no_gunicorn_says_which_extra_to_install(tmp_path):
    # gunicorn made unimportable in this process only, as in an install without the gunicorn extra.
    code = "import sys; sys.modules['gunicorn'] = None; from wsrelay.cli import main; main(prog_name='wsrelay')"
    result = subprocess.run([sys.executable, "-c", code, "serve", "--config", good_config(tmp_path), "--workers", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "wsrelay: 2 workers need the gunicorn extra: pip install 'wsrelay[gunicorn]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_workers_on_a_busy_port_exits_with_gunicorns_message(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:  # (gunicorn tries five times, a second apart)
        result = run("serve", "--config", good_config(tmp_path), "--port", busy.getsockname()[1], "--workers", 2)
    finally:
        busy.close()
    assert result.returncode == 1
    assert "Connection in use" in result.stderr and "Traceback" not in result.stderr
    assert "stage=server_stopped status=1" in result.stderr


def run_turn(url):
    """One response.create over a websocket-client connection; returns the terminal event."""
    ws = websocket.create_connection(url, timeout=10)
    try:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-cli-test", "input": []}))
        while True:
            event = json.loads(ws.recv())
            if event["type"] in ("response.completed", "response.failed", "error"):
                return event
    finally:
        ws.close()


def test_serve_relays_a_turn_stops_on_sigterm_and_records_the_usage(tmp_path, fake, serve):
    app, up_url = fake()
    port = free_port()
    path = good_config(tmp_path)
    served = serve("--config", path, "--port", port, "--upstream", up_url)
    served.wait_listening(port)
    terminal = run_turn("ws://127.0.0.1:%d/v1/responses" % port)
    assert terminal["type"] == "response.completed"
    assert len(app.handshakes) == 1
    assert served.terminate(timeout=5) == 0, served.stderr()
    assert "stage=server_stopped" in served.stderr()
    result = run("usage", "--config", path, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["response_id"] == terminal["response"]["id"]
    assert row["model"] == "gpt-cli-test"
    assert row["terminal_event"] == "response.completed"
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (120, 30, 150)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (20, 10)
    assert row["client_disconnected"] is False


def test_serve_flags_beat_the_file(tmp_path, fake, serve):
    _, up_url = fake()
    file_port, flag_port = free_port(), free_port()
    assert file_port != flag_port
    path = good_config(tmp_path, port=file_port,
                       extra="upstream:\n  url: ws://127.0.0.1:%d/v1/responses\n" % free_port())
    served = serve("--config", path, "--port", flag_port, "--upstream", up_url)
    served.wait_listening(flag_port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", file_port), timeout=1).close()
    # The --upstream flag beat the file's (dead) upstream too: the turn works.
    assert run_turn("ws://127.0.0.1:%d/v1/responses" % flag_port)["type"] == "response.completed"
    assert served.terminate(timeout=5) == 0, served.stderr()


def test_serve_stops_on_sigterm_with_a_session_open(tmp_path, fake, serve):
    _, up_url = fake()
    port = free_port()
    path = good_config(tmp_path)
    served = serve("--config", path, "--port", port, "--upstream", up_url)
    served.wait_listening(port)
    ws = websocket.create_connection("ws://127.0.0.1:%d/v1/responses" % port, timeout=10)
    try:
        code = served.terminate(timeout=8)
    finally:
        ws.close()
    assert code == 0, served.stderr()


def test_serve_exposes_metrics_on_a_separate_listener(tmp_path, fake, serve):
    import urllib.request

    _, up_url = fake()
    port, metrics_port = free_port(), free_port()
    path = good_config(tmp_path, extra="server:\n  metrics_listen: 127.0.0.1:%d\n" % metrics_port)
    served = serve("--config", path, "--port", port, "--upstream", up_url)
    served.wait_listening(port)
    assert run_turn("ws://127.0.0.1:%d/v1/responses" % port)["type"] == "response.completed"
    base = "http://127.0.0.1:%d" % metrics_port
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'wsrelay_handshakes_total{status="101"} 1.0' in text
    with urllib.request.urlopen(base + "/readyz", timeout=5) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/v1/responses", timeout=5)
    assert missing.value.code == 404
    assert served.terminate() == 0


def test_usage_group_by_prints_sums_with_a_total_row(usage_db):
    result = run("usage", "--config", usage_db, "--group-by", "key,model,day", "--format", "table")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.rstrip("\n").split("\n")
    assert lines[0].split()[:4] == ["key_id", "model", "day", "turns"]
    assert lines[-1].split()[:3] == ["TOTAL", "2", "1250"]
    rows = json.loads(run("usage", "--config", usage_db, "--group-by", "model", "--format", "json").stdout)
    assert {r["model"]: r["turns"] for r in rows} == {"gpt-5": 1, "gpt-5-codex": 1}


def test_usage_since_takes_a_duration(usage_db):
    rows = json.loads(run("usage", "--config", usage_db, "--since", "24h", "--format", "json").stdout)
    assert rows == []  # the records are from 2025
    rows = json.loads(run("usage", "--config", usage_db, "--since", "2025-11-26", "--format", "json").stdout)
    assert len(rows) == 2


def test_usage_refuses_an_unknown_group_and_a_bad_since(usage_db):
    bad_group = run("usage", "--config", usage_db, "--group-by", "colour")
    assert bad_group.returncode != 0 and "cannot group by colour" in bad_group.stderr
    bad_since = run("usage", "--config", usage_db, "--since", "yesterday")
    assert bad_since.returncode != 0 and "--since" in bad_since.stderr


def test_hash_key_prints_the_sha256_form_the_relay_accepts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "wsrelay", "hash-key"], input="rk-secret\n", cwd=REPO,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line == "sha256:" + hashlib.sha256(b"rk-secret").hexdigest()
    assert KeyRing([line]).check("rk-secret")
    empty = subprocess.run([sys.executable, "-m", "wsrelay", "hash-key"], input="", cwd=REPO,
                           capture_output=True, text=True, timeout=20)
    assert empty.returncode != 0 and "standard input" in empty.stderr
