"""Deployment files that can be checked without a Docker engine: compose, schema, README example."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from shared.codec import BadJob, decode_job, encode_job
from shared.keys import JOB_FIELD
from shared.protocol import Job, job_json_schema
from shared.settings import BUNDLED_MODEL, Settings

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a gateway may take to exit after its drain bound (README: Draining a gateway).
GATEWAY_EXIT_S = 2.0
SAMPLE_JOB: dict[str, Any] = {
    "v": 1,
    "id": "job-1",
    "session_id": "demo-1",
    "prompt": "Hello",
    "max_tokens": 16,
}


def _works(argv: list[str]) -> bool:
    if shutil.which(argv[0]) is None:
        return False
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin), else ``docker-compose`` (1.29+); make setup installs one."""
    if _works(["docker", "compose", "version"]):
        return ["docker", "compose"]
    if _works(["docker-compose", "version"]):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` works: run `make setup`")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    argv = [*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stderr}"
    parsed = yaml.safe_load(done.stdout)
    assert isinstance(parsed, dict)
    return parsed


def _ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(published, target) pairs, from the short ("8000:8000") or the long syntax."""
    pairs: set[tuple[int, int]] = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((int(port["published"]), int(port["target"])))
        else:
            published, _, target = str(port).split("/")[0].rpartition(":")
            pairs.add((int(published.rpartition(":")[2]), int(target)))
    return pairs


def test_compose_has_the_three_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "gateway", "worker"}


def test_compose_gateway(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert (8000, 8000) in _ports(gateway)
    assert gateway["environment"]["TOKENBUS_REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["environment"]["TOKENBUS_HOST"] == "0.0.0.0"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile.gateway"


def test_compose_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and int(d.get("count", 0)) == 1 and "gpu" in d["capabilities"]
        for d in devices
    ), devices
    assert worker["environment"]["TOKENBUS_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"


def test_compose_redis_uses_our_config(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "healthcheck" in redis
    assert any("deploy/redis.conf" in str(v) for v in redis["volumes"])
    conf = (ROOT / "deploy" / "redis.conf").read_text()
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    assert re.search(r"^appendonly yes$", conf, re.M)


def test_k8s_manifests_parse() -> None:
    kinds: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.add((doc["kind"], doc["metadata"]["name"] if "metadata" in doc else ""))
    for expected in [
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("Deployment", "worker"),
        ("ConfigMap", "tokenbus-config"),
        ("Secret", "tokenbus-secret"),
    ]:
        assert expected in kinds


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in deploy/k8s, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "metadata" in doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def pod_spec(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = objects[("Deployment", name)]["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, spec["containers"]
    return found[0]


@pytest.fixture
def k8s_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a pod gets from the ConfigMap (and defaults for what it leaves out)."""
    data = k8s_objects()[("ConfigMap", "tokenbus-config")]["data"]
    for name, value in data.items():
        assert isinstance(value, str), f"{name}: ConfigMap values must be strings"
        monkeypatch.setenv(name, value)
    for name in ("TOKENBUS_WORKER_DRAIN_S", "TOKENBUS_GATEWAY_DRAIN_S", "TOKENBUS_LEASE_TTL_S"):
        assert name in data, f"the ConfigMap should set {name}"
    return Settings()


def test_k8s_deployments_read_the_config_map() -> None:
    objects = k8s_objects()
    for name in ("gateway", "worker"):
        sources = container(pod_spec(objects, name), name)["envFrom"]
        assert {"configMapRef": {"name": "tokenbus-config"}} in sources, name


def test_k8s_worker_grace_period_outlasts_its_drain(k8s_settings: Settings) -> None:
    """Past the grace period the kubelet SIGKILLs the pod: a drain cut short hands nothing back."""
    spec = pod_spec(k8s_objects(), "worker")
    grace = spec["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > k8s_settings.worker_drain_s


def test_k8s_gateway_sleeps_before_draining_within_its_grace_period(
    k8s_settings: Settings,
) -> None:
    """preStop sleeps while the Service stops routing here; then SIGTERM starts the drain, and
    the grace period (which the preStop hook counts against) outlasts both and the exit."""
    spec = pod_spec(k8s_objects(), "gateway")
    gateway = container(spec, "gateway")
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    sleep_s = float(command[1])
    assert sleep_s > 0
    grace = spec["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > sleep_s + k8s_settings.gateway_drain_s + GATEWAY_EXIT_S
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


def duration_s(value: str | float) -> float:
    """A compose duration ("45s", "1m30s", "1.5s", "500ms") in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_duration_s_reads_compose_durations() -> None:
    assert [duration_s(v) for v in ("45s", "1m30s", "1.5s", "500ms", 20)] == [
        45.0,
        90.0,
        1.5,
        0.5,
        20.0,
    ]


def compose_setting(service: dict[str, Any], name: str) -> float:
    """A float setting as the service's environment sets it, else its default."""
    value = service.get("environment", {}).get(f"TOKENBUS_{name.upper()}")
    if value is None:
        default = Settings.model_fields[name].default
        assert isinstance(default, float)
        return default
    return float(value)


def test_compose_grace_periods_outlast_the_drains(compose: dict[str, Any]) -> None:
    """Docker SIGKILLs a container still running after stop_grace_period (default 10 s)."""
    worker = compose["services"]["worker"]
    drain = compose_setting(worker, "worker_drain_s")
    assert duration_s(worker["stop_grace_period"]) > drain
    gateway = compose["services"]["gateway"]
    drain = compose_setting(gateway, "gateway_drain_s")
    assert duration_s(gateway["stop_grace_period"]) > drain + GATEWAY_EXIT_S


def test_schema_file_is_current() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "schema", "--out", "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    kept = (ROOT / "schema" / "job.v1.json").read_text()
    assert kept == done.stdout, "schema/job.v1.json is stale: run `make schema`"
    assert json.loads(kept) == job_json_schema()


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_sample_job_round_trips(encoding: str) -> None:
    schema = json.loads((ROOT / "schema" / "job.v1.json").read_text())
    assert set(schema["required"]) <= set(SAMPLE_JOB)
    assert set(SAMPLE_JOB) <= set(schema["properties"])

    entry: dict[bytes | str, bytes | str] = {
        JOB_FIELD: json.dumps(SAMPLE_JOB)
        if encoding == "json"
        else msgpack.packb(SAMPLE_JOB, use_bin_type=True)
    }
    job = decode_job(entry)
    assert (job.id, job.session_id, job.prompt, job.max_tokens) == ("job-1", "demo-1", "Hello", 16)

    encoded = encode_job(job, "msgpack" if encoding == "msgpack" else "json")
    fields: dict[bytes | str, bytes | str] = {k: v for k, v in encoded.items()}
    again = decode_job(fields)
    assert again == job
    dumped = job.model_dump(mode="json")
    assert set(dumped) <= set(schema["properties"])
    assert set(schema["required"]) <= set(dumped)


def test_job_missing_a_required_field_is_refused() -> None:
    schema = json.loads((ROOT / "schema" / "job.v1.json").read_text())
    for name in schema["required"]:
        partial = {k: v for k, v in SAMPLE_JOB.items() if k != name}
        with pytest.raises(BadJob) as caught:
            decode_job({JOB_FIELD: json.dumps(partial)})
        assert caught.value.code == "invalid_job"
        assert name in caught.value.reason


def test_readme_xadd_example_is_a_valid_job() -> None:
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"XADD (\S+) '\*' job '(\{.*?\})'", readme)
    assert examples, "README.md has no `redis-cli XADD ... job '{...}'` example"
    for stream, payload in examples:
        job = decode_job({JOB_FIELD: payload})
        assert isinstance(job, Job)
        assert stream == f"tokenbus:jobs:{BUNDLED_MODEL}"
