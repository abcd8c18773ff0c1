"""Configuration: defaults, the YAML file, overrides, one message per problem, the sample file never drifting."""

import math
import os

import pytest
import yaml

from wsrelay import config, configdoc

pytestmark = pytest.mark.timeout(30)

WS = "gateway.openai_ws."
INTERVAL = WS + "passthrough_downstream_ping_interval_seconds"
TIMEOUT = WS + "passthrough_downstream_ping_timeout_seconds"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="wsrelay.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(path=None, overrides=None):
    with pytest.raises(config.ConfigError) as info:
        config.load(path, overrides)
    return info.value.problems


# -- defaults ----------------------------------------------------------------------------------------------------


def test_defaults():
    cfg = config.load()
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.port == 8080
    assert cfg.server.backlog == 1024
    assert cfg.server.handshake_timeout_seconds == 10.0
    assert cfg.server.max_pending_handshakes == 1024
    assert cfg.upstream.url == "wss://api.openai.com/v1/responses"
    assert cfg.upstream.api_key is None
    assert cfg.upstream.api_key_env == "OPENAI_API_KEY"
    assert cfg.upstream.connect_timeout_seconds == 10.0
    assert cfg.upstream.ca_file is None
    assert cfg.auth.keys == []
    assert cfg.values[INTERVAL] == 20.0
    assert cfg.values[TIMEOUT] == 5.0
    assert cfg.gateway.openai_ws.upstream_drain_timeout_seconds == 60.0
    assert cfg.gateway.openai_ws.client_read_limit_bytes == 64 * 1024 * 1024
    assert cfg.gateway.openai_ws.write_timeout_seconds == 60.0
    assert cfg.gateway.openai_ws.close_timeout_seconds == 5.0
    assert cfg.usage.sqlite_path == "./wsrelay-usage.db"
    assert cfg.usage.fallback_path is None
    assert cfg.usage.max_event_bytes == 64 * 1024 * 1024
    assert cfg.trace.path is None
    assert set(cfg.values) == set(config.BY_NAME)
    assert cfg.source is None


def test_every_setting_has_a_default_of_its_own_type():
    for setting in config.SETTINGS:
        assert setting.doc, setting.name
        if setting.default is None:
            assert setting.nullable, setting.name
        else:
            assert isinstance(setting.default, setting.type), setting.name
            assert setting.coerce(setting.default) == setting.default


def test_default_lists_are_not_shared_between_configs():
    first = config.load()
    first.auth.keys.append("mutated")
    assert config.load().auth.keys == []


def test_settings_are_typed_attributes_named_like_the_yaml_keys():
    cfg = config.load(None, {"gateway.openai_ws.write_timeout_seconds": "7", "server.port": "9000"})
    assert cfg.gateway.openai_ws.write_timeout_seconds == 7.0 and cfg.server.port == 9000
    assert {name: cfg.values[name] for name in config.BY_NAME} == cfg.values
    for setting in config.SETTINGS:
        node = cfg
        for part in setting.name.split("."):
            node = getattr(node, part)
        assert node == cfg.values[setting.name], setting.name


def test_empty_file_means_defaults(tmp_path):
    assert config.load(write(tmp_path, "")).values == config.load().values
    assert config.load(write(tmp_path, "# only a comment\n")).values == config.load().values


def test_fallback_path_defaults_next_to_the_database(tmp_path):
    cfg = config.load(None, {"usage.sqlite_path": str(tmp_path / "u.db")})
    assert cfg.usage_fallback_path == str(tmp_path / "u.db") + ".pending.jsonl"
    cfg = config.load(None, {"usage.fallback_path": str(tmp_path / "f.jsonl")})
    assert cfg.usage_fallback_path == str(tmp_path / "f.jsonl")


def test_usage_goes_to_postgresql_when_a_database_url_is_set_and_to_sqlite_otherwise(tmp_path):
    assert config.load(None, {"usage.sqlite_path": "u.db"}).usage_database == "u.db"
    cfg = config.load(None, {"usage.database_url": "postgresql://relay@db:5432/usage", "usage.sqlite_path": "u.db"})
    assert cfg.usage_database == "postgresql://relay@db:5432/usage"
    assert cfg.usage_fallback_path == "u.db.pending.jsonl"


def test_a_database_url_refused_never_shows_its_password():
    problems = problems_of(None, {"usage.database_url": "mysql://relay:hunter2@db/usage?password=hunter2"})
    assert problems == ["usage.database_url: must start with postgresql:// or postgres://, got "
                        "'mysql://relay:***@db/usage?password=***'"]


# -- the file and the overrides ----------------------------------------------------------------------------------


def test_yaml_file_values(tmp_path):
    path = write(tmp_path, """
server:
  host: 0.0.0.0
  port: 9001
upstream:
  url: ws://127.0.0.1:9999/v1/responses
  connect_timeout_seconds: 2.5
auth:
  keys: [first, second]
gateway:
  openai_ws:
    passthrough_downstream_ping_interval_seconds: 15
    passthrough_downstream_ping_timeout_seconds: 3
    client_read_limit_bytes: 1048576
usage:
  sqlite_path: /var/lib/wsrelay/usage.db
""")
    cfg = config.load(path)
    assert cfg.source == path
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.port == 9001
    assert cfg.upstream.url == "ws://127.0.0.1:9999/v1/responses"
    assert cfg.upstream.connect_timeout_seconds == 2.5
    assert cfg.auth.keys == ["first", "second"]
    assert cfg.values[INTERVAL] == 15.0 and isinstance(cfg.values[INTERVAL], float)
    assert cfg.values[TIMEOUT] == 3.0
    assert cfg.gateway.openai_ws.client_read_limit_bytes == 1048576
    assert cfg.usage.sqlite_path == "/var/lib/wsrelay/usage.db"
    assert cfg.server.backlog == 1024  # not in the file: the default


def test_dotted_names_work_in_the_file_too(tmp_path):
    path = write(tmp_path, "server.port: 9100\ngateway:\n  openai_ws.close_timeout_seconds: 2\n")
    cfg = config.load(path)
    assert cfg.server.port == 9100
    assert cfg.gateway.openai_ws.close_timeout_seconds == 2.0


def test_overrides_beat_the_file(tmp_path):
    path = write(tmp_path, "server:\n  port: 9001\n  host: 0.0.0.0\nupstream:\n  url: ws://a.example/v1/responses\n")
    cfg = config.load(path, {"server.port": 9002, "upstream.url": "wss://b.example/v1/responses"})
    assert cfg.server.port == 9002
    assert cfg.upstream.url == "wss://b.example/v1/responses"
    assert cfg.server.host == "0.0.0.0"  # not overridden: the file's value


def test_none_overrides_leave_the_file_value(tmp_path):
    path = write(tmp_path, "server:\n  port: 9001\n")
    assert config.load(path, {"server.port": None, "server.host": None}).server.port == 9001


def test_overrides_are_coerced_like_file_values():
    cfg = config.load(None, {"server.port": "9003", "auth.keys": "one, two ,three", INTERVAL: "0.5",
                             TIMEOUT: "0.25"})
    assert cfg.server.port == 9003
    assert cfg.auth.keys == ["one", "two", "three"]
    assert cfg.values[INTERVAL] == 0.5 and cfg.values[TIMEOUT] == 0.25


def test_upstream_api_key_prefers_the_setting_then_the_environment(monkeypatch):
    monkeypatch.setenv("WSRELAY_TEST_UPSTREAM_KEY", "sk-from-env")
    cfg = config.load(None, {"upstream.api_key_env": "WSRELAY_TEST_UPSTREAM_KEY"})
    assert cfg.upstream_api_key() == "sk-from-env"
    cfg = config.load(None, {"upstream.api_key_env": "WSRELAY_TEST_UPSTREAM_KEY", "upstream.api_key": "sk-set"})
    assert cfg.upstream_api_key() == "sk-set"
    monkeypatch.setenv("WSRELAY_TEST_UPSTREAM_KEY", "")
    cfg = config.load(None, {"upstream.api_key_env": "WSRELAY_TEST_UPSTREAM_KEY"})
    assert cfg.upstream_api_key() is None
    monkeypatch.delenv("WSRELAY_TEST_UPSTREAM_KEY")
    assert cfg.upstream_api_key() is None


# -- problems: one message per bad key or value ------------------------------------------------------------------


def test_unknown_keys_and_bad_values_give_one_message_each(tmp_path):
    path = write(tmp_path, """
server:
  port: eighty
  prot: 8080
upstream:
  connect_timeout_seconds: -1
  url: http://plain.example/v1/responses
nonsense: 3
gateway:
  openai_ws:
    client_read_limit_bytes: 0
    write_timeout_seconds: fast
auth:
  keys: [ok, 5]
""")
    problems = problems_of(path)
    assert len(problems) == 8, problems
    expected = ["server.port", "server.prot", "upstream.connect_timeout_seconds", "upstream.url", "nonsense",
                WS + "client_read_limit_bytes", WS + "write_timeout_seconds", "auth.keys"]
    for name in expected:
        assert len([p for p in problems if p.startswith(name + ":")]) == 1, (name, problems)
    assert [p for p in problems if p.startswith("server.prot:")][0] == "server.prot: unknown setting"
    assert "eighty" in [p for p in problems if p.startswith("server.port:")][0]


def test_config_error_message_joins_the_problems():
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {"server.port": -1, "bogus.name": 1})
    assert len(info.value.problems) == 2
    assert str(info.value) == "; ".join(info.value.problems)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name, value, words", [
    ("server.port", 70000, "at most 65535"),
    ("server.port", -1, "at least 0"),
    ("server.port", 80.5, "integer"),
    ("server.port", True, "number"),
    ("server.port", "http", "integer"),
    ("server.port", [80], "integer"),
    ("server.backlog", 0, "at least 1"),
    ("server.handshake_timeout_seconds", 0, "greater than 0"),
    ("server.handshake_timeout_seconds", -1, "greater than 0"),
    ("server.max_pending_handshakes", 0, "at least 1"),
    ("server.max_pending_handshakes", 2.5, "integer"),
    ("server.host", 127, "string"),
    ("server.host", None, "empty"),
    ("upstream.url", "https://api.openai.com/v1/responses", "ws://"),
    ("upstream.url", ["ws://a"], "string"),
    ("upstream.connect_timeout_seconds", 0, "greater than 0"),
    ("upstream.connect_timeout_seconds", "soon", "number"),
    ("auth.keys", "sha256:abc", "64 hex"),
    ("auth.keys", ["sha256:" + "g" * 64], "64 hex"),
    ("auth.keys", [""], "non-empty"),
    ("auth.keys", {"a": 1}, "list"),
    (INTERVAL, -0.5, "at least 0"),
    (TIMEOUT, 0, "greater than 0"),
    (WS + "upstream_drain_timeout_seconds", -1, "at least 0"),
    (WS + "close_timeout_seconds", 0, "greater than 0"),
    ("usage.max_event_bytes", 100, "at least 1024"),
    ("usage.sqlite_path", None, "empty"),
    ("usage.database_url", "mysql://db/usage", "postgresql://"),
])
def test_bad_value_gives_one_message_naming_the_setting(tmp_path, name, value, words):
    parts = name.split(".")
    tree = value
    for part in reversed(parts):
        tree = {part: tree}
    problems = problems_of(write(tmp_path, yaml.safe_dump(tree)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(name + ": "), problems
    assert words in problems[0], problems


@pytest.mark.parametrize("name", ["upstream.connect_timeout_seconds", "server.handshake_timeout_seconds", INTERVAL])
def test_not_a_number_is_refused_for_durations(name):
    for value in (float("nan"), "nan", "NaN"):
        problems = problems_of(None, {name: value})
        assert len(problems) == 1 and problems[0].startswith(name + ": "), (value, problems)


def test_not_a_number_is_refused_in_the_file(tmp_path):
    problems = problems_of(write(tmp_path, "upstream:\n  connect_timeout_seconds: .nan\n"))
    assert len(problems) == 1 and problems[0].startswith("upstream.connect_timeout_seconds: "), problems


@pytest.mark.parametrize("text", ["server:\n  port: .inf\n",
                                  "gateway:\n  openai_ws:\n    client_read_limit_bytes: -.inf\n"])
def test_infinite_integer_is_a_config_problem_not_a_crash(tmp_path, text):
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1, problems
    assert "integer" in problems[0] or "number" in problems[0], problems


def test_unknown_override_is_a_problem():
    assert problems_of(None, {"server.prot": 1}) == ["server.prot: unknown setting"]


def test_file_that_is_not_a_mapping(tmp_path):
    problems = problems_of(write(tmp_path, "- a\n- b\n"))
    assert len(problems) == 1 and "mapping" in problems[0]


def test_file_that_is_not_yaml(tmp_path):
    problems = problems_of(write(tmp_path, "server: [unclosed\n"))
    assert len(problems) == 1 and "YAML" in problems[0]


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(path + ": cannot read")


def test_section_with_every_setting_commented_out_is_empty_not_unknown(tmp_path):
    # Commenting out every line below a section header leaves the header with a null value.
    path = write(tmp_path, "server:\n  port: 9000\ntrace:\n  # path: /var/log/wsrelay.trace\n"
                           "gateway:\n  openai_ws:\n    # close_timeout_seconds: 5\n")
    cfg = config.load(path)
    assert cfg.server.port == 9000
    assert cfg.trace.path is None


# -- the ping timeout and interval -------------------------------------------------------------------------------


@pytest.mark.parametrize("interval, timeout", [(20, 20), (20, 25), (0.5, 0.5), (1, 1.5)])
def test_ping_timeout_must_be_less_than_the_interval(interval, timeout):
    problems = problems_of(None, {INTERVAL: interval, TIMEOUT: timeout})
    assert len(problems) == 1, problems
    assert problems[0].startswith(TIMEOUT + ": ") and "less than" in problems[0]


def test_ping_timeout_default_must_be_less_than_a_configured_interval():
    problems = problems_of(None, {INTERVAL: 5})  # default timeout 5
    assert len(problems) == 1 and problems[0].startswith(TIMEOUT + ": ")


@pytest.mark.parametrize("timeout", [0.001, 5, 30, 3600])
def test_interval_zero_allows_any_positive_timeout(timeout):
    cfg = config.load(None, {INTERVAL: 0, TIMEOUT: timeout})
    assert cfg.values[INTERVAL] == 0 and cfg.values[TIMEOUT] == timeout


@pytest.mark.parametrize("interval, timeout", [(0.5, 0.2), (0.25, 0.1), (1.5, 1), (19.9, 5)])
def test_fractional_interval_is_allowed(tmp_path, interval, timeout):
    path = write(tmp_path, "gateway:\n  openai_ws:\n    passthrough_downstream_ping_interval_seconds: %s\n"
                           "    passthrough_downstream_ping_timeout_seconds: %s\n" % (interval, timeout))
    cfg = config.load(path)
    assert cfg.values[INTERVAL] == interval and cfg.values[TIMEOUT] == timeout


# -- the sample configuration ------------------------------------------------------------------------------------


def test_rendered_yaml_loads_back_to_exactly_the_defaults(tmp_path):
    text = configdoc.render_yaml()
    loaded = config.load(write(tmp_path, text))
    defaults = config.load()
    assert loaded.values == defaults.values
    for name, value in defaults.values.items():
        assert type(loaded.values[name]) is type(value), name
    assert yaml.safe_load(text)  # plain YAML, no tags


def test_rendered_yaml_documents_every_setting():
    text = configdoc.render_yaml()
    for setting in config.SETTINGS:
        leaf = setting.name.split(".")[-1]
        assert "%s:" % leaf in text, setting.name
        assert setting.doc.split()[0] in text, setting.name


def test_sample_config_in_the_repository_is_the_rendered_defaults():
    with open(os.path.join(REPO, "etc", "wsrelay.yaml"), encoding="utf-8") as fh:
        sample = fh.read()
    assert sample == configdoc.render_yaml(), "etc/wsrelay.yaml drifted: regenerate it with " \
                                           "`bin/wsrelay check-config --print-defaults > etc/wsrelay.yaml`"


def test_sample_config_loads():
    cfg = config.load(os.path.join(REPO, "etc", "wsrelay.yaml"))
    assert cfg.values == config.load().values
    assert not math.isnan(cfg.values[INTERVAL])


def test_readme_settings_reference_is_generated_from_the_settings_table():
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as fh:
        readme = fh.read()
    block = readme.split(".. reference-start\n\n", 1)[1].split(".. reference-end", 1)[0]
    assert block == configdoc.render_reference(), "regenerate with: bin/wsrelay check-config --print-reference"


def test_readme_is_valid_restructuredtext():
    import io

    import docutils.core

    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as fh:
        source = fh.read()
    errors = io.StringIO()
    docutils.core.publish_doctree(source, settings_overrides={"report_level": 2, "warning_stream": errors})
    assert errors.getvalue() == ""


@pytest.mark.parametrize("url, base", [
    ("wss://api.openai.com/v1/responses", "https://api.openai.com/v1"),
    ("ws://127.0.0.1:9000/v1/responses/", "http://127.0.0.1:9000/v1"),
    ("wss://chatgpt.com/backend-api/codex/responses", "https://chatgpt.com/backend-api/codex"),
    ("ws://h:1/gateway?x=1", "http://h:1/gateway"),
])
def test_http_base_url_is_derived_from_the_websocket_url(url, base):
    assert config.load(overrides={"upstream.url": url}).upstream_http_base_url == base


def test_http_base_url_given_wins_and_must_be_http():
    conf = config.load(overrides={"upstream.http_base_url": "https://proxy.example/openai/v1/"})
    assert conf.upstream_http_base_url == "https://proxy.example/openai/v1"
    with pytest.raises(config.ConfigError, match="upstream.http_base_url: must start with http"):
        config.load(overrides={"upstream.http_base_url": "wss://x/v1"})


def test_redis_limits_are_off_by_default_with_a_thirty_second_lease():
    cfg = config.load()
    assert cfg.limits.redis_url is None
    assert cfg.limits.lease_ttl_seconds == 30.0
    assert cfg.limits.redis_timeout_seconds == 0.5
    assert cfg.limits.redis_key_prefix == "wsrelay:"


@pytest.mark.parametrize("overrides, words", [
    ({"limits.redis_url": "http://127.0.0.1:6379"}, "must start with redis://, rediss:// or unix://"),
    ({"limits.lease_ttl_seconds": 1, "limits.redis_timeout_seconds": 0.4}, "under a third of"),
    ({"limits.lease_ttl_seconds": 0}, "must be greater than 0"),
    ({"limits.redis_key_prefix": ""}, "must not be empty"),
])
def test_redis_limit_settings_are_checked(overrides, words):
    assert any(words in problem for problem in problems_of(None, overrides))


def test_a_redis_url_problem_never_shows_the_password(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a))
    problems = problems_of(None, {"limits.redis_url": "redis://:hunter2@redis.internal:6379/0"})
    assert problems == ["limits.redis_url: needs the redis package: pip install 'wsrelay[redis]'"]
    assert "hunter2" not in " ".join(problems_of(None, {"limits.redis_url": "tcp://:hunter2@redis.internal"}))
    assert config.load(None, {"limits.redis_url": ""}).limits.redis_url == ""  # empty: off, like unset
