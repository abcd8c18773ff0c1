"""/metrics in Prometheus text format (parsed with prometheus-client's own parser), /readyz, and the separate
metrics listener."""

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CREATE, INTERVAL, PING_TIMEOUT, REPO, connect, raw_request, read_close, read_until_marker
from wsrelay.frames import OP_TEXT

pytestmark = pytest.mark.timeout(30)


def scrape(base):
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def http_base(relay_url):
    return "http://" + relay_url[len("ws://"):].split("/")[0]


def test_metrics_count_handshakes_pings_turns_tokens_and_bytes(fake, relay, tracer, store):
    _, url = fake(silence=0.5)
    relay_url = relay(url, **{INTERVAL: 0.15, PING_TIMEOUT: 0.1})
    raw_request(relay_url.replace("/v1/responses", "/nowhere"))
    client = connect(relay_url)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b'"response.completed"')
    store.wait(1)
    live = scrape(http_base(relay_url))
    assert live[("wsrelay_sessions", ())] == 1
    # The request frame (2-byte header, 4-byte mask); the Pongs to the relay's own Pings are not relayed.
    assert live[("wsrelay_relayed_bytes_total", (("direction", "client_to_upstream"),))] == len(CREATE) + 6
    client.close(1000)
    read_close(client)
    tracer.wait_for("relay_complete")
    samples = scrape(http_base(relay_url))
    assert samples[("wsrelay_sessions", ())] == 0
    assert samples[("wsrelay_handshakes_total", (("status", "101"),))] == 1
    assert samples[("wsrelay_handshakes_total", (("status", "404"),))] == 1
    assert samples[("wsrelay_downstream_pings_total", (("outcome", "ok"),))] >= 2
    assert samples[("wsrelay_downstream_pong_rtt_seconds_count", ())] >= 2
    assert samples[("wsrelay_turns_total", (("terminal_event", "response.completed"),))] == 1
    assert samples[("wsrelay_usage_tokens_total", (("kind", "input_tokens"), ("model", "gpt-test")))] == 120
    assert samples[("wsrelay_usage_tokens_total", (("kind", "output_tokens"), ("model", "gpt-test")))] == 30
    # (the trace line carries every token field of the record, so these count too)
    assert samples[("wsrelay_usage_tokens_total", (("kind", "cached_tokens"), ("model", "gpt-test")))] == 20
    assert samples[("wsrelay_usage_tokens_total", (("kind", "reasoning_tokens"), ("model", "gpt-test")))] == 10
    assert samples[("wsrelay_upstream_dial_seconds_count", ())] == 1
    assert samples[("wsrelay_session_exits_total", (("cause", "client_close"), ("side", "client")))] == 1
    assert samples[("wsrelay_relayed_frames_total", (("direction", "upstream_to_client"),))] >= 8
    assert samples[("wsrelay_relayed_bytes_total", (("direction", "client_to_upstream"),))] >= len(CREATE) + 8


def test_drains_are_counted_by_outcome(fake, relay, tracer, store):
    _, url = fake(silence=0.3)
    relay_url = relay(url)
    client = connect(relay_url)
    client.send(OP_TEXT, CREATE)
    read_until_marker(client, b"delta")
    client.sock.close()
    tracer.wait_for("relay_complete")
    samples = scrape(http_base(relay_url))
    assert samples[("wsrelay_drains_total", (("outcome", "terminal"),))] == 1


def test_readyz_is_503_while_the_relay_is_stopping(fake, relay, tracer):
    _, url = fake()
    relay_url = relay(url)
    base = http_base(relay_url)
    with urllib.request.urlopen(base + "/readyz", timeout=5) as response:
        assert json.loads(response.read())["ready"] is True
    app = relay.apps[-1]
    app.shutdown()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/readyz", timeout=5)
    assert refused.value.code == 503



def test_grafana_dashboard_only_queries_metrics_the_relay_exports(fake, relay, tracer, redis_url):
    import os
    import re

    
    with open(os.path.join(REPO, "etc", "grafana-dashboard.json")) as fh:
        dashboard = json.load(fh)
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"\b(wsrelay_[a-z_]+)", " ".join(exprs)))
    _, url = fake()
    relay_url = relay(url, limits__redis_url=redis_url)  # the shared limits' metrics too
    connect(relay_url).send(OP_TEXT, CREATE)
    with urllib.request.urlopen(http_base(relay_url) + "/metrics", timeout=5) as response:
        text = response.read().decode()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    exported |= {family.name for family in text_string_to_metric_families(text)}
    missing = sorted(name for name in used if name not in exported
                     and not any(name == e + suffix for e in exported for suffix in ("_bucket", "_total")))
    assert used and not missing, "dashboard queries unknown metrics: %s" % missing
