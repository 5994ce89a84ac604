"""The ops/ files against the real tools: a real Prometheus scraping the engine, `promtool check
metrics` on a scrape, `promtool test rules` on the alert rules, and the Grafana dashboard's
queries naming only metrics the engine exports.

Prometheus and promtool come from Debian's `prometheus` package. `./scripts/test` installs it
when it is missing and it runs as root with apt-get; elsewhere these tests skip and say how."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio

from protocol import open_trio_client
from test_metrics import http_get, samples

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
INSTALL_HINT = "install Debian's prometheus package: `apt-get install prometheus` (or run scripts/install-peers)"
PROMETHEUS_START_SECONDS = 30
PROMETHEUS_QUERY_DEADLINE_SECONDS = 60


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} not found: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def drive_traffic(server, prefix: str, count: int, token: str | None = None) -> None:
    async with open_trio_client(server.host, server.port) as client:
        if token is not None:
            await client.hello(token=token)
        await client.adjust(f"{prefix}-receipt", "SKU-1", "DC-1", count, "receipt")
        for index in range(count):
            await client.reserve(f"{prefix}-{index}", [("SKU-1", "DC-1", 1)])


async def scraped_text(server) -> str:
    status, body = await http_get(server.metrics_port)
    assert status == 200
    return body.decode()


def test_promtool_test_rules_covers_every_alert_firing_and_not():
    promtool = tool("promtool")
    rules = re.findall(r"^\s*- alert: (\w+)", (OPS / "alerts.yml").read_text(), re.MULTILINE)
    assert len(rules) >= 6
    firing, silent = set(), set()
    alertname = None
    for line in (OPS / "alerts_test.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("alertname:"):
            alertname = stripped.split(":", 1)[1].strip()
        elif stripped.startswith("exp_alerts:"):
            (silent if stripped.endswith("[]") else firing).add(alertname)
    assert set(rules) <= firing, f"rules never tested firing: {set(rules) - firing}"
    assert set(rules) <= silent, f"rules never tested silent: {set(rules) - silent}"
    checked = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=OPS, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=OPS, capture_output=True, text=True, timeout=120)
    print(tested.stdout + tested.stderr)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


def test_promtool_check_config_accepts_the_shipped_scrape_config():
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=OPS, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_promtool_check_metrics_passes_on_a_scrape(start_server):
    promtool = tool("promtool")
    server = await start_server(metrics_port=0)
    with trio.fail_after(20):
        await drive_traffic(server, "lint", 20)
        text = await scraped_text(server)
    checked = await trio.run_process([promtool, "check", "metrics"], stdin=text.encode(), capture_stdout=True, capture_stderr=True, check=False)
    output = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0 and output.strip() == "", output
    assert "engine_requests_total" in text


async def test_grafana_dashboard_queries_only_exported_metrics(start_server):
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    # With a token, so that the metrics by token name have samples: a hello, and a refusal.
    server = await start_server(metrics_port=0, token="dashboard-token")
    with trio.fail_after(20):
        await drive_traffic(server, "dash", 5, token="dashboard-token")
        async with open_trio_client(server.host, server.port) as anonymous:
            assert (await anonymous.request("ping"))["error"] == "unauthorized"
        exported = {name for name, _ in samples(await scraped_text(server))} | {"up"}
    panels = dashboard["panels"]
    assert len(panels) >= 10
    named = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            for metric in re.findall(r"\b((?:engine|process)_[a-z_]+|up)\b", target["expr"]):
                assert metric in exported, f"panel {panel['title']!r} queries {metric}, which the engine does not export"
                named.add(metric)
    for wanted in ("engine_requests_total", "engine_request_duration_seconds_bucket", "engine_wal_commit_duration_seconds_bucket",
                   "engine_wal_commit_records_bucket", "engine_applied_seq", "engine_durable_seq", "engine_connections_open",
                   "engine_units_held", "engine_shortage_sku_locations", "engine_hellos_total", "engine_unauthorized_total",
                   "engine_connections_authenticated", "engine_auth_reloads_total", "engine_tls_handshake_failures_total"):
        assert wanted in named, f"no panel shows {wanted}"


def _query(prometheus_port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


async def _wait_for_value(prometheus_port: int, expression: str, at_least: float, deadline: float) -> float:
    """Poll Prometheus until `expression` has a value >= at_least (bounded by `deadline`)."""
    last = None
    while time.monotonic() < deadline:
        try:
            result = await trio.to_thread.run_sync(_query, prometheus_port, expression)
        except OSError:  # not listening yet
            result = []
        if result:
            last = float(result[0]["value"][1])
            if last >= at_least:
                return last
        await trio.sleep(0.5)
    raise AssertionError(f"Prometheus never showed {expression} >= {at_least} (last value: {last})")


async def test_real_prometheus_scrapes_the_engine(start_server, tmp_path):
    prometheus = tool("prometheus")
    server = await start_server(metrics_port=0)
    prometheus_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: engine\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + PROMETHEUS_START_SECONDS + PROMETHEUS_QUERY_DEADLINE_SECONDS
        await drive_traffic(server, "first", 30)
        up = await _wait_for_value(prometheus_port, 'up{job="engine"}', 1, deadline)
        first = await _wait_for_value(prometheus_port, 'engine_requests_total{op="reserve",result="ok"}', 30, deadline)
        await _wait_for_value(prometheus_port, 'engine_request_duration_seconds_count{op="reserve"}', 30, deadline)
        await drive_traffic(server, "second", 20)
        moved = await _wait_for_value(prometheus_port, 'engine_requests_total{op="reserve",result="ok"}', 50, deadline)
        latency = await _wait_for_value(prometheus_port, 'engine_request_duration_seconds_count{op="reserve"}', 50, deadline)
        buckets = await trio.to_thread.run_sync(_query, prometheus_port, 'engine_request_duration_seconds_bucket{op="reserve",le="+Inf"}')
        print(f"Prometheus {prometheus_port}: up={up}, reserves ok {first:.0f} -> {moved:.0f}, "
              f"latency count {latency:.0f}, +Inf bucket {buckets[0]['value'][1]}")
        assert up == 1 and moved >= first + 20 and latency >= 50
    except AssertionError:
        print(log_path.read_text()[-3000:])
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
