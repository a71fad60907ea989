"""Kubernetes manifests: schema-valid offline, and consistent with the server and with each other."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((KUBERNETES / name).read_text())


def validate(document: dict) -> None:
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        validate(document)


def test_the_validator_catches_mistakes() -> None:
    broken = copy.deepcopy(load("deployment.yaml"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_kustomization_lists_existing_files() -> None:
    for resource in load("kustomization.yaml")["resources"]:
        assert (KUBERNETES / resource).is_file(), resource


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_probes_and_grace_period_fit_the_server(name: str) -> None:
    pod = load(name)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "the model's load time fits the startup probe"
    drain = float(load("configmap.yaml")["data"]["TOKENFERRY_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_gpu_variant_requests_a_gpu() -> None:
    container = load("deployment-gpu.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "TOKENFERRY_DEVICE", "value": "cuda"} in container["env"]


def test_the_autoscaler_scales_on_the_queue_metric_the_adapter_serves() -> None:
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(load("prometheus-adapter.yaml")["data"]["config.yaml"])
    rule = adapter["rules"][0]
    assert rule["name"]["as"] == metric == "tokenferry_waiting_requests"
    assert rule["seriesQuery"].startswith("tokenferry_waiting_requests{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_the_gateway_discovers_the_tokenferry_pods_and_routes_by_prefix() -> None:
    """The gateway's arguments, read by sglang-router's own parser, find the tokenferry pods (not itself)
    on their port, check /ready, and may watch the pods they find."""
    from sglang_router.launch_router import parse_router_args

    role, binding, account, deployment, service = (None,) * 5
    for document in yaml.safe_load_all((KUBERNETES / "gateway.yaml").read_text()):
        match document["kind"]:
            case "Role":
                role = document
            case "RoleBinding":
                binding = document
            case "ServiceAccount":
                account = document
            case "Deployment":
                deployment = document
            case "Service":
                service = document
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = parse_router_args([a.replace("$(POD_NAMESPACE)", "default") for a in container["args"]])
    assert args.service_discovery and args.policy == "cache_aware" and args.health_check_endpoint == "/ready"
    replicas = load("deployment.yaml")["spec"]["template"]
    assert args.selector.items() <= replicas["metadata"]["labels"].items()
    assert not args.selector.items() <= pod["metadata"]["labels"].items(), "the gateway would route to itself"
    assert args.service_discovery_port == replicas["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"] == pod["spec"]["serviceAccountName"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert "gateway.yaml" in load("kustomization.yaml")["resources"]
