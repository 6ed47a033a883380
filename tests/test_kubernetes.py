"""deploy/kubernetes: every manifest against the Kubernetes schemas (offline), and their agreement.

The schemas come with the ``kubernetes-validate`` package (strict: unknown
fields are errors), so nothing is fetched; a fixture makes any connection
attempt fail to prove it. The ServiceMonitor is a Prometheus Operator CRD
whose schema is not there: tests/data/servicemonitor.schema.json holds the
schema from the CRD's definition (where from: its ``$comment``), checked with
jsonschema as strictly (unknown fields are errors).
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from monitor.cluster import ClusterSettings, assign, resolve
from monitor.configfile import load_settings
from monitor.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are meant for, and the newest the package knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.example.yaml", "mosquitto.example.yaml"}
POD_NAME = "monitor-0"
SERVICEMONITOR_SCHEMA = ROOT / "tests" / "data" / "servicemonitor.schema.json"


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def one(name: str) -> dict[str, Any]:
    (doc,) = load(name)
    return doc


def manifests() -> list[str]:
    return sorted(path.name for path in DEPLOY.glob("*.yaml"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def statefulset() -> dict[str, Any]:
    return one("statefulset.yaml")


@pytest.fixture
def container(statefulset: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = statefulset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


CUSTOM_KINDS = {"ServiceMonitor", "Kustomization"}


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", manifests())
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, version: str):
    docs = load(name)
    assert docs, f"{name} is empty"
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{name}: {doc['kind']} {where}: {exc.message}")


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["securityContext"].update(readOnlyRootFilesytem=True), "readOnlyRootFilesytem"),
        (lambda c: c["livenessProbe"]["httpGet"].update(port=[8080]), "port"),
        (lambda c: c.update(env={"MONITOR_HTTP__HOST": "0.0.0.0"}), "is not of type"),
    ],
)
def test_schema_validation_catches_mistakes(statefulset, container, edit, message):
    edit(container)
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        kubernetes_validate.validate(statefulset, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_examples():
    kustomization = one("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "monitoring"
    # The real Secret is created by hand (applying the example would overwrite it);
    # the broker is the user's.
    assert sorted(kustomization["resources"]) == sorted(set(manifests()) - NOT_IN_KUSTOMIZATION)


def strict(schema: Any) -> Any:
    """``schema`` with unknown fields forbidden wherever it lists an object's fields.

    A CRD schema leaves them out (the API server silently prunes unknown fields,
    so a typo'd field is lost, not reported); strict is what kubernetes-validate
    does for the built-in kinds above.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        tightened["additionalProperties"] = False
    return tightened


def servicemonitor_errors(doc: dict[str, Any]) -> list[str]:
    schema = strict(json.loads(SERVICEMONITOR_SCHEMA.read_text()))
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '(top)'}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def test_servicemonitor_is_valid_against_the_prometheus_operator_crd_schema():
    monitor = one("servicemonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert servicemonitor_errors(monitor) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(endpoint=s.pop("endpoints")), "'endpoint' was unexpected"),
        (lambda s: s.update(endpoint=s.pop("endpoints")), "'endpoints' is a required property"),
        (lambda s: s["endpoints"][0].update(paht=s["endpoints"][0].pop("path")), "'paht' was unexpected"),
        (lambda s: s["endpoints"][0].update(interval=15), "spec.endpoints.0.interval: 15 is not of type"),
        (lambda s: s["endpoints"][0].update(interval="15 s"), "'15 s' does not match"),
        (lambda s: s["endpoints"][0].update(scheme="HTTP"), "'HTTP' is not one of ['http', 'https']"),
        (lambda s: s["selector"].update(matchLabel=s["selector"].pop("matchLabels")), "'matchLabel' was"),
        (lambda s: s.update(endpoints={"port": "http"}), "spec.endpoints: {'port': 'http'} is not of type"),
    ],
)
def test_servicemonitor_schema_catches_mistakes(edit, message):
    monitor = one("servicemonitor.yaml")
    edit(monitor["spec"])
    errors = servicemonitor_errors(monitor)
    assert any(message in error for error in errors), errors


def test_servicemonitor_scrapes_metrics_every_15s():
    monitor = one("servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert set(monitor["spec"]["selector"]) == {"matchLabels"}
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_servicemonitor_selects_only_the_metrics_service_and_its_port_exists():
    monitor = one("servicemonitor.yaml")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [one("service.yaml"), one("service-headless.yaml")]
    selected = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    # Both Services front the same pods: selecting both would scrape every pod twice.
    assert [s["metadata"]["name"] for s in selected] == ["monitor"]
    ports = {port["name"] for port in selected[0]["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= ports


def test_statefulset_governing_service_is_the_headless_one(statefulset):
    headless = one("service-headless.yaml")
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"] == "monitor-headless"
    assert headless["spec"]["clusterIP"] == "None"
    assert one("service.yaml")["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("name", ["service.yaml", "service-headless.yaml"])
def test_service_selects_the_pods_and_targets_their_http_port(statefulset, container, name):
    service = one(name)
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports


def test_replicas_equal_the_shard_count(statefulset, container):
    replicas = statefulset["spec"]["replicas"]
    shard_count = int(env_of(container)["MONITOR_CLUSTER__SHARD_COUNT"]["value"])
    assert replicas == shard_count == 2
    settings = ClusterSettings.model_validate(
        {"shard_count": env_of(container)["MONITOR_CLUSTER__SHARD_COUNT"]["value"]}
    )
    pods = [f"{statefulset['metadata']['name']}-{ordinal}" for ordinal in range(replicas)]
    assert [resolve(settings, pod).index for pod in pods] == list(range(replicas))
    with pytest.raises(ValueError, match="set MONITOR_CLUSTER__SHARD_COUNT to the StatefulSet's replicas"):
        resolve(settings, f"monitor-{replicas}")


def test_statefulset_runs_shards_in_parallel_with_stable_identity(statefulset, container):
    spec = statefulset["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 30
    assert spec["template"]["spec"]["enableServiceLinks"] is False
    assert container["args"] == ["run", "--config", "/etc/monitor/monitor.yaml"]
    assert container["image"] == "registry.example/monitor:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = env_of(container)
    assert env["MONITOR_CLUSTER__INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["MONITOR_MQTT__CLIENT_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "MONITOR_CLUSTER__SHARD_INDEX" not in env, "the index comes from the pod name"


def test_probes_use_healthz_and_readyz_on_the_http_port(container):
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "http"}
    # Model load and warm-up: as long as systemd's TimeoutStartSec=300.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert {"name": "http", "containerPort": 8080} in container["ports"]


def test_pod_runs_unprivileged_on_a_read_only_root(statefulset, container):
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in volumes["tmp"]
    assert mounts["config"]["mountPath"] == "/etc/monitor"
    assert mounts["config"]["readOnly"] is True
    assert volumes["config"]["configMap"]["name"] == one("configmap.yaml")["metadata"]["name"]


def test_spool_is_on_the_per_pod_volume(statefulset, container):
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["state"] == "/var/lib/monitor"
    spool = env_of(container)["MONITOR_SPOOL__PATH"]["value"]
    assert spool == "/var/lib/monitor/spool.db"
    # Everything the daemon writes is on a writable volume.
    writable = [mounts["state"], mounts["tmp"]]
    for name in ("MONITOR_SPOOL__PATH", "YOLO_CONFIG_DIR", "CUDA_CACHE_PATH", "MPLCONFIGDIR"):
        path = env_of(container)[name]["value"]
        assert any(path.startswith(f"{root}/") for root in writable), (name, path)


def test_mqtt_password_comes_from_the_secret(container):
    secret = one("secret.example.yaml")
    ref = env_of(container)["MONITOR_MQTT__PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def test_every_monitor_variable_names_a_setting(container):
    # pydantic-settings ignores MONITOR_* variables of unknown sections: a typo would go unnoticed.
    sections: dict[str, Any] = {name: field.annotation for name, field in Settings.model_fields.items()}
    sections["cluster"] = ClusterSettings
    for name in env_of(container):
        if not name.startswith("MONITOR_"):
            continue
        section, _, key = name.removeprefix("MONITOR_").lower().partition("__")
        assert section in sections, name
        assert key in sections[section].model_fields, name


def pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the kubelet would set them in pod monitor-0."""
    secret = one("secret.example.yaml")["stringData"]
    values = {}
    for item in container["env"]:
        source = item.get("valueFrom", {})
        if "value" in item:
            values[item["name"]] = item["value"]
        elif source.get("fieldRef") == {"fieldPath": "metadata.name"}:
            values[item["name"]] = POD_NAME
        elif "secretKeyRef" in source:
            values[item["name"]] = secret[source["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"unexpected env source {item}")
    return values


def test_configmap_config_loads_with_the_pod_environment(container, tmp_path, monkeypatch):
    config = tmp_path / "monitor.yaml"
    data = one("configmap.yaml")["data"]
    assert set(data) == {"monitor.yaml"}
    config.write_text(data["monitor.yaml"])
    for name in [name for name in os.environ if name.startswith("MONITOR_")]:
        monkeypatch.delenv(name)
    for name, value in pod_environment(container).items():
        monkeypatch.setenv(name, value)

    settings = load_settings(config)

    assert settings.mqtt.host == "mosquitto.monitoring.svc"
    assert settings.mqtt.client_id == POD_NAME
    assert settings.mqtt.username == "monitor"
    assert settings.mqtt.password is not None
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port == 8080
    assert str(settings.spool.path) == "/var/lib/monitor/spool.db"
    assert all(c.url.get_secret_value().startswith("rtsp://") for c in settings.cameras.values())
    assert settings.cluster.shard_count == 2
    assert settings.cluster.instance_id == POD_NAME


def test_every_shard_of_the_example_gets_cameras():
    config = yaml.safe_load(one("configmap.yaml")["data"]["monitor.yaml"])
    shards = assign(config["cameras"], one("statefulset.yaml")["spec"]["replicas"])
    assert all(shards.values()), shards


def readme_shards_tables() -> dict[int, dict[str, int]]:
    """The `monitor shards --count N` outputs shown in deploy/kubernetes/README.md, by N."""
    text = (DEPLOY / "README.md").read_text()
    tables = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        command = re.search(r"monitor shards .*--count (\d+)", block)
        rows = re.findall(r"^(\w+)\s+(\d+)$", block, re.MULTILINE)
        if command and rows:  # a command shown with its output
            tables[int(command[1])] = {camera: int(shard) for camera, shard in rows}
    return tables


def test_readme_shows_the_real_split_of_the_example_cameras():
    cameras = yaml.safe_load(one("configmap.yaml")["data"]["monitor.yaml"])["cameras"]
    tables = readme_shards_tables()
    assert set(tables) == {2, 3}
    for count, table in tables.items():
        expected = {camera: shard for shard, names in assign(cameras, count).items() for camera in names}
        assert table == expected, count


# -- the image (Dockerfile at the repository root) ----------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def test_the_image_runs_as_the_statefulsets_user(statefulset):
    security = statefulset["spec"]["template"]["spec"]["securityContext"]
    assert instruction("USER") == [f"{security['runAsUser']}:{security['runAsGroup']}"]
    assert security["fsGroup"] == security["runAsGroup"]
    runs = " ".join(instruction("RUN"))
    assert f"groupadd --gid {security['runAsGroup']} " in runs
    assert f"useradd --uid {security['runAsUser']} --gid {security['runAsGroup']} " in runs
    (base,) = instruction("FROM")
    assert base.startswith("python:3.11-slim")


def test_the_image_entrypoint_takes_the_statefulsets_args(container):
    assert "command" not in container, "the image's ENTRYPOINT is the command"
    assert [json.loads(e) for e in instruction("ENTRYPOINT")] == [["monitor"]]
    assert [json.loads(c) for c in instruction("CMD")] == [container["args"]]
    assert instruction("EXPOSE") == [str(p["containerPort"]) for p in container["ports"]]


def test_the_image_holds_the_weights_at_the_configmaps_model_path():
    model_path = yaml.safe_load(one("configmap.yaml")["data"]["monitor.yaml"])["model"]["path"]
    copies = [args.split() for args in instruction("COPY")]
    (weights,) = [c for c in copies if c[-1] == model_path]
    assert weights[0].endswith(Path(model_path).name)
    assert ["pyproject.toml", "README.md", "./"] in copies
    assert ["monitor", "./monitor"] in copies
    # .dockerignore lets exactly what is copied into the build context.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {src for *sources, _ in copies for src in sources} == allowed


def test_the_image_writes_only_where_the_pod_has_writable_volumes(statefulset, container):
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    writable = (mounts["state"], mounts["tmp"])
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction("ENV"))))
    pod_env = env_of(container)
    for name in ("HOME", "YOLO_CONFIG_DIR", "MPLCONFIGDIR", "CUDA_CACHE_PATH"):
        assert any(env[name] == root or env[name].startswith(f"{root}/") for root in writable), name
        if name in pod_env:
            assert pod_env[name]["value"] == env[name], name
    assert instruction("WORKDIR")[-1] == mounts["state"]
    security = statefulset["spec"]["template"]["spec"]["securityContext"]
    owner = f"{security['runAsUser']}:{security['runAsGroup']}"
    assert f"chown {owner} {mounts['state']}" in " ".join(instruction("RUN"))
