"""Compose, Prometheus and Grafana files: valid, consistent, and querying only metrics the server exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.process import ServerProcess

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose"
METRIC = re.compile(r"\btokenferry_[a-z0-9_]+")


def queried_metrics() -> set[str]:
    """Every tokenferry_* series named by the dashboard's queries and the Prometheus rules."""
    dashboard = json.loads((COMPOSE / "grafana/dashboards/tokenferry.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((COMPOSE / "rules.yml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in expressions for name in METRIC.findall(expr)}


def live_series(server: ServerProcess) -> set[str]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_queried_metric_exists_in_a_live_answer(tiny_server: ServerProcess) -> None:
    # Labelled series appear once something was counted under their labels: make one of each kind.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(f"{tiny_server.url}/v1/chat/completions", json={**body, "temperature": -1}, timeout=60).status_code == 400
    queried = queried_metrics()
    assert {"tokenferry_time_to_first_token_seconds_bucket", "tokenferry_waiting_requests"} <= queried
    missing = queried - live_series(tiny_server)
    assert not missing, f"the dashboard or rules query metrics the server does not export: {sorted(missing)}"


def promtool() -> str:
    if shutil.which("promtool") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("promtool missing (Debian's prometheus package; root and apt-get to install it)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
            check=True, capture_output=True, env=env, timeout=900,
        )  # fmt: skip
    return shutil.which("promtool")


def test_promtool_accepts_the_config_and_rules() -> None:
    tool = promtool()
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        done = subprocess.run([tool, *args], cwd=COMPOSE, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_compose_wires_the_three_services_to_files_that_exist() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"tokenferry", "prometheus", "grafana"}
    build = services["tokenferry"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (COMPOSE / source).exists(), f"{volume}: {source} is missing"
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["tokenferry:8000"] and scrape["metrics_path"] == "/metrics"
    grace = int(services["tokenferry"]["stop_grace_period"].removesuffix("s"))
    assert grace > float(services["tokenferry"]["environment"]["TOKENFERRY_DRAIN_TIMEOUT"])


def test_grafana_provisions_the_datasource_the_dashboard_uses() -> None:
    datasource = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads((COMPOSE / "grafana/dashboards/tokenferry.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Throughput", "Time to first token", "Inter-token latency", "Waiting queue depth", "Running batch size", "Batch padding ratio", "Errors"):
        assert any(t.startswith(wanted) for t in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert all(target["expr"] for target in panel["targets"])


def test_the_gateway_file_puts_two_ready_replicas_behind_the_gateway() -> None:
    """deploy/compose/gateway.yml: the gateway's command, read by sglang-router's own parser, names both
    replicas on their port, routes by prefix and checks /ready, which the replicas' health checks use too."""
    from sglang_router.launch_router import parse_router_args

    services = yaml.safe_load((COMPOSE / "gateway.yml").read_text())["services"]
    gateway = services.pop("gateway")
    assert set(services) == {"replica-a", "replica-b"}
    args = parse_router_args(gateway["command"])
    assert args.worker_urls == [f"http://{name}:8000" for name in services]
    assert args.policy == "cache_aware" and args.health_check_endpoint == "/ready"
    assert gateway["depends_on"] == {name: {"condition": "service_healthy"} for name in services}
    assert (COMPOSE / gateway["build"]["context"] / "Dockerfile").is_file()
    # The image runs the version the tests run.
    pinned = re.search(r"^sglang-router==(\S+)$", (COMPOSE.parents[1] / "constraints.txt").read_text(), re.M)
    dockerfile = (COMPOSE / gateway["build"]["context"] / "Dockerfile").read_text()
    assert pinned and f"SGLANG_ROUTER_VERSION={pinned[1]}" in dockerfile and gateway["image"].endswith(pinned[1])
    for replica in services.values():
        assert "/ready" in replica["healthcheck"]["test"][-1]
        assert int(replica["stop_grace_period"].removesuffix("s")) > float(replica["environment"]["TOKENFERRY_DRAIN_TIMEOUT"])
        build = replica["build"]
        assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()
