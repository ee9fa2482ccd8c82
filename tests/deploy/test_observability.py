"""Prometheus rules and the Grafana dashboard against a REAL Prometheus scraping a REAL gateway.

One module fixture writes a tiny family, starts the gateway on it (``python -m server.run``, as the
server tests do) and Prometheus on a free loopback port with the committed scrape job and rule files
(scrape and evaluation every second), sends a short mixed load over every served size, and waits
until the recording rules have seen it. Then every PromQL expression of the dashboard, the rules and
the Kubernetes ScaledObjects must evaluate without error and give a series with a ``size`` label for
each size served, except the few that are size-less by nature, listed in ``SIZELESS``.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.files import DEPLOY, run
from tests.server.live import Server, free_port, launch, spawn, stop, wait_ready
from tests.tiny import write_pair

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "boomerang.json"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
# Expressions with no `size` label by nature: totals over all sizes and scrape health.
SIZELESS = {
    "sum(boomerang_sizes_loaded)",
    "sum(boomerang_resident_weight_bytes)",
    "sum(boomerang_resident_weight_bytes) + sum(boomerang_pool_reserved_bytes)",
    "max(boomerang_pool_memory_budget_bytes > 0)",
    "(sum(boomerang_resident_weight_bytes) + sum(boomerang_pool_reserved_bytes)) "
    "/ max(boomerang_pool_memory_budget_bytes > 0)",
    'sum(rate(boomerang_requests_total{size=~"$size"}[$__rate_interval]))',
    'sum(rate(boomerang_generation_tokens_total{size=~"$size"}[$__rate_interval]))',
    'up{job="boomerang"}',
}
# Grafana's variables as a dashboard with `size` = All sends them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$size": ".*"}
ALERT_FORM = re.compile(r"^(?P<signal>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.]+(?:e-?[0-9]+)?)$", re.S)
# Two sizes on the gateway's in-process engine, one on a remote worker (a second gateway process):
# the tier pool and its metrics (replicas, memory budget) only exist for pool-managed tiers.
TIERS = {"small": "k0", "middle": "k2", "large": "1.0"}
REMOTE_TIER = "large"
# The tier pool's metrics (replicas, scale events, restarts, reserved memory) exist for the sizes it
# manages (engine: vllm or remote), not for sizes on the in-process engine.
POOL_METRICS = re.compile(r"boomerang_(replicas|replica_restarts|scale_events|pool_)")


# --- what the files say -------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def rules() -> list[dict[str, Any]]:
    return [r for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def alert_signal(expr: str) -> str:
    """An alert's expression without its threshold: the series it compares."""
    match = ALERT_FORM.match(expr.strip())
    assert match, f"alerts read `<signal> <op> <threshold>`: {expr!r}"
    return match["signal"]


def scaledobject_queries() -> list[str]:
    render = run(["kubectl", "kustomize", DEPLOY / "k8s"])
    assert render.returncode == 0, render.stderr
    docs = [d for d in yaml.safe_load_all(render.stdout) if d and d.get("kind") == "ScaledObject"]
    return [t["metadata"]["query"] for d in docs for t in d["spec"]["triggers"] if t["type"] == "prometheus"]


# --- structure: no Prometheus needed ------------------------------------------------------------


def test_every_panel_has_a_datasource_a_query_and_a_unit() -> None:
    panels = dashboard_panels()
    assert len(panels) >= 12
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["type"] == "prometheus", title
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), title
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), title
    assert len({p["id"] for p in panels}) == len(panels)


def test_dashboard_covers_the_issue_and_filters_by_size() -> None:
    doc = json.loads(DASHBOARD.read_text())
    (size_var,) = [v for v in doc["templating"]["list"] if v["name"] == "size"]
    assert size_var["multi"] and size_var["includeAll"]
    exprs = " ".join(dashboard_exprs())
    for metric in (
        "boomerang_requests_total", "boomerang_generation_tokens_total", "boomerang_time_to_first_token_seconds_bucket",
        "boomerang_inter_token_latency_seconds_bucket", "boomerang_e2e_request_latency_seconds_bucket",
        "boomerang_running_requests", "boomerang_waiting_requests", "boomerang_router_decisions_total",
    ):  # fmt: skip
        assert metric in exprs, metric
    for expr in dashboard_exprs():
        if expr not in SIZELESS and "boomerang_resident_weight_bytes" not in expr:
            assert 'size=~"$size"' in expr, f"not filtered by the size variable: {expr}"
    uid = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard_panels()} == {uid["datasources"][0]["uid"]}


def test_sizeless_list_is_not_stale() -> None:
    used = set(dashboard_exprs()) | {alert_signal(r["expr"]) for r in rules() if "alert" in r}
    assert used >= SIZELESS, SIZELESS - used


def test_promtool_checks_config_and_rules(promtool: str) -> None:
    config = run([promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml"])
    assert config.returncode == 0, config.stdout + config.stderr
    checked = run([promtool, "check", "rules", *RULES])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_fires_on_its_breach(promtool: str) -> None:
    """promtool unit tests (alerts_test.yml): each alert fires, with its labels and text, on the
    breach it names; the healthy sizes in the same tests stay quiet."""
    tests = Path(__file__).parent / "alerts_test.yml"
    result = run([promtool, "test", "rules", tests])
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [c for t in yaml.safe_load(tests.read_text())["tests"] for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    assert fired == {r["alert"] for r in rules() if "alert" in r}


def test_alert_thresholds_follow_the_default_slo() -> None:
    """The latency SLO alert uses routing.slo_ms of deploy/config.yaml (in seconds)."""
    slo_s = yaml.safe_load((DEPLOY / "config.yaml").read_text())["routing"]["slo_ms"] / 1000
    (slo,) = [r for r in rules() if r.get("alert") == "BoomerangLatencySLOBreach"]
    assert float(ALERT_FORM.match(slo["expr"])["threshold"]) == slo_s  # type: ignore[index]


# --- live: a real Prometheus scraping a real gateway ---------------------------------------------


@dataclass
class Live:
    prometheus: str
    gateway: str
    sizes: list[str]  # size names the gateway serves
    pool_sizes: list[str]  # of which the tier pool manages replicas: the remote one

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert reply["status"] == "success", f"{expr}: {reply.get('errorType')}: {reply.get('error')}"
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result


def _load(gateway: str) -> None:
    """Streams and plain requests over every tier and `auto`, a few at a time."""

    def one(i: int) -> None:
        size = [*TIERS, "auto"][i % (len(TIERS) + 1)]
        body = {"model": "tiny", "size": size, "prompt": f"The module {i} defines", "max_tokens": 8,
                "temperature": 0, "stream": i % 2 == 0}  # fmt: skip
        with httpx.stream("POST", f"{gateway}/v1/completions", json=body, timeout=120) as reply:
            assert reply.status_code == 200, reply.read()
            reply.read()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))


def _launch(config: dict[str, Any], tmp: Path, name: str) -> Server:
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return launch(tmp / f"{name}.yaml", tmp / f"{name}.log")


@pytest.fixture(scope="module")
def live(prometheus_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("observability")
    teacher, student = write_pair(tmp, "llama", layers=6)
    family = {"name": "tiny", "teacher": str(teacher), "student": str(student)}
    started: list[Server] = []
    try:
        worker_tiers = [{"name": REMOTE_TIER, "size": TIERS[REMOTE_TIER]}]
        started.append(worker := _launch({"family": family, "tiers": worker_tiers}, tmp, "worker"))
        tiers = [{"name": name, "size": size} for name, size in TIERS.items() if name != REMOTE_TIER]
        tiers.append({"name": REMOTE_TIER, "size": TIERS[REMOTE_TIER], "engine": "remote", "url": worker.url})
        gateway_config = {"family": family, "tiers": tiers, "routing": {"slo_ms": 60_000},
                          "pool": {"memory_budget_gb": 1, "scale_interval_s": 0.5}}  # fmt: skip
        started.append(gateway := _launch(gateway_config, tmp, "gateway"))  # its remote tier waits for the worker
        committed = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        (job,) = committed["scrape_configs"]
        job["static_configs"][0]["targets"] = [gateway.url.removeprefix("http://")]
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULES],
            "scrape_configs": [job],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
        prom_port = free_port()
        started.append(prom := spawn(
            [prometheus_server, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], prom_port, tmp / "prometheus.log",
        ))  # fmt: skip
        wait_ready(worker)
        wait_ready(gateway)
        wait_ready(prom, timeout=60, path="/-/ready")
        sizes = sorted(httpx.get(f"{gateway.url}/health").json()["sizes"])
        assert len(sizes) == len(TIERS), sizes
        (remote_size,) = httpx.get(f"{worker.url}/health").json()["sizes"]
        _load(gateway.url)
        result = Live(prom.url, gateway.url, sizes, [remote_size])
        deadline = time.monotonic() + 30  # until the load has reached the recording rules
        while time.monotonic() < deadline:
            seen = {s["metric"].get("size") for s in result.query("size:boomerang_generation_tokens:rate1m > 0")}
            if set(sizes) <= seen:
                break
            time.sleep(0.5)
        time.sleep(2)
        yield result
    finally:
        stop(*started)


def _check(live: Live, expr: str, sizeless: bool = False) -> None:
    query = expr
    for var, value in GRAFANA_VARS.items():
        query = query.replace(var, value)
    series = live.query(query)
    if sizeless:
        assert series, f"no series: {expr}"
        return
    sizes = live.pool_sizes if POOL_METRICS.search(expr) else live.sizes
    missing = set(sizes) - {s["metric"].get("size") for s in series}
    assert not missing, f"no series for sizes {sorted(missing)} (of {sizes}): {expr}\n{series}"


def _signals() -> list[str]:
    """Every query the dashboard and the rules run; alerts without their threshold."""
    out = list(dashboard_exprs())
    for rule in rules():
        out += [rule["expr"], rule["record"]] if "record" in rule else [alert_signal(rule["expr"])]
    return out


@pytest.mark.server
def test_every_dashboard_query_gives_every_size(live: Live) -> None:
    for expr in dashboard_exprs():
        if not POOL_METRICS.search(expr):
            _check(live, expr, expr in SIZELESS)


@pytest.mark.server
def test_every_pool_query_gives_every_pool_managed_size(live: Live) -> None:
    """Replicas, restarts and the memory budget, on the gateway whose remote tier is pool-managed."""
    pool_queries = [expr for expr in _signals() if POOL_METRICS.search(expr)]
    assert len(pool_queries) >= 6
    for expr in pool_queries:
        _check(live, expr, expr in SIZELESS)


@pytest.mark.server
def test_remote_sizes_have_token_latencies(live: Live) -> None:
    for metric in ("boomerang_time_to_first_token_seconds_count", "boomerang_inter_token_latency_seconds_count"):
        assert {s["metric"]["size"] for s in live.query(metric)} >= set(live.pool_sizes), metric


@pytest.mark.server
def test_size_variable_lists_every_size(live: Live) -> None:
    doc = json.loads(DASHBOARD.read_text())
    (size_var,) = [v for v in doc["templating"]["list"] if v["name"] == "size"]
    metric = re.fullmatch(r"label_values\((\w+), size\)", size_var["query"]["query"])
    assert metric, size_var["query"]
    reply = httpx.get(f"{live.prometheus}/api/v1/label/size/values", params={"match[]": metric[1]}).json()
    assert set(live.sizes) <= set(reply["data"])


@pytest.mark.server
def test_every_rule_gives_every_size(live: Live) -> None:
    for rule in rules():
        if "record" in rule:
            assert ":" in rule["record"] and rule["record"].startswith("size:"), rule["record"]
            _check(live, rule["expr"])
            _check(live, rule["record"])  # Prometheus evaluated and stored it
        else:
            live.query(rule["expr"])  # valid as a whole (no series now: nothing is wrong)
            signal = alert_signal(rule["expr"])
            if not POOL_METRICS.search(signal):  # those: test_every_pool_query_gives_every_pool_managed_size
                _check(live, signal, signal in SIZELESS)
    alerts = httpx.get(f"{live.prometheus}/api/v1/rules").json()["data"]["groups"]
    assert all(r["health"] == "ok" for g in alerts for r in g["rules"]), alerts


@pytest.mark.server
def test_every_autoscaling_query_gives_a_value_for_each_size(live: Live, kubectl: str) -> None:
    """The ScaledObjects name the production family's sizes; the same query on each size served here."""
    queries = scaledobject_queries()
    assert queries
    for query in queries:
        for size in live.sizes:
            local = re.sub(r'size="[^"]+"', f'size="{size}"', query)
            assert live.query(local), f"no value: {local}"
