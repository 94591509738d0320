"""What can be checked of infra/ and prefect.yaml without docker, a cluster or GPUs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_services_and_dependencies(compose):
    services = compose["services"]
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "s3", "worker-cpu", "worker-gpu"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        needs = service.get("depends_on", {})
        for dependency in needs if isinstance(needs, list) else needs.keys():
            assert dependency in services, (name, dependency)
            condition = needs[dependency].get("condition") if isinstance(needs, dict) else None
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file(), (name, build)
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "postgresql" in services["mlflow"]["command"] and "--artifacts-destination s3://" in services["mlflow"]["command"]
    assert "postgresql" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for worker, pool in (("worker-cpu", "cleanse-process"), ("worker-gpu", "cleanse-gpu")):
        assert f"--pool {pool}" in services[worker]["command"]
        assert services[worker]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_compose_gpu_reservation_and_no_secrets(compose):
    (device,) = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert "deploy" not in compose["services"]["worker-cpu"]
    text = (INFRA / "docker-compose.yml").read_text()
    for variable in ("PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert f"${{{variable}:?" in text, variable  # required from infra/.env, never a default
        assert re.search(rf"^{variable}=", (INFRA / ".env.example").read_text(), re.M)
    assert {".env", "s3.json"} <= set((INFRA / ".gitignore").read_text().split())


def _has_compose() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="docker compose is not installed")
def test_docker_compose_config(tmp_path):
    env = tmp_path / ".env"
    env.write_text((INFRA / ".env.example").read_text())
    result = subprocess.run(["docker", "compose", "-f", str(INFRA / "docker-compose.yml"), "--env-file", str(env),
                             "config", "-q"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dockerfiles_install_the_project():
    for name, torch_index in (("Dockerfile.cpu", "whl/cpu"), ("Dockerfile.cuda", "whl/cu")):
        text = (INFRA / name).read_text()
        assert text.startswith("#") and "FROM " in text and torch_index in text, name
        assert "-c constraints.txt" in text or "constraints-gpu.txt" in text, name
        for copied in re.findall(r"^COPY (.+?) \./", text, re.M):
            for path in copied.split():
                assert (ROOT / path).exists(), (name, path)
    assert "nvidia/cuda" in (INFRA / "Dockerfile.cuda").read_text()


def test_kubernetes_manifests():
    documents = [doc for doc in yaml.safe_load_all((INFRA / "k8s" / "gpu-worker.yaml").read_text()) if doc]
    kinds = {doc["kind"] for doc in documents}
    assert {"Deployment", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for doc in documents:
        assert doc["apiVersion"] and doc["metadata"]["name"] and doc["metadata"]["namespace"] == "cleanse"
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:5] == ["prefect", "worker", "start", "--pool", "cleanse-k8s"]


def test_kubernetes_job_template_requests_gpus():
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= declared, used - declared
    job = template["job_configuration"]["job_manifest"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] == 1
    tolerations = job["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_prefect_yaml_deployments_load_and_validate():
    """What ``prefect deploy`` checks before it registers anything: each entrypoint loads as a flow
    and each deployment's parameters are valid for it."""
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {"cleanse-process": "process", "cleanse-docker": "docker", "cleanse-k8s": "kubernetes"}
    names = [deployment["name"] for deployment in config["deployments"]]
    assert names == ["local", "memorization", "diffusion-cache", "sweep", "gpu-docker", "gpu-k8s"]
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        flow.validate_parameters(deployment["parameters"])
        assert deployment["work_pool"]["name"] in pools
    by_name = {deployment["name"]: deployment for deployment in config["deployments"]}
    docker = by_name["gpu-docker"]["work_pool"]["job_variables"]
    (request,) = docker["container_create_kwargs"]["device_requests"]
    assert request["driver"] == "nvidia" and request["capabilities"] == [["gpu"]]
    assert by_name["gpu-k8s"]["work_pool"]["job_variables"]["gpus"] == 1
    assert by_name["sweep"]["parameters"]["key"] == "corruption.fraction"

