"""The Kubernetes manifests (``deploy/k8s``, docs/kubernetes.md), as an operator applies them.

Each overlay — ``single`` and ``workers``, each also with the in-cluster PostgreSQL component
switched on the way the overlay's comment says — is rendered by kubectl's own kustomize, and
every object it yields is checked offline against Kubernetes' JSON schemas (strict: an
unknown field is an error). Then the wiring an operator cannot see from one file: FHIR's
notifications reach the instance that runs the module's background work (the first of
SYNAPSE_WORKERS, or the main process), every worker in that list has its Deployment, port and
Service, every Secret and ConfigMap a pod reads exists with the keys it reads, every container
is sized and probed, no image floats, and a FHIR outage restarts nothing. kubectl missing is
a failure that says how to get it, never a skip (the test extra installs one into .venv). No
cluster runs here.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from devstack.tools import ToolNotInstalled, find_tool
from synapse_fhir_module.sync.subscriptions import NOTIFY_PATH
from synapse_fhir_module.web.health import HEALTH_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes release still widely run, and the newest kubectl here talks to.
K8S_VERSIONS = ("1.30.0", "1.33.0")
# The config generator's (sfm-generate-config) defaults: worker i (0-based, SYNAPSE_WORKERS
# order) serves clients on 8083 + i and metrics on SYNAPSE_METRICS_PORT + 1 + i; the main
# process serves replication on 9093, reached at the host SYNAPSE_MAIN_HOST ("synapse").
FIRST_WORKER_PORT = 8083
REPLICATION_PORT = 9093
MAIN_HOST = "synapse"
# Secrets the generator makes up when they are not given: every pod generates its own
# config, so each must come from a Secret, or the pods would disagree.
SYNAPSE_SECRETS = (
    "SYNAPSE_MACAROON_SECRET_KEY",
    "SYNAPSE_FORM_SECRET",
    "SYNAPSE_REGISTRATION_SHARED_SECRET",
    "SYNAPSE_WORKER_REPLICATION_SECRET",
)
PINNED_IMAGES = {"synapse-fhir": "0.1.0", "synapse-fhir-hapi": "0.1.0"}
# Made by the cluster's certificate tooling (cert-manager) or by the operator, never here.
TLS_SECRETS = {"synapse-tls"}
IN_CLUSTER_POSTGRES = "  # - ../../components/in-cluster-postgres"


def kubectl() -> str:
    """kubectl with a kustomize of v5 or newer: the project's own (``make setup`` puts it into
    .venv/bin, devstack/tools.py), else one on PATH. Missing or too old fails the test, saying
    how to get one."""
    try:
        path = find_tool("kubectl")
    except ToolNotInstalled as missing:
        pytest.fail(str(missing), pytrace=False)
    version = subprocess.run(
        [path, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60
    )
    kustomize = json.loads(version.stdout or "{}").get("kustomizeVersion", "")
    major = kustomize.removeprefix("v").split(".")[0]
    if not major.isdigit() or int(major) < 5:
        pytest.fail(
            f"{path} embeds kustomize {kustomize or '(none reported)'}; deploy/k8s needs v5 "
            "or newer (kubectl 1.27+; Debian bookworm's kubernetes-client 1.20 is too old). "
            "`make setup` installs one into .venv.",
            pytrace=False,
        )
    return path


@dataclass
class Rendered:
    """One overlay as ``kubectl kustomize`` renders it."""

    overlay: str
    in_cluster_postgres: bool
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) <= 1, f"two {kind}s named {name}"
        return found[0] if found else None

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def synapse_deployments(self) -> list[dict[str, Any]]:
        return [
            d
            for d in self.of_kind("Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/name") == "synapse"
        ]

    def synapse_env(self) -> dict[str, str]:
        """The settings every Synapse instance's config is generated from (one ConfigMap)."""
        names = {
            ref["configMapRef"]["name"]
            for d in self.synapse_deployments()
            for ref in container(d, "config", init=True)["envFrom"]
            if "configMapRef" in ref
        }
        assert len(names) == 1, f"Synapse instances generate their config from {names}"
        config_map = self.named("ConfigMap", names.pop())
        assert config_map is not None
        return config_map["data"]

    def workers(self) -> list[str]:
        value = self.synapse_env().get("SYNAPSE_WORKERS", "")
        return [name.strip() for name in value.split(",") if name.strip()]

    def secret(self, name: str) -> dict[str, str]:
        """A Secret's values, decoded, by the name it was generated from."""
        found = [
            s for s in self.of_kind("Secret") if s["metadata"]["name"].rsplit("-", 1)[0] == name
        ]
        assert len(found) == 1, f"Secret {name}: {len(found)} found"
        return {k: base64.b64decode(v).decode() for k, v in found[0]["data"].items()}

    def services_selecting(self, workload: dict[str, Any]) -> list[dict[str, Any]]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        return [
            s
            for s in self.of_kind("Service")
            if s["spec"].get("selector")
            and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
        ]

    def workloads_selected_by(self, service: dict[str, Any]) -> list[dict[str, Any]]:
        selector = service["spec"]["selector"]
        return [
            w
            for w in self.workloads()
            if all(
                w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
            )
        ]


def render(overlay_dir: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay_dir} failed:\n{result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def with_in_cluster_postgres(tree: Path, overlay: str) -> Path:
    """A copy of deploy/k8s with the overlay's in-cluster PostgreSQL line uncommented, as
    the overlay's comment tells an operator to do."""
    copy = tree / "k8s"
    if not copy.exists():
        shutil.copytree(DEPLOY, copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    assert IN_CLUSTER_POSTGRES in text, f"{overlay}: no commented in-cluster PostgreSQL line"
    kustomization.write_text(
        text.replace(IN_CLUSTER_POSTGRES, IN_CLUSTER_POSTGRES.replace("# ", ""))
    )
    return copy / "overlays" / overlay


LAYOUTS = [
    pytest.param(("single", False), id="single"),
    pytest.param(("workers", False), id="workers"),
    pytest.param(("single", True), id="single+in-cluster-postgres"),
    pytest.param(("workers", True), id="workers+in-cluster-postgres"),
]


@pytest.fixture(scope="module", params=LAYOUTS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    overlay, postgres = request.param
    directory = DEPLOY / "overlays" / overlay
    if postgres:
        directory = with_in_cluster_postgres(tmp_path_factory.mktemp(overlay), overlay)
    return Rendered(overlay, postgres, render(directory))


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    """Every container of a workload, and whether it is an init container."""
    spec = pod_spec(workload)
    for c in spec.get("initContainers", []):
        yield c, True
    for c in spec["containers"]:
        yield c, False


def container(workload: dict[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    found = [c for c, is_init in containers(workload) if c["name"] == name and is_init == init]
    assert len(found) == 1, f"{workload['metadata']['name']}: container {name}"
    return found[0]


def port_number(c: dict[str, Any], name: str) -> int:
    found = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == name]
    assert len(found) == 1, f"container {c['name']}: port {name!r}"
    return found[0]


def instance_of(deployment: dict[str, Any]) -> str:
    """``main``, or the worker name a Synapse Deployment's command runs."""
    command = container(deployment, "synapse")["command"]
    if "synapse.app.homeserver" in command:
        return "main"
    assert "synapse.app.generic_worker" in command, command
    worker_configs = [a for a in command if a.startswith("/data/workers/")]
    assert len(worker_configs) == 1, command
    return worker_configs[0].removeprefix("/data/workers/").removesuffix(".yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(
    rendered: Rendered, version: str
) -> None:
    errors = []
    for obj in rendered.objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
    assert not errors, "\n".join(errors)
    assert {o["kind"] for o in rendered.objects} >= {
        "Deployment",
        "Service",
        "Ingress",
        "Secret",
        "ConfigMap",
    }


def test_every_container_has_requests_limits_and_probes(rendered: Rendered) -> None:
    for workload in rendered.workloads():
        for c, is_init in containers(workload):
            where = f"{workload['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            for bound in ("requests", "limits"):
                assert set(resources.get(bound, {})) >= {"cpu", "memory"}, f"{where}: {bound}"
            if not is_init:
                assert "readinessProbe" in c, f"{where}: no readiness probe"
                assert "livenessProbe" in c, f"{where}: no liveness probe"


def test_images_are_pinned_never_latest(rendered: Rendered) -> None:
    for workload in rendered.workloads():
        for c, _ in containers(workload):
            name, _, tag = c["image"].rpartition(":")
            assert name and "/" not in tag, f"{c['image']}: no tag"
            assert tag != "latest", c["image"]
            if name in PINNED_IMAGES:
                assert tag == PINNED_IMAGES[name], c["image"]
    used = {c["image"] for w in rendered.workloads() for c, _ in containers(w)}
    assert {f"{n}:{t}" for n, t in PINNED_IMAGES.items()} <= used


def test_every_secret_and_config_map_a_pod_reads_exists_with_its_keys(rendered: Rendered) -> None:
    def data_of(kind: str, name: str) -> dict[str, Any]:
        obj = rendered.named(kind, name)
        assert obj is not None, f"{kind} {name} is referenced but not rendered"
        return obj.get("data", {})

    for workload in rendered.workloads():
        for c, _ in containers(workload):
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    data_of("Secret", ref["secretRef"]["name"])
                if "configMapRef" in ref:
                    data_of("ConfigMap", ref["configMapRef"]["name"])
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["key"] in data_of("Secret", ref["name"]), ref
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in data_of("ConfigMap", ref["name"]), ref
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                data_of("Secret", volume["secret"]["secretName"])
            if "configMap" in volume:
                data_of("ConfigMap", volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims or rendered.named("PersistentVolumeClaim", claim), claim
    (ingress,) = rendered.of_kind("Ingress")
    assert {t["secretName"] for t in ingress["spec"].get("tls", [])} == TLS_SECRETS


def test_probes_do_not_restart_synapse_while_fhir_is_down(rendered: Rendered) -> None:
    """Liveness on Synapse's own /health; readiness on the module's health, which answers
    200 ("degraded") while FHIR is unreachable (tests/integration/test_fhir_outage.py)."""
    for deployment in rendered.synapse_deployments():
        synapse = container(deployment, "synapse")
        assert synapse["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert synapse["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert synapse["readinessProbe"]["httpGet"] == {"path": HEALTH_PATH, "port": "http"}


def test_notify_reaches_the_module_background_instance(rendered: Rendered) -> None:
    """The Ingress path and the shim's SYNAPSE_NOTIFY_URL both land on the instance named
    first in SYNAPSE_WORKERS (``workers``), or on the main process (``single``)."""
    workers = rendered.workers()
    background = workers[0] if workers else "main"
    assert background == ("background" if rendered.overlay == "workers" else "main")

    (ingress,) = rendered.of_kind("Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    notify = [p for p in paths if p["path"] == NOTIFY_PATH]
    assert len(notify) == 1, notify
    # Prefix: a rest-hook Subscription appends /<type>/<id> to the endpoint.
    assert notify[0]["pathType"] == "Prefix"
    backend = notify[0]["backend"]["service"]
    service = rendered.named("Service", backend["name"])
    assert service is not None, backend
    (target,) = rendered.workloads_selected_by(service)
    assert instance_of(target) == background

    (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    assert service_port["targetPort"] == "http"
    assert port_number(container(target, "synapse"), "http") == (
        FIRST_WORKER_PORT if workers else 8008
    )

    hapi = rendered.named("Deployment", "hapi")
    assert hapi is not None
    hapi_env_names = [
        ref["configMapRef"]["name"]
        for ref in container(hapi, "hapi")["envFrom"]
        if "configMapRef" in ref
    ]
    (hapi_env,) = [rendered.named("ConfigMap", n) for n in hapi_env_names]
    assert hapi_env is not None
    url = urlsplit(hapi_env["data"]["SYNAPSE_NOTIFY_URL"])
    assert (url.hostname, url.port, url.path) == (
        service["metadata"]["name"],
        service_port["port"],
        NOTIFY_PATH,
    )


def test_worker_list_matches_the_deployments_services_and_ports(rendered: Rendered) -> None:
    workers = rendered.workers()
    deployments = {instance_of(d): d for d in rendered.synapse_deployments()}
    assert len(deployments) == len(rendered.synapse_deployments()), "an instance runs twice"
    assert sorted(deployments) == sorted(["main", *workers])

    for index, name in enumerate(workers):
        deployment = deployments[name]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["synapse-fhir/worker"] == name
        assert labels["app.kubernetes.io/component"] == "worker"
        assert port_number(container(deployment, "synapse"), "http") == FIRST_WORKER_PORT + index
        services = [
            s
            for s in rendered.services_selecting(deployment)
            if s["metadata"]["name"] != "synapse-metrics"
        ]
        assert [s["metadata"]["name"] for s in services] == [f"synapse-{name}"]

    env = rendered.synapse_env()
    metrics = int(env["SYNAPSE_METRICS_PORT"])
    assert port_number(container(deployments["main"], "synapse"), "metrics") == metrics
    for index, name in enumerate(workers):
        assert port_number(container(deployments[name], "synapse"), "metrics") == (
            metrics + 1 + index
        )

    # Workers reach the main process over HTTP replication through its Service.
    main_service = rendered.named("Service", env.get("SYNAPSE_MAIN_HOST", MAIN_HOST))
    assert main_service is not None
    assert rendered.workloads_selected_by(main_service) == [deployments["main"]]
    (replication,) = [p for p in main_service["spec"]["ports"] if p["name"] == "replication"]
    replication_port = int(env.get("SYNAPSE_REPLICATION_PORT", REPLICATION_PORT))
    assert replication["port"] == replication_port
    main_synapse = container(deployments["main"], "synapse")
    assert port_number(main_synapse, "replication") == replication_port

    if workers:
        redis = rendered.named("Service", env["REDIS_HOST"])
        assert redis is not None, env["REDIS_HOST"]
        assert int(env["REDIS_PORT"]) in [p["port"] for p in redis["spec"]["ports"]]
        assert len(rendered.workloads_selected_by(redis)) == 1
    else:
        assert "REDIS_HOST" not in env
        assert rendered.named("Deployment", "redis") is None


def test_each_synapse_instance_runs_in_one_pod_at_a_time(rendered: Rendered) -> None:
    """An instance name is unique to one process: never two pods of it, not even while a
    rollout replaces one."""
    for deployment in rendered.synapse_deployments():
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_every_service_port_reaches_a_named_container_port(rendered: Rendered) -> None:
    for service in rendered.of_kind("Service"):
        selected = rendered.workloads_selected_by(service)
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for workload in selected:
                names = {
                    p["name"]
                    for c, init in containers(workload)
                    if not init
                    for p in c.get("ports", [])
                }
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_database_is_external_unless_the_component_is_on(rendered: Rendered) -> None:
    synapse_db = rendered.secret("synapse-database")
    hapi_db = urlsplit(
        rendered.secret("hapi-database")["SPRING_DATASOURCE_URL"].removeprefix("jdbc:")
    )
    postgres = rendered.named("StatefulSet", "postgres")
    if rendered.in_cluster_postgres:
        assert postgres is not None
        service = rendered.named("Service", synapse_db["POSTGRES_HOST"])
        assert service is not None
        assert rendered.workloads_selected_by(service) == [postgres]
        assert (hapi_db.hostname, hapi_db.port) == (synapse_db["POSTGRES_HOST"], 5432)
    else:
        assert postgres is None
        assert synapse_db["POSTGRES_HOST"] == hapi_db.hostname == "postgres.example.internal"


def test_every_pod_gets_the_same_secrets_and_signing_key(rendered: Rendered) -> None:
    """Each Synapse pod generates its own config: what the generator would otherwise make up
    (secrets, the signing key) must come from the Secrets, the same for every pod."""
    env_sources: set[tuple[str, str]] = set()
    for deployment in rendered.synapse_deployments():
        config = container(deployment, "config", init=True)
        sources = tuple(sorted(next(iter(ref.values()))["name"] for ref in config["envFrom"]))
        env_sources.add(sources)
        provided: dict[str, str] = {}
        for ref in config["envFrom"]:
            kind = "Secret" if "secretRef" in ref else "ConfigMap"
            obj = rendered.named(kind, next(iter(ref.values()))["name"])
            assert obj is not None
            provided.update(obj["data"])
        assert set(SYNAPSE_SECRETS) <= set(provided), deployment["metadata"]["name"]

        key_path = Path(rendered.synapse_env()["SYNAPSE_SIGNING_KEY_PATH"])
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        for c in (config, container(deployment, "synapse")):
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(key_path.parent)]
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert secret.startswith("synapse-signing-key-")
            key_secret = rendered.named("Secret", secret)
            assert key_secret is not None
            assert key_path.name in key_secret["data"]
    assert len(env_sources) == 1, env_sources


def config_script(rendered: Rendered, data: Path) -> str:
    main = rendered.named("Deployment", "synapse-main")
    assert main is not None
    command = container(main, "config", init=True)["command"]
    assert command[:2] == ["sh", "-ec"]
    return command[2].replace("/data", str(data))


def run_config_script(
    script: str, env: dict[str, str], bin_dir: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-ec", script],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_config_init_refuses_placeholders_then_generates_with_the_signing_key(
    tmp_path: Path,
) -> None:
    """The init container's script, run here with sh: while a Secret still says change-me it
    stops with the setting's name, before the generator runs; with real values it runs the
    generator over /data."""
    rendered = Rendered("single", False, render(DEPLOY / "overlays" / "single"))
    data, secrets, bin_dir = tmp_path / "data", tmp_path / "secrets", tmp_path / "bin"
    for d in (data, secrets, bin_dir):
        d.mkdir()
    calls = tmp_path / "calls"
    generator = bin_dir / "sfm-generate-config"
    generator.write_text(f'#!/bin/sh\necho "$@" > {calls}\n')
    generator.chmod(0o755)
    script = config_script(rendered, data)

    env = {
        **rendered.synapse_env(),
        **rendered.secret("synapse-secrets"),
        **rendered.secret("fhir-webhook"),
        **rendered.secret("synapse-database"),
        "SYNAPSE_SIGNING_KEY_PATH": str(secrets / "signing.key"),
    }
    (secrets / "signing.key").write_text(rendered.secret("synapse-signing-key")["signing.key"])
    refused = run_config_script(script, env, bin_dir)
    assert refused.returncode == 1
    assert "SYNAPSE_MACAROON_SECRET_KEY is still change-me" in refused.stderr
    assert not calls.exists()

    env = {k: ("s3cret" if v == "change-me" else v) for k, v in env.items()}
    refused = run_config_script(script, env, bin_dir)
    assert refused.returncode == 1
    assert "signing key is still change-me" in refused.stderr

    key = "ed25519 a_test 1n6iE1N0q3yIA8cG2yC3T6xK1n3Jf6u7cG2yC3T6xK0\n"
    (secrets / "signing.key").write_text(key)
    done = run_config_script(script, env, bin_dir)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["--out", str(data), "--overwrite"]


def test_a_site_overlay_replaces_every_placeholder_as_documented(tmp_path: Path) -> None:
    """The site overlay of docs/kubernetes.md ("Before you apply", step 3), beside a copy of
    the repository: its Secrets replace every change-me and its image names apply."""
    shutil.copytree(DEPLOY, tmp_path / "synapse-fhir-module" / "deploy" / "k8s")
    site = tmp_path / "my-site"
    site.mkdir()
    docs = (DEPLOY.parents[1] / "docs" / "kubernetes.md").read_text()
    start = docs.index("# my-site/kustomization.yaml\n")
    (site / "kustomization.yaml").write_text(docs[start : docs.index("```", start)])
    for name in ("synapse.env", "webhook.env", "synapse-database.env", "hapi-database.env"):
        placeholder = (DEPLOY / "base" / "secrets" / name).read_text()
        (site / name).write_text(placeholder.replace("change-me", f"site-{name}"))
    (site / "signing.key").write_text("ed25519 a_site c2l0ZS1rZXk\n")

    rendered = Rendered("workers", False, render(site))

    for secret in rendered.of_kind("Secret"):
        for key, value in secret["data"].items():
            decoded = base64.b64decode(value).decode()
            assert "change-me" not in decoded, (secret["metadata"]["name"], key)
    assert rendered.secret("synapse-signing-key")["signing.key"].startswith("ed25519 a_site")
    images = {c["image"] for w in rendered.workloads() for c, _ in containers(w)}
    assert "registry.example.org/synapse-fhir:0.1.0" in images
    assert "registry.example.org/synapse-fhir-hapi:0.1.0" in images
    assert not {i for i in images if i.startswith("synapse-fhir")}
    # The pods read the replaced Secrets (by their new hashed names).
    test_every_secret_and_config_map_a_pod_reads_exists_with_its_keys(rendered)
    test_every_pod_gets_the_same_secrets_and_signing_key(rendered)


GENERATOR = DEPLOY.parents[1] / "docker" / "generate_config.py"


@pytest.mark.parametrize("overlay", ["single", "workers"])
def test_the_real_generator_listens_where_the_manifests_expect(
    overlay: str, tmp_path: Path
) -> None:
    """The init container's ``sfm-generate-config``, run here on the rendered settings and
    Secrets: every Synapse pod's container ports are the listeners its generated config opens,
    the module's background instance is the worker the Ingress sends ``/notify`` to, and
    HAPI's notify URL reaches that instance's client listener."""
    rendered = Rendered(overlay, False, render(DEPLOY / "overlays" / overlay))
    key = tmp_path / "signing.key"
    key.write_text("ed25519 a_test 1n6iE1N0q3yIA8cG2yC3T6xK1n3Jf6u7cG2yC3T6xK0\n")
    settings = {
        **rendered.synapse_env(),
        **rendered.secret("synapse-secrets"),
        **rendered.secret("fhir-webhook"),
        **rendered.secret("synapse-database"),
        "SYNAPSE_SIGNING_KEY_PATH": str(key),
    }
    # (As a site fills them in: the generator refuses change-me.)
    settings = {
        k: f"site-value-{k.lower()}" if v == "change-me" else v for k, v in settings.items()
    }
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(data), "--overwrite"],
        env={"PATH": os.environ["PATH"], **settings},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    main = yaml.safe_load((data / "homeserver.yaml").read_text())
    background = "main"
    for deployment in rendered.synapse_deployments():
        instance = instance_of(deployment)
        config = main
        if instance != "main":
            config = yaml.safe_load((data / "workers" / f"{instance}.yaml").read_text())
        opened = {
            (
                "metrics" if listener["type"] == "metrics" else listener["resources"][0]["names"][0]
            ): listener["port"]
            for listener in config.get("listeners") or config.get("worker_listeners")
        }
        synapse = container(deployment, "synapse")
        expected = {
            "client": port_number(synapse, "http"),
            "metrics": port_number(synapse, "metrics"),
        }
        if instance == "main" and overlay == "workers":
            expected["replication"] = port_number(synapse, "replication")
        assert opened == expected, f"{instance}: config opens {opened}, pod exposes {expected}"

    (module,) = [m for m in main["modules"] if m["module"] == "synapse_fhir_module.FhirModule"]
    if overlay == "workers":
        background = module["config"]["worker"]
        assert background == rendered.workers()[0]
    else:
        assert module["config"].get("worker") is None
    notify = urlsplit(
        rendered.named("ConfigMap", _hapi_env_name(rendered))["data"]["SYNAPSE_NOTIFY_URL"]
    )
    target = f"synapse-{background}" if overlay == "workers" else "synapse"
    assert notify.hostname == target
    service = rendered.named("Service", target)
    assert service is not None
    (deployment,) = rendered.workloads_selected_by(service)
    assert instance_of(deployment) == background
    assert notify.port == port_number(container(deployment, "synapse"), "http")


def _hapi_env_name(rendered: Rendered) -> str:
    (name,) = [
        c["metadata"]["name"]
        for c in rendered.of_kind("ConfigMap")
        if "SYNAPSE_NOTIFY_URL" in c.get("data", {})
    ]
    return name
