"""deploy/k8s renders with kustomize, validates offline against the Kubernetes schemas, and agrees
with the deploy files it ships: ConfigMap from deploy/k8s/config, Secret for the key, one worker
Deployment + Service + ScaledObject per remote tier, budgets carried into resources and scaling."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from server.config import DeployConfig, load_config
from tests.deploy.files import DEPLOY, run

K8S = DEPLOY / "k8s"


@functools.cache
def rendered() -> str:
    result = run(["kubectl", "kustomize", K8S])
    assert result.returncode == 0, result.stderr
    return result.stdout


def docs(kind: str | None = None) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered()) if d and (kind is None or d["kind"] == kind)]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs(kind)}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def mounted_config(deployment: dict[str, Any]) -> DeployConfig:
    args = container(deployment)["args"]
    path = Path(args[args.index("--config") + 1])
    assert path.parent == Path("/etc/boomerang"), args
    return load_config(K8S / "config" / path.name)


def gib(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", quantity)
    assert match, quantity
    return float(match[1]) / (1024 if match[2] == "Mi" else 1)


def test_kustomize_renders_valid_manifests(kubectl: str, kubernetes_validate: str, tmp_path: Path) -> None:
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered())
    result = run([kubernetes_validate, "--strict", out])
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+)/", result.stdout + result.stderr)
    no_schema = set(re.findall(r"Couldn't find schema for kind (\S+)", result.stdout + result.stderr))
    assert no_schema <= {"ScaledObject"}, no_schema  # KEDA's CRD: checked by hand below
    assert len(passed) == len(docs()) - len(docs("ScaledObject"))
    assert {"deployment", "service", "configmap", "secret", "namespace", "networkpolicy"} <= set(passed)


def test_configmap_holds_the_deploy_files_and_secret_the_key(kubectl: str) -> None:
    (config_map,) = docs("ConfigMap")
    assert set(config_map["data"]) == {p.name for p in (K8S / "config").glob("*.yaml")}
    for name, text in config_map["data"].items():
        assert text == (K8S / "config" / name).read_text()
    (secret,) = docs("Secret")
    gateway = by_name("Deployment")["boomerang-gateway"]
    env = {e["name"]: e for e in container(gateway)["env"]}
    key_env = mounted_config(gateway).auth.api_key_env
    ref = env[key_env]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert mounted_config(gateway).auth.api_key is None, "the key comes from the Secret, not the file"


def test_one_worker_pool_per_remote_tier(kubectl: str) -> None:
    deployments, services, scaled = by_name("Deployment"), by_name("Service"), by_name("ScaledObject")
    gateway = mounted_config(deployments["boomerang-gateway"])
    remote = [t for t in gateway.tiers if t.engine == "remote"]
    assert remote and len(remote) == len(gateway.tiers)
    for tier in remote:
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", tier.url or "")
        assert match, tier.url
        service = services[match[1]]
        assert service["spec"]["ports"][0]["port"] == int(match[2])
        worker = deployments[match[1]]
        labels = worker["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        (served,) = mounted_config(worker).tiers
        assert (served.size, served.engine) == (tier.size, "vllm"), "the worker serves the size the gateway sends"
        assert scaled[match[1]]["spec"]["scaleTargetRef"]["name"] == match[1]


def test_resources_and_scaling_follow_the_budgets(kubectl: str) -> None:
    deployments, scaled = by_name("Deployment"), by_name("ScaledObject")
    gateway = deployments["boomerang-gateway"]
    resources = container(gateway)["resources"]
    budget = mounted_config(gateway).pool.memory_budget_gb
    assert budget is not None
    assert gib(resources["requests"]["memory"]) == gib(resources["limits"]["memory"]) == budget + 2
    for name, obj in scaled.items():
        worker = deployments[name]
        config = mounted_config(worker)
        pool, vllm, (tier,) = config.pool, config.engines.vllm, config.tiers
        assert pool.memory_budget_gb is not None
        res = container(worker)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1", name
        terms = worker["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]  # fmt: skip
        (gpu_memory,) = [e for t in terms for e in t["matchExpressions"] if e["key"] == "nvidia.com/gpu.memory"]
        assert gpu_memory["operator"] == "Gt" and int(gpu_memory["values"][0]) >= pool.memory_budget_gb * 1024
        assert (tier.min_replicas, tier.max_replicas) == (1, 1), "one replica per pod: KEDA scales pods"
        spec = obj["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "a pool at 0 pods cannot be woken up"
        assert spec["pollingInterval"] == pool.scale_interval_s
        assert spec["cooldownPeriod"] == pool.idle_timeout_s
        window = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert window["stabilizationWindowSeconds"] == pool.idle_timeout_s
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert float(trigger["metadata"]["threshold"]) == vllm.max_num_seqs + pool.queue_depth_target
        query = trigger["metadata"]["query"]
        assert set(re.findall(r'size="([^"]+)"', query)) == {tier.size}, query
        metrics = set(re.findall(r"(boomerang_\w+)\{", query))
        assert metrics == {"boomerang_running_requests", "boomerang_waiting_requests"}, query


def test_pods_are_locked_down(kubectl: str) -> None:
    for deployment in docs("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        c = container(deployment)
        assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]


def test_kubernetes_waits_for_the_drain(kubectl: str) -> None:
    """Kubernetes sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds: that must outlast
    the gateway's own drain (server.shutdown_grace_s) or in-flight requests are killed mid-stream."""
    for deployment in docs("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        grace = mounted_config(deployment).server.shutdown_grace_s
        assert pod["terminationGracePeriodSeconds"] >= grace + 10, deployment["metadata"]["name"]
