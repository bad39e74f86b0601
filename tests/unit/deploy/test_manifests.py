"""The Kubernetes manifests: they render, validate against the Kubernetes schemas, wire
their objects together, and configure dispatcher the way dispatcher reads it."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
from typing import Any

import httpx

from dispatcher.core.config import Settings, env_name, load_settings
from dispatcher.core.metrics import Metrics
from dispatcher.http.app import build_api
from dispatcher.runtime import POOL_CLOSE_TIMEOUT
from tests.unit.deploy.support import (
    BASE,
    KUBERNETES,
    OVERLAY,
    SECRET_EXAMPLE,
    SECRET_SETTINGS,
    by_identity,
    kubectl_kustomize,
    kubernetes_problems,
    load_yaml_documents,
    one,
    render_kustomization,
    secret_example,
)

Rendered = dict[tuple[str, str, str], dict[str, Any]]

BASE_KINDS = {"ConfigMap", "Job", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
OVERLAY_KINDS = BASE_KINDS | {"ServiceMonitor"}
# Runtime.stop() after the drain: up to 5 s to put the rest back to pending and up to
# 5 s to write the last outcomes, then closing the pool (POOL_CLOSE_TIMEOUT).
REQUEUE_AND_FLUSH_SECONDS = 10.0
POD_NAME = "dispatcher-7c9d5f8b6d-5lq2x"


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    """A non-empty matchLabels selector matching ``labels``."""
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def container_port(container: dict[str, Any], ref: int | str) -> int | None:
    """The containerPort a port reference (a number or a port name) lands on."""
    for port in container.get("ports", []):
        if ref in (port["containerPort"], port.get("name")):
            number: int = port["containerPort"]
            return number
    return None


def hardening_problems(obj: dict[str, Any]) -> list[str]:
    """What a pod template lacks of the restricted Pod Security Standard and more."""
    spec = pod_spec(obj)
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    problems = []
    pod_context = spec.get("securityContext", {})
    if pod_context.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: mounts a service account token it never uses")
    for container in spec["containers"]:
        context = {**pod_context, **container.get("securityContext", {})}
        where = f"{name} container {container['name']}"
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities are not dropped (drop: [ALL])")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        resources = container.get("resources", {})
        if set(resources.get("requests", {})) != {"cpu", "memory"}:
            problems.append(f"{where}: needs cpu and memory requests")
        if "memory" not in resources.get("limits", {}):
            problems.append(f"{where}: needs a memory limit")
    return problems


def pod_environment(rendered: Rendered, obj: dict[str, Any]) -> dict[str, str]:
    """The environment the first container of ``obj`` starts with: its ConfigMaps from
    the rendering, its Secrets from the example, downward API values for a pod."""
    (container, *_) = pod_spec(obj)["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            namespace = obj["metadata"]["namespace"]
            env.update(rendered["ConfigMap", namespace, name]["data"])
        else:
            env.update(secret_example(source["secretRef"]["name"])["stringData"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            field = variable["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "metadata.name", f"{variable['name']}: unexpected fieldRef {field}"
            env[variable["name"]] = POD_NAME
    return env


def stand_in_replica() -> Any:
    """Just what build_api reads of a replica (the ReplicaView protocol); no pool, so
    /readyz answers 503 "database unreachable"."""
    return types.SimpleNamespace(
        owner_id=f"{POD_NAME}-1-abcdef",
        settings=Settings(),
        metrics=Metrics(),
        version="0.0.0",
        started_at=0.0,
        role="standby",
        stopping=False,
        term=None,
        pool=None,
        running_by_type=dict,
        limits=dict,
        status_extras=dict,
    )


# --- rendering and schemas --------------------------------------------------------------


def test_the_overlay_renders_the_same_with_and_without_kubectl() -> None:
    ours = by_identity(render_kustomization(OVERLAY))
    assert {kind for kind, _, _ in ours} == OVERLAY_KINDS
    assert {namespace for _, namespace, _ in ours} == {"dispatcher"}
    images = {
        container["image"]
        for obj in ours.values()
        if "template" in obj.get("spec", {})
        for container in pod_spec(obj)["containers"]
    }
    assert images == {"registry.example.com/myapp/dispatcher:1.0.0"}
    kubectl = kubectl_kustomize(OVERLAY)
    if kubectl is not None:
        theirs = by_identity(kubectl)
        assert sorted(theirs) == sorted(ours), "kubectl and the test renderer render other objects"
        for key, obj in theirs.items():
            assert obj == ours[key], f"{key}: kubectl renders it differently"


def test_the_base_renders_on_its_own() -> None:
    base = by_identity(render_kustomization(BASE))
    assert {kind for kind, _, _ in base} == BASE_KINDS
    assert {namespace for _, namespace, _ in base} == {""}, "the namespace belongs to overlays"
    deployment = one(base, "Deployment")
    assert pod_spec(deployment)["containers"][0]["image"] == "dispatcher-app"
    kubectl = kubectl_kustomize(BASE)
    if kubectl is not None:
        assert by_identity(kubectl) == base


def test_every_object_validates_against_the_kubernetes_schemas(rendered: Rendered) -> None:
    objects = [*rendered.values(), *load_yaml_documents(SECRET_EXAMPLE)]
    assert len(objects) == len(OVERLAY_KINDS) + 2
    for obj in objects:
        assert kubernetes_problems(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_schema_check_catches_a_misspelt_field(rendered: Rendered) -> None:
    deployment = copy.deepcopy(one(rendered, "Deployment"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    assert any("replica" in p for p in kubernetes_problems(deployment))

    deployment = copy.deepcopy(one(rendered, "Deployment"))
    pod_spec(deployment)["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    assert any("readinesProbe" in p for p in kubernetes_problems(deployment))

    service = copy.deepcopy(one(rendered, "Service"))
    service["spec"]["ports"][0]["port"] = "8080"
    assert kubernetes_problems(service), "a port given as a string passed the schema"

    monitor = copy.deepcopy(one(rendered, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["port"] = 8080
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    assert len(kubernetes_problems(monitor)) == 2  # the misspelt key, and no endpoints
    monitor["spec"]["endpoints"] = monitor["spec"].pop("endpoint")
    problems = kubernetes_problems(monitor)
    assert any("must name a Service port" in p for p in problems)
    assert any("'15 seconds' is not a duration" in p for p in problems)


# --- the replicas ----------------------------------------------------------------------------


def test_the_deployment_runs_three_hardened_replicas(rendered: Rendered) -> None:
    deployment = one(rendered, "Deployment")
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert container["args"][0] == "run" and re.fullmatch(r"[\w.]+:\w+", container["args"][1])
    replica_id = {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {"name": "DISPATCHER_REPLICA_ID", "valueFrom": replica_id} in container["env"]
    assert spec["enableServiceLinks"] is False

    probes = {key: container[key] for key in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, (
        "a replica gets at least a minute to connect, check the schema and join"
    )
    assert "lifecycle" not in container, "SIGTERM drains by itself: no preStop hook"

    shutdown_timeout = Settings().shutdown_timeout
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > shutdown_timeout + REQUEUE_AND_FLUSH_SECONDS + POOL_CLOSE_TIMEOUT, (
        f"terminationGracePeriodSeconds {grace} leaves no time after the "
        f"{shutdown_timeout:g} s drain to requeue the rest and write the last outcomes"
    )
    assert grace == 45

    spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for key, constraint in spread.items():
        assert constraint["maxSkew"] == 1, key
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels(deployment)), key

    assert hardening_problems(deployment) == []
    assert container["resources"]["limits"].keys() == {"cpu", "memory"}
    assert [list(source) for source in container["envFrom"]] == [["configMapRef"], ["secretRef"]]
    assert container["envFrom"][0]["configMapRef"]["name"] == "dispatcher-config"
    assert container["envFrom"][1]["secretRef"]["name"] == "dispatcher-secrets"
    # A rolling update never drops below three replicas.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


async def test_probes_and_scrapes_hit_routes_the_api_serves(rendered: Rendered) -> None:
    api = build_api(stand_in_replica())
    routes = {getattr(r, "path", "") for r in api.routes if "GET" in getattr(r, "methods", ())}
    deployment = one(rendered, "Deployment")
    (container,) = pod_spec(deployment)["containers"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (endpoint,) = one(rendered, "ServiceMonitor")["spec"]["endpoints"]

    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    paths["prometheus.io/path"] = annotations["prometheus.io/path"]
    paths["ServiceMonitor"] = endpoint["path"]
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        for what, path in paths.items():
            assert path in routes, f"{what} requests {path}, which the API does not serve"
            status = (await client.get(path)).status_code
            assert status not in (401, 403, 404), f"{what}: GET {path} answers {status}"
        scrape = await client.get(paths["ServiceMonitor"])
    assert "dispatcher_is_leader" in scrape.text

    assert container_port(container, "http") == 8080
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == 8080, probe
    assert int(annotations["prometheus.io/port"]) == container_port(container, "http")
    assert annotations["prometheus.io/scrape"] == "true"
    http_port = one(rendered, "ConfigMap")["data"]["DISPATCHER_HTTP_PORT"]
    assert int(http_port) == container_port(container, "http"), (
        "dispatcher listens on another port than the container declares"
    )


def test_selectors_and_ports_connect_the_objects(rendered: Rendered) -> None:
    deployment = one(rendered, "Deployment")
    (container,) = pod_spec(deployment)["containers"]
    labels = pod_labels(deployment)
    migration_labels = pod_labels(one(rendered, "Job"))

    service = one(rendered, "Service")
    assert selects(service["spec"]["selector"], labels), "the Service selects no replica"
    assert not selects(service["spec"]["selector"], migration_labels), (
        "the Service would send traffic to the migration Job's pod"
    )
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["port"] == 8080
    assert container_port(container, port["targetPort"]) is not None, (
        f"the Service's targetPort {port['targetPort']!r} is no port of the container"
    )

    pdb = one(rendered, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb

    policy = one(rendered, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        assert [p["port"] for p in rule["ports"]] == ["http"], "only the http port is open"
        assert all(container_port(container, p["port"]) == 8080 for p in rule["ports"])
        assert rule["from"], "an ingress rule without `from` admits every source"
        for peer in rule["from"]:
            assert list(peer) == ["namespaceSelector"], f"unexpected peer {peer}"
            assert peer["namespaceSelector"]["matchLabels"], "an empty selector admits all"
    peers = [
        peer["namespaceSelector"]["matchLabels"] for r in policy["ingress"] for peer in r["from"]
    ]
    assert {"dispatcher.io/access": "true"} in peers
    assert {"kubernetes.io/metadata.name": "monitoring"} in peers

    monitor = one(rendered, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports, f"the Service has no port {endpoint['port']!r}"
    # The alerts' up{job="dispatcher"}: the operator names the job after the Service.
    assert service["metadata"]["name"] == "dispatcher" and "jobLabel" not in monitor["spec"]


def test_the_migration_job_runs_migrate_with_the_same_image(rendered: Rendered) -> None:
    job = one(rendered, "Job")
    deployment = one(rendered, "Deployment")
    (migrate,) = pod_spec(job)["containers"]
    (server,) = pod_spec(deployment)["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == server["image"], "the Job must migrate to the replicas' version"
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert pod_spec(job)["enableServiceLinks"] is False
    assert hardening_problems(job) == []
    assert migrate["envFrom"] == [
        {"configMapRef": {"name": "dispatcher-config"}},
        {"secretRef": {"name": "dispatcher-migrate-secrets"}},
    ]
    # Migrations may wait 300 s for another migration's lock.
    assert job["spec"]["activeDeadlineSeconds"] > 300
    # Argo CD: config first, then the migration hook, then the replicas.
    waves = {
        kind: int(one(rendered, kind)["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
        for kind in ("ConfigMap", "Job", "Deployment")
    }
    assert waves["ConfigMap"] < waves["Job"] < waves["Deployment"]
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "Sync"
    # kubectl apply -l 'app.kubernetes.io/component in (config,migration)' (the docs'
    # first step) applies exactly the ConfigMap and the Job.
    first_step = {
        kind
        for (kind, _, _), obj in rendered.items()
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") in ("config", "migration")
    }
    assert first_step == {"ConfigMap", "Job"}


# --- configuration --------------------------------------------------------------------------


def test_the_configmap_holds_every_setting_at_its_default() -> None:
    data = one(by_identity(render_kustomization(BASE)), "ConfigMap")["data"]
    text = (BASE / "configmap.yaml").read_text(encoding="utf-8")
    defaults = Settings()
    expected = set()
    for field in dataclasses.fields(Settings):
        name = env_name(field.name)
        if field.name in SECRET_SETTINGS or field.name == "replica_id":
            assert name not in data, f"{name} does not belong in the ConfigMap"
            continue
        default = getattr(defaults, field.name)
        parse = field.metadata["parse"]
        if default is None:
            # Unset by default, and an empty value is an error: shown commented out.
            assert name not in data, f"{name} is unset by default, not {data.get(name)!r}"
            example = re.search(rf'^\s*#\s*{name}: "([^"]+)"$', text, re.MULTILINE)
            assert example, f"{name} is not shown as a commented-out entry"
            parse(example.group(1))
            continue
        expected.add(name)
        assert name in data, f"{name} is missing from the ConfigMap"
        assert isinstance(data[name], str), f"{name}: ConfigMap values are strings"
        assert parse(data[name]) == default, f"{name}={data[name]!r}, default is {default!r}"
    assert set(data) == expected, f"not settings: {set(data) - expected}"


def test_the_rendered_environment_is_a_valid_configuration(rendered: Rendered) -> None:
    deployment = one(rendered, "Deployment")
    settings, warnings = load_settings(env=pod_environment(rendered, deployment))
    assert warnings == []
    assert settings.replica_id == POD_NAME
    assert settings.dsn == secret_example("dispatcher-secrets")["stringData"]["DISPATCHER_DSN"]
    assert settings.api_token is not None
    # The overlay's patches arrive.
    assert settings.concurrency == 200 and settings.log_format == "json"

    job = one(rendered, "Job")
    settings, warnings = load_settings(env=pod_environment(rendered, job))
    assert warnings == []
    owner = secret_example("dispatcher-migrate-secrets")["stringData"]["DISPATCHER_DSN"]
    runtime = secret_example("dispatcher-secrets")["stringData"]["DISPATCHER_DSN"]
    assert settings.dsn == owner != runtime, "the Job migrates as the schema owner"


def test_the_secret_example_is_never_applied(rendered: Rendered) -> None:
    kustomizations = sorted(KUBERNETES.rglob("kustomization.yaml"))
    assert len(kustomizations) == 3
    for path in kustomizations:
        spec = load_yaml_documents(path)[0]
        listed = [*spec.get("resources", []), *spec.get("components", [])]
        assert not [e for e in listed if "secret" in e], f"{path} applies the Secret example"
    assert "Secret" not in {kind for kind, _, _ in rendered}

    referenced = {
        source["secretRef"]["name"]
        for kind in ("Deployment", "Job")
        for source in pod_spec(one(rendered, kind))["containers"][0]["envFrom"]
        if "secretRef" in source
    }
    secrets = load_yaml_documents(SECRET_EXAMPLE)
    assert {s["metadata"]["name"] for s in secrets} == referenced
    secret_names = {env_name(s) for s in SECRET_SETTINGS}
    for secret in secrets:
        assert "data" not in secret, "example values belong in stringData, readable"
        assert set(secret["stringData"]) <= secret_names, secret["metadata"]["name"]
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{key}: not an obvious placeholder"
            if key.endswith("_DSN"):
                host = re.search(r"@([^:/]+)", value)
                assert host and host.group(1).endswith(".invalid"), f"{key}: a real host"
