"""The Dockerfile passes hadolint at its strictest and keeps its promises (non-root, health check,
cache volume, CPU default with a CUDA target); docker-compose.yml parses (no Docker engine here:
images are neither built nor started) and wires Prometheus and Grafana to the committed files."""

from __future__ import annotations

import re

import yaml

from tests.deploy.files import DEPLOY, REPO, run

DOCKERFILE = REPO / "Dockerfile"


def _stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_hadolint_passes(hadolint: str) -> None:
    result = run([hadolint, "--failure-threshold", "info", DOCKERFILE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_images_run_as_non_root_with_health_check_and_cache_volume() -> None:
    stages = _stages()
    assert list(stages)[-1] == "cpu", "the last stage is what a plain `docker build .` gives"
    assert "cuda" in stages and re.search(r"^FROM \$\{VLLM_IMAGE\} AS cuda", DOCKERFILE.read_text(), re.M)
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v\d", DOCKERFILE.read_text(), re.M)
    for name in ("cpu", "cuda"):
        body = stages[name]
        assert re.search(r"^USER 10001:10001$", body, re.M), name
        assert re.search(r"^HEALTHCHECK .*\n?.*/health", body, re.M), name
        assert 'VOLUME ["/cache"]' in body and "BOOMERANG_CACHE=/cache" in body, name
    assert "--constraint requirements.lock ." in stages["cpu-build"], "the CPU image takes the runtime tree only"


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M))
    sources = {src for line in copied for src in line.split()}
    assert sources <= allowed, sources - allowed
    assert all((REPO / src).exists() for src in sources)


def test_compose_file_parses_and_mounts_the_committed_files(docker_compose: str) -> None:
    checked = run([docker_compose, "-f", REPO / "docker-compose.yml", "config", "-q"], cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    rendered = run([docker_compose, "-f", REPO / "docker-compose.yml", "config"], cwd=REPO)
    services = yaml.safe_load(rendered.stdout)["services"]
    assert set(services) == {"gateway", "prometheus", "grafana"}
    mounts = {s: [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in c.get("volumes", [])]
              for s, c in services.items()}  # fmt: skip
    for service, folder in (("prometheus", "prometheus"), ("grafana", "grafana/provisioning")):
        assert str(DEPLOY / folder) in mounts[service], mounts[service]
    assert str(DEPLOY / "config.yaml") in mounts["gateway"]
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["gateway:8000"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/boomerang.yml").read_text())
    dashboards_in = provider["providers"][0]["options"]["path"]
    assert any(str(v).startswith(f"{DEPLOY / 'grafana/dashboards'}:{dashboards_in}")
               for v in _raw_volumes(services["grafana"]))  # fmt: skip


def _raw_volumes(service: dict[str, object]) -> list[str]:
    out = []
    for v in service.get("volumes", []):  # type: ignore[attr-defined]
        out.append(f"{v['source']}:{v['target']}" if isinstance(v, dict) else str(v))
    return out
