"""The Kubernetes manifests (``deploy/k8s``, docs/kubernetes.md), as an operator applies them.

Each overlay — ``single`` and ``workers``, each also with the in-cluster PostgreSQL component
switched on the way the overlay's comment says — is rendered by kubectl's own kustomize, and
every object it yields is checked offline against Kubernetes' JSON schemas (strict: an
unknown field is an error). Then the wiring an operator cannot see from one file: FHIR's
notifications reach the instance that runs the module's background work (the first of
SYNAPSE_WORKERS, or the main process), every worker in that list has its Deployment, port and
Service, every Secret and ConfigMap a pod reads exists with the keys it reads, every container
is sized and probed, no image floats, and a FHIR outage restarts nothing. Then the security
properties: who NetworkPolicy lets reach which port (evaluated with the networking.k8s.io/v1
rules), which paths the Ingress routes (the module's health and admin API never; /notify
only with components/public-notify), the init containers' refusal of placeholder, empty and
missing secrets (their scripts run with sh), Redis's password, PostgreSQL's roles, no
service account tokens, and no real secrets in tracked files. kubectl missing is
a failure that says how to get it, never a skip (the test extra installs one into .venv). No
cluster runs here.
"""

from __future__ import annotations

import base64
import json
import os
import re
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
import synapse
import yaml

from devstack.tools import ToolNotInstalled, find_tool
from synapse_fhir_module.sync.subscriptions import NOTIFY_PATH
from synapse_fhir_module.web.admin.console import API_PATH, CONSOLE_PATH
from synapse_fhir_module.web.dead_letters import DEAD_LETTERS_PATH, RETRY_PATH
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
PUBLIC_NOTIFY = "  # - ../../components/public-notify"


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
    public_notify: bool = False

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


def with_components(tree: Path, overlay: str, *lines: str) -> Path:
    """A copy of deploy/k8s with the overlay's commented component lines uncommented, as the
    overlay's comments tell an operator to do."""
    copy = tree / "k8s"
    if not copy.exists():
        shutil.copytree(DEPLOY, copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    for line in lines:
        assert line in text, f"{overlay}: no line {line.strip()!r}"
        text = text.replace(line, line.replace("# ", ""))
    kustomization.write_text(text)
    return copy / "overlays" / overlay


LAYOUTS = [
    pytest.param(("single", False, False), id="single"),
    pytest.param(("workers", False, False), id="workers"),
    pytest.param(("single", True, False), id="single+in-cluster-postgres"),
    pytest.param(("workers", True, False), id="workers+in-cluster-postgres"),
    pytest.param(("single", False, True), id="single+public-notify"),
    pytest.param(("workers", False, True), id="workers+public-notify"),
]


def render_layout(tree: Path, overlay: str, postgres: bool, public_notify: bool) -> Rendered:
    lines = [IN_CLUSTER_POSTGRES] * postgres + [PUBLIC_NOTIFY] * public_notify
    directory = DEPLOY / "overlays" / overlay
    if lines:
        directory = with_components(tree, overlay, *lines)
    return Rendered(overlay, postgres, render(directory), public_notify)


@pytest.fixture(scope="module", params=LAYOUTS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    overlay, postgres, public_notify = request.param
    return render_layout(tmp_path_factory.mktemp(overlay), overlay, postgres, public_notify)


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
                    if ref.get("optional") and ref["key"] not in data_of("Secret", ref["name"]):
                        continue  # the operator's to fill in (fhir-client)
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


def ingress_route(rendered: Rendered, path: str) -> dict[str, Any] | None:
    """The Ingress path that would serve a request for ``path``, by the Ingress API's rules:
    an Exact match wins, else the longest Prefix that matches whole path elements; None when
    no rule routes it (the controller answers 404 itself)."""
    paths = [
        p
        for ingress in rendered.of_kind("Ingress")
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]
    exact = [p for p in paths if p["pathType"] == "Exact" and p["path"] == path]
    if exact:
        return exact[0]

    def covers(prefix: str) -> bool:
        prefix = prefix.rstrip("/")
        return path == prefix or path.startswith(prefix + "/")

    prefixes = [p for p in paths if p["pathType"] == "Prefix" and covers(p["path"])]
    return max(prefixes, key=lambda p: len(p["path"]), default=None)


def test_notify_reaches_the_module_background_instance(rendered: Rendered) -> None:
    """The shim's SYNAPSE_NOTIFY_URL lands on the instance named first in SYNAPSE_WORKERS
    (``workers``), or on the main process (``single``); so does the public route, which exists
    only with components/public-notify."""
    workers = rendered.workers()
    background = workers[0] if workers else "main"
    assert background == ("background" if rendered.overlay == "workers" else "main")

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
    assert url.path == NOTIFY_PATH
    service = rendered.named("Service", url.hostname or "")
    assert service is not None, url
    (target,) = rendered.workloads_selected_by(service)
    assert instance_of(target) == background
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    assert service_port["targetPort"] == "http"
    assert port_number(container(target, "synapse"), "http") == (
        FIRST_WORKER_PORT if workers else 8008
    )

    # A rest-hook Subscription appends /<type>/<id> to the endpoint.
    for path in (NOTIFY_PATH, f"{NOTIFY_PATH}/Communication/1"):
        route = ingress_route(rendered, path)
        if not rendered.public_notify:
            assert route is None, f"{path} is public without components/public-notify"
            continue
        assert route is not None, path
        assert route["pathType"] == "Prefix"
        backend = route["backend"]["service"]
        public = rendered.named("Service", backend["name"])
        assert public is not None, backend
        assert rendered.workloads_selected_by(public) == [target]
        (port,) = [p for p in public["spec"]["ports"] if p["name"] == backend["port"]["name"]]
        assert port["targetPort"] == "http"


SYNAPSE_SOURCES = Path(synapse.__file__).parent
SYNAPSE_CLIENT_PAGE = re.compile(r'"(/_synapse/client/[a-z0-9_/]+)"')


def test_ingress_routes_synapse_pages_but_not_the_module_health_or_admin_api(
    rendered: Rendered,
) -> None:
    """Every page Synapse itself serves under /_synapse/client (read from the installed
    Synapse's sources) reaches Synapse; the module's health (counts, FHIR reachability) and
    its dead-letter API are not routed at all."""
    pages = {
        match.group(1)
        for source in [
            *(SYNAPSE_SOURCES / "rest" / "synapse" / "client").glob("*.py"),
            SYNAPSE_SOURCES / "app" / "homeserver.py",
        ]
        for match in SYNAPSE_CLIENT_PAGE.finditer(source.read_text())
    }
    assert {
        "/_synapse/client/pick_idp",
        "/_synapse/client/password_reset/email/submit_token",
    } <= pages
    for page in sorted(pages):
        route = ingress_route(rendered, page)
        assert route is not None, f"{page} is not routed"
        assert route["backend"]["service"]["name"] == "synapse", page
    assert ingress_route(rendered, "/_matrix/client/v3/login") is not None
    console = (f"{CONSOLE_PATH}/", f"{API_PATH}/health", f"{API_PATH}/dead-letters/retry")
    for private in (
        HEALTH_PATH,
        DEAD_LETTERS_PATH,
        RETRY_PATH,
        *console,
        "/_synapse/admin/v1/users",
    ):
        assert ingress_route(rendered, private) is None, f"{private} is public"


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
            # (and the public /notify route's Service, components/public-notify)
            if s["metadata"]["name"] not in ("synapse-metrics", "synapse-notify")
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


def container_env(rendered: Rendered, c: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet builds it from the rendered objects: envFrom
    first, then env (an optional key of a missing Secret is left out)."""

    def data_of(kind: str, name: str) -> dict[str, str]:
        obj = rendered.named(kind, name)
        assert obj is not None, f"{kind} {name}"
        data = obj.get("data", {})
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    env: dict[str, str] = {}
    for ref in c.get("envFrom", []):
        if "secretRef" in ref:
            env.update(data_of("Secret", ref["secretRef"]["name"]))
        else:
            env.update(data_of("ConfigMap", ref["configMapRef"]["name"]))
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        kind, ref = (
            ("Secret", source["secretKeyRef"])
            if "secretKeyRef" in source
            else ("ConfigMap", source["configMapKeyRef"])
        )
        values = data_of(kind, ref["name"])
        if ref.get("optional") and ref["key"] not in values:
            continue
        env[entry["name"]] = values[ref["key"]]
    return env


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


GUARDED = (
    "SYNAPSE_MACAROON_SECRET_KEY",
    "SYNAPSE_FORM_SECRET",
    "SYNAPSE_REGISTRATION_SHARED_SECRET",
    "SYNAPSE_WORKER_REPLICATION_SECRET",
    "FHIR_WEBHOOK_SECRET",
    "POSTGRES_PASSWORD",
)


@pytest.mark.parametrize(
    ("overlay", "postgres"),
    [("single", False), ("workers", False), ("single", True), ("workers", True)],
    ids=["single", "workers", "single+in-cluster-postgres", "workers+in-cluster-postgres"],
)
def test_config_init_refuses_placeholders_empty_and_missing_secrets(
    overlay: str, postgres: bool, tmp_path: Path
) -> None:
    """The init container's script, run here with sh in the environment Kubernetes would give
    it: while any secret it guards (with workers also Redis's password, with the in-cluster
    PostgreSQL also HAPI's database password) is change-me, empty or missing, or the signing
    key is the placeholder or empty, it stops naming it, before the generator runs; with real
    values it runs the generator over /data with --require-secrets."""
    rendered = render_layout(tmp_path / "tree", overlay, postgres, False)
    data, secrets, bin_dir = tmp_path / "data", tmp_path / "secrets", tmp_path / "bin"
    for d in (data, secrets, bin_dir):
        d.mkdir()
    calls = tmp_path / "calls"
    generator = bin_dir / "sfm-generate-config"
    generator.write_text(f'#!/bin/sh\necho "$@" > {calls}\n')
    generator.chmod(0o755)
    script = config_script(rendered, data)
    key_path = secrets / "signing.key"
    main = rendered.named("Deployment", "synapse-main")
    assert main is not None
    placeholder_env = {
        **container_env(rendered, container(main, "config", init=True)),
        "SYNAPSE_SIGNING_KEY_PATH": str(key_path),
    }
    guarded = [
        *GUARDED,
        *(["REDIS_PASSWORD"] if overlay == "workers" else []),
        *(["HAPI_DATABASE_PASSWORD"] if postgres else []),
    ]
    assert all(placeholder_env[name] == "change-me" for name in guarded)
    real = {
        k: ("a-long-real-secret-value" if v == "change-me" else v)
        for k, v in placeholder_env.items()
    }
    key_path.write_text("ed25519 a_test 1n6iE1N0q3yIA8cG2yC3T6xK1n3Jf6u7cG2yC3T6xK0\n")

    refused = run_config_script(script, placeholder_env, bin_dir)
    assert refused.returncode == 1
    assert f"{guarded[0]} is still change-me" in refused.stderr
    for name in guarded:
        for value, problem in (
            ("change-me", "is still change-me"),
            ("", "is empty"),
            ("change-me ", "is shorter than 16 characters"),
        ):
            refused = run_config_script(script, {**real, name: value}, bin_dir)
            assert refused.returncode == 1, (name, value)
            assert f"{name} {problem}" in refused.stderr
        if name != "HAPI_DATABASE_PASSWORD":  # checked only where the component passes it in
            missing = {k: v for k, v in real.items() if k != name}
            refused = run_config_script(script, missing, bin_dir)
            assert refused.returncode == 1, name
            assert f"{name} is not set" in refused.stderr
    assert not calls.exists()

    for key in (rendered.secret("synapse-signing-key")["signing.key"], ""):
        key_path.write_text(key)
        refused = run_config_script(script, real, bin_dir)
        assert refused.returncode == 1
        assert "signing key is missing or still change-me" in refused.stderr
    assert not calls.exists()

    key_path.write_text("ed25519 a_test 1n6iE1N0q3yIA8cG2yC3T6xK1n3Jf6u7cG2yC3T6xK0\n")
    done = run_config_script(script, real, bin_dir)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["--out", str(data), "--overwrite", "--require-secrets"]


def test_a_site_overlay_replaces_every_placeholder_as_documented(tmp_path: Path) -> None:
    """The site overlay of docs/kubernetes.md ("Before you apply", step 3), beside a copy of
    the repository: its Secrets replace every change-me and its image names apply."""
    shutil.copytree(DEPLOY, tmp_path / "synapse-fhir-module" / "deploy" / "k8s")
    site = tmp_path / "my-site"
    site.mkdir()
    docs = (DEPLOY.parents[1] / "docs" / "kubernetes.md").read_text()
    start = docs.index("# my-site/kustomization.yaml\n")
    (site / "kustomization.yaml").write_text(docs[start : docs.index("```", start)])
    for placeholder_file in [
        *(DEPLOY / "base" / "secrets").glob("*.env"),
        DEPLOY / "overlays" / "workers" / "secrets" / "redis.env",
    ]:
        name = placeholder_file.name
        placeholder = placeholder_file.read_text()
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
    main_pod = rendered.named("Deployment", "synapse-main")
    assert main_pod is not None
    init = container(main_pod, "config", init=True)
    # The init container's own environment, its placeholders filled in as a site does (the
    # generator refuses change-me), and the arguments its script passes.
    settings = {
        k: f"site-value-{k.lower()}" if v == "change-me" else v
        for k, v in container_env(rendered, init).items()
    }
    settings["SYNAPSE_SIGNING_KEY_PATH"] = str(key)
    data = tmp_path / "data"
    assert "sfm-generate-config --out /data --overwrite --require-secrets" in init["command"][2]
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(data), "--overwrite", "--require-secrets"],
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
        # Only client listeners, which the Ingress controller alone reaches, trust
        # X-Forwarded-For; replication and metrics never do.
        for listener in config.get("listeners") or config.get("worker_listeners"):
            is_client = listener["type"] == "http" and "client" in listener["resources"][0]["names"]
            assert listener.get("x_forwarded", False) is is_client, (instance, listener)

    (module,) = [m for m in main["modules"] if m["module"] == "synapse_fhir_module.FhirModule"]
    if overlay == "workers":
        background = module["config"]["worker"]
        assert background == rendered.workers()[0]
        assert main["redis"]["password"] == settings["REDIS_PASSWORD"]
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


NAMESPACE = "synapse-fhir"
INGRESS_CONTROLLER_NAMESPACE = {"kubernetes.io/metadata.name": "ingress-nginx"}
MONITORING_NAMESPACE = {
    "kubernetes.io/metadata.name": "monitoring",
    "synapse-fhir.org/monitoring": "true",
}
OWN_NAMESPACE = {"kubernetes.io/metadata.name": NAMESPACE}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels; these manifests use no matchExpressions)."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def allowed(
    rendered: Rendered,
    source: tuple[dict[str, str], dict[str, str]],
    target: dict[str, Any],
    port_name: str,
) -> bool:
    """Whether NetworkPolicy (networking.k8s.io/v1 semantics) lets a pod with these labels,
    in a namespace with these labels, open a connection to the named container port of the
    target workload's pods. A pod no Ingress policy selects accepts everything."""
    pod_labels, namespace_labels = source
    labels = target["spec"]["template"]["metadata"]["labels"]
    numbers = {
        p["name"]: p["containerPort"]
        for c, init in containers(target)
        if not init
        for p in c.get("ports", [])
    }
    policies = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(
                p["port"] in (port_name, numbers[port_name]) for p in ports
            ):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert "ipBlock" not in peer, peer
                if "namespaceSelector" in peer:
                    namespace_ok = selects(peer["namespaceSelector"], namespace_labels)
                else:
                    namespace_ok = namespace_labels == OWN_NAMESPACE
                pod_ok = selects(peer.get("podSelector", {}), pod_labels)
                if namespace_ok and pod_ok:
                    return True
    return False


def test_network_policies_let_only_the_intended_pods_in(rendered: Rendered) -> None:
    """Default deny for every pod of the namespace, then: HAPI only from Synapse and pods
    labelled as the operator's FHIR clients; Redis only from Synapse; Synapse's replication
    port only from Synapse; metrics only from the namespace labelled for monitoring;
    PostgreSQL only from Synapse and HAPI; Synapse's client port from the Ingress
    controller's namespace; the notify instance from HAPI."""
    (deny,) = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
    ]
    assert deny["spec"]["policyTypes"] == ["Ingress"]

    def pod(workload: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        return workload["spec"]["template"]["metadata"]["labels"], OWN_NAMESPACE

    synapse_pods = rendered.synapse_deployments()
    main = rendered.named("Deployment", "synapse-main")
    hapi = rendered.named("Deployment", "hapi")
    assert main is not None and hapi is not None
    stranger = ({"app": "anything"}, OWN_NAMESPACE)
    stranger_elsewhere = ({"app": "anything"}, {"kubernetes.io/metadata.name": "other"})
    fhir_client = ({"synapse-fhir.org/fhir-client": "true"}, OWN_NAMESPACE)
    fhir_client_elsewhere = (
        {"synapse-fhir.org/fhir-client": "true"},
        {"kubernetes.io/metadata.name": "other"},
    )
    ingress_controller = ({"app": "controller"}, INGRESS_CONTROLLER_NAMESPACE)
    monitoring = ({"app": "prometheus"}, MONITORING_NAMESPACE)
    strangers = (stranger, stranger_elsewhere, fhir_client_elsewhere)

    # FHIR: whoever writes it decides care-team membership.
    for s in synapse_pods:
        assert allowed(rendered, pod(s), hapi, "http")
    assert allowed(rendered, fhir_client, hapi, "http")
    for other in (*strangers, ingress_controller, monitoring):
        assert not allowed(rendered, other, hapi, "http"), other

    for s in synapse_pods:
        assert allowed(rendered, ingress_controller, s, "http")
        assert allowed(rendered, monitoring, s, "metrics")
        for other in (*strangers, fhir_client, ingress_controller, pod(hapi)):
            assert not allowed(rendered, other, s, "metrics"), other
    for other in (*strangers, fhir_client, monitoring):
        for s in synapse_pods:
            assert not allowed(rendered, other, s, "http"), other
    for s in synapse_pods:
        assert allowed(rendered, pod(s), main, "replication")
    for other in (*strangers, fhir_client, ingress_controller, monitoring, pod(hapi)):
        assert not allowed(rendered, other, main, "replication"), other

    # The shim reaches the instance that takes notifications, and no other Synapse.
    for s in synapse_pods:
        takes_notify = instance_of(s) == (rendered.workers() or ["main"])[0]
        assert allowed(rendered, pod(hapi), s, "http") == takes_notify, instance_of(s)

    redis = rendered.named("Deployment", "redis")
    if redis is not None:
        for s in synapse_pods:
            assert allowed(rendered, pod(s), redis, "redis")
        for other in (*strangers, fhir_client, ingress_controller, monitoring, pod(hapi)):
            assert not allowed(rendered, other, redis, "redis"), other

    postgres = rendered.named("StatefulSet", "postgres")
    assert (postgres is not None) == rendered.in_cluster_postgres
    if postgres is not None:
        for s in [*synapse_pods, hapi]:
            assert allowed(rendered, pod(s), postgres, "postgres")
        for other in (*strangers, fhir_client, ingress_controller, monitoring):
            assert not allowed(rendered, other, postgres, "postgres"), other
    if redis is not None and postgres is not None:
        assert not allowed(rendered, pod(redis), postgres, "postgres")


def test_no_pod_mounts_a_service_account_token(rendered: Rendered) -> None:
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]


def test_synapse_can_be_given_a_fhir_bearer_token(tmp_path: Path) -> None:
    """An optional key of the Secret fhir-client (empty in the base): absent, every pod still
    starts; set by a site overlay replacing that Secret, it reaches the init container (by the
    Secret's new hashed name) and the real generator writes it into the module's
    fhir.auth.bearer_token."""
    rendered = Rendered("workers", False, render(DEPLOY / "overlays" / "workers"))
    for deployment in rendered.synapse_deployments():
        assert "FHIR_BEARER_TOKEN" not in container_env(
            rendered, container(deployment, "config", init=True)
        )
        (entry,) = [
            e
            for e in container(deployment, "config", init=True).get("env", [])
            if e["name"] == "FHIR_BEARER_TOKEN"
        ]
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"].startswith("fhir-client-")
        assert {k: v for k, v in ref.items() if k != "name"} == {
            "key": "FHIR_BEARER_TOKEN",
            "optional": True,
        }

    shutil.copytree(DEPLOY, tmp_path / "repo" / "deploy" / "k8s")
    site = tmp_path / "site"
    site.mkdir()
    (site / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../repo/deploy/k8s/overlays/single"],
                "secretGenerator": [
                    {
                        "name": "fhir-client",
                        "behavior": "replace",
                        "literals": ["FHIR_BEARER_TOKEN=token-for-fhir"],
                    }
                ],
            }
        )
    )
    site_rendered = Rendered("single", False, render(site))
    main = site_rendered.named("Deployment", "synapse-main")
    assert main is not None
    env = container_env(site_rendered, container(main, "config", init=True))
    assert env["FHIR_BEARER_TOKEN"] == "token-for-fhir"
    env = {k: f"site-value-{k.lower()}" if v == "change-me" else v for k, v in env.items()}
    key = tmp_path / "signing.key"
    key.write_text("ed25519 a_test 1n6iE1N0q3yIA8cG2yC3T6xK1n3Jf6u7cG2yC3T6xK0\n")
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(data), "--overwrite", "--require-secrets"],
        env={"PATH": os.environ["PATH"], **env, "SYNAPSE_SIGNING_KEY_PATH": str(key)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((data / "homeserver.yaml").read_text())
    (module,) = [m for m in config["modules"] if m["module"] == "synapse_fhir_module.FhirModule"]
    assert module["config"]["fhir"]["auth"] == {"bearer_token": "token-for-fhir"}


def test_redis_requires_the_password_synapse_is_given() -> None:
    """Redis runs with --requirepass from the Secret redis, its probes authenticate with the
    same value and accept only PONG, and every Synapse instance's generator gets it."""
    rendered = Rendered("workers", False, render(DEPLOY / "overlays" / "workers"))
    redis = rendered.named("Deployment", "redis")
    assert redis is not None
    c = container(redis, "redis")
    env = container_env(rendered, c)
    password = rendered.secret("redis")["REDIS_PASSWORD"]
    # Kubernetes expands $(NAME) in args from the container's env.
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    assert args[args.index("--requirepass") + 1] == password
    assert env["REDISCLI_AUTH"] == password
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"] == ["sh", "-c", "redis-cli ping | grep -qx PONG"]
    for deployment in rendered.synapse_deployments():
        init_env = container_env(rendered, container(deployment, "config", init=True))
        assert init_env["REDIS_PASSWORD"] == password, deployment["metadata"]["name"]


def test_in_cluster_postgres_keeps_the_superuser_apart(tmp_path: Path) -> None:
    """The superuser is `postgres` with its own Secret; Synapse's role (and HAPI's) is created
    by the init script as an ordinary role owning its database; the container runs with a
    read-only root file system, writable only where PostgreSQL writes."""
    rendered = render_layout(tmp_path, "workers", True, False)
    postgres = rendered.named("StatefulSet", "postgres")
    assert postgres is not None
    c = container(postgres, "postgres")
    env = container_env(rendered, c)
    synapse_db = rendered.secret("synapse-database")
    assert env["POSTGRES_USER"] == "postgres" != synapse_db["POSTGRES_USER"]
    (password,) = [e for e in c["env"] if e["name"] == "POSTGRES_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["name"].startswith("postgres-superuser-")
    assert "POSTGRES_SUPERUSER_PASSWORD" in rendered.secret("postgres-superuser")
    assert (env["SYNAPSE_DB_USER"], env["SYNAPSE_DB_NAME"]) == (
        synapse_db["POSTGRES_USER"],
        synapse_db["POSTGRES_DB"],
    )
    (init,) = [v for v in pod_spec(postgres)["volumes"] if v["name"] == "init"]
    init_map = rendered.named("ConfigMap", init["configMap"]["name"])
    assert init_map is not None
    sql = " ".join(init_map["data"]["create-databases.sh"].split())
    assert (
        'CREATE ROLE :"synapse_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
        "PASSWORD :'synapse_password';" in sql
    )
    assert 'CREATE DATABASE :"synapse_db" OWNER :"synapse_user" TEMPLATE template0' in sql
    assert "LC_COLLATE 'C' LC_CTYPE 'C'" in sql
    assert 'CREATE ROLE :"hapi_user" LOGIN NOSUPERUSER' in sql

    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod_spec(postgres)["volumes"]}
    writable = {
        m["mountPath"]
        for m in c["volumeMounts"]
        if not m.get("readOnly") and "emptyDir" in volumes.get(m["name"], {})
    }
    assert writable == {"/var/run/postgresql", "/tmp"}
    data_mount = [m for m in c["volumeMounts"] if m["name"] == "data"]
    assert data_mount[0]["mountPath"] == "/var/lib/postgresql/data"


def test_postgres_refuses_placeholder_passwords(tmp_path: Path) -> None:
    """The PostgreSQL container's own guard, run with sh before the image's entrypoint (a
    stand-in here): a change-me or empty password for the superuser, Synapse or HAPI stops
    it, naming which; real ones hand over to the entrypoint."""
    rendered = render_layout(tmp_path / "tree", "single", True, False)
    postgres = rendered.named("StatefulSet", "postgres")
    assert postgres is not None
    c = container(postgres, "postgres")
    assert c["command"][:2] == ["sh", "-ec"]
    env = container_env(rendered, c)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    entrypoint = bin_dir / "docker-entrypoint.sh"
    entrypoint.write_text(f'#!/bin/sh\necho "$@" > {calls}\n')
    entrypoint.chmod(0o755)
    real = {k: ("a-long-real-secret-value" if v == "change-me" else v) for k, v in env.items()}
    for name in ("POSTGRES_PASSWORD", "SYNAPSE_DB_PASSWORD", "HAPI_DB_PASSWORD"):
        assert env[name] == "change-me"
        for value in ("change-me", "", "short-password"):
            refused = run_config_script(c["command"][2], {**real, name: value}, bin_dir)
            assert refused.returncode == 1
            assert f"{name} is empty, still change-me or shorter than 16" in refused.stderr
    assert not calls.exists()
    done = run_config_script(c["command"][2], real, bin_dir)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["postgres"]


REPOSITORY = DEPLOY.parents[1]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY")


def git(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        pytest.fail(f"{REPOSITORY} is not a git checkout with git on PATH", pytrace=False)
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=60
    )


def test_tracked_secret_files_hold_only_placeholders() -> None:
    """Every secret value in a tracked file under deploy/k8s is `change-me`: real values live
    outside the repository (a site overlay, a secret manager), never committed here."""
    tracked = git("ls-files", "deploy/k8s").stdout.split()
    files = [f for f in tracked if f.endswith((".env", ".key"))]
    assert "deploy/k8s/overlays/workers/secrets/redis.env" in files
    assert "deploy/k8s/components/in-cluster-postgres/postgres-superuser.env" in files
    for name in files:
        text = (REPOSITORY / name).read_text()
        if name.endswith(".key"):
            assert text.strip() == "change-me", name
            continue
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.partition("=")
            if SECRET_NAME.search(key):
                assert value == "change-me", f"{name}: {key} is not the placeholder"


@pytest.mark.parametrize(
    "path",
    [
        "deploy/k8s/overlays/production/synapse.env",
        "deploy/k8s/my-site/hapi-database.env",
        "deploy/k8s/base/secrets/signing.local.key",
        "deploy/k8s/base/secrets/matrix.example.org.signing.key",
        "deploy/k8s/overlays/production/tls.pem",
        "my-site/webhook.env",
        "my-site/signing.key",
        "matrix.example.org.signing.key",
    ],
)
def test_where_real_secrets_land_by_accident_is_ignored(path: str) -> None:
    result = git("check-ignore", "--no-index", "-q", path)
    assert result.returncode == 0, f"{path} is not ignored by .gitignore"
