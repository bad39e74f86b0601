"""Helpers of the deployment tests: rendering kustomize, checking custom resources,
reading PromQL, parsing the Dockerfile (offline: no cluster, no Docker engine)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import yaml

from dispatcher.core.metrics import Metrics

ROOT = Path(__file__).resolve().parents[3]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
SECRET_EXAMPLE = BASE / "secret.example.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dispatcher.json"
OPERATIONS = ROOT / "docs" / "operations.md"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The oldest Kubernetes the manifests are written for (matchLabelKeys, PDB
# unhealthyPodEvictionPolicy: beta and on by default since 1.27), as docs/operations.md
# states it; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.27"
# Series the alerts read that are not dispatcher's own: Prometheus' `up` and
# kube-state-metrics. Anything else that is not a dispatcher_* series is a typo.
EXTERNAL_ALERT_METRICS = {
    "up",
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
}
SECRET_SETTINGS = {"dsn", "election_dsn", "api_token", "ui_readonly_token"}


# --- helpers: YAML, rendering --------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize` makes of the subset of kustomize our files use:
    resources, components (that only add resources), namespace, images, and inline
    JSON 6902 patches with a kind/name target."""
    spec = load_yaml_documents(directory / "kustomization.yaml")[0]
    supported = {"apiVersion", "kind", "resources", "components", "namespace", "images", "patches"}
    unsupported = set(spec) - supported
    assert not unsupported, f"{directory}: the test renderer does not handle {unsupported}"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += render_kustomization(path) if path.is_dir() else load_yaml_documents(path)
    for entry in spec.get("components", []):
        component = load_yaml_documents(directory / entry / "kustomization.yaml")[0]
        assert component["kind"] == "Component"
        assert set(component) <= {"apiVersion", "kind", "resources"}, (
            f"{entry}: the test renderer handles components that only add resources"
        )
        objects += render_kustomization(directory / entry)
    for patch in spec.get("patches", []):
        apply_patch(objects, patch)
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        set_image(objects, image)
    return objects


def apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    target = patch["target"]
    assert set(target) <= {"kind", "name"}, f"unsupported patch target {target}"
    operations = yaml.safe_load(patch["patch"])
    assert isinstance(operations, list), "only JSON 6902 patches (a list of operations)"
    matched = [
        obj
        for obj in objects
        if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]
    ]
    assert matched, f"patch target {target} matches no object"
    for obj in matched:
        for operation in operations:
            json_patch(obj, operation)


def json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on ``document``, in place."""
    op, path = operation["op"], operation["path"]
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path.split("/")[1:]]
    parent: Any = document
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[index]
        else:
            raise AssertionError(f"unsupported patch operation {op!r}")
        return
    if op == "add":
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "replace":
        assert last in parent, f"replace of a missing path {path}"
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[last]
    else:
        raise AssertionError(f"unsupported patch operation {op!r}")


def containers(obj: Any) -> Iterator[dict[str, Any]]:
    """Every container and init container anywhere in an object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from containers(item)


def set_image(objects: list[dict[str, Any]], image: dict[str, str]) -> None:
    for container in (c for obj in objects for c in containers(obj)):
        # The reference without its digest or tag (a tag follows the last colon).
        if re.sub(r"@.*$|:[^/:]*$", "", container["image"]) != image["name"]:
            continue
        new = image.get("newName", image["name"])
        if "digest" in image:
            container["image"] = f"{new}@{image['digest']}"
        else:
            container["image"] = f"{new}:{image['newTag']}" if "newTag" in image else new


def by_identity(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    keyed = {}
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        assert key not in keyed, f"two objects are {key}"
        keyed[key] = obj
    return keyed


def kubectl_kustomize(directory: Path) -> list[dict[str, Any]] | None:
    """``kubectl kustomize`` output, or None when there is no kubectl binary."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(rendered: dict[tuple[str, str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for (k, _, _), o in rendered.items() if k == kind]
    return obj


def secret_example(name: str) -> dict[str, Any]:
    (secret,) = [s for s in load_yaml_documents(SECRET_EXAMPLE) if s["metadata"]["name"] == name]
    return secret


# --- helpers: custom resources ---------------------------------------------------------

DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")


def servicemonitor_problems(obj: dict[str, Any]) -> list[str]:
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r}")
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        problems.append(f"unknown top-level keys {extra}")
    if not obj.get("metadata", {}).get("name"):
        problems.append("no metadata.name")
    spec = obj.get("spec", {})
    extra = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    if extra:
        problems.append(f"unknown spec keys {extra}")
    if not isinstance(spec.get("selector", {}).get("matchLabels"), dict):
        problems.append("spec.selector.matchLabels is not a mapping")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*problems, "spec.endpoints is not a non-empty list"]
    known = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    known |= {"relabelings", "metricRelabelings", "params", "tlsConfig", "authorization"}
    for i, endpoint in enumerate(endpoints):
        if set(endpoint) - known:
            problems.append(f"endpoints[{i}]: unknown keys {set(endpoint) - known}")
        if not isinstance(endpoint.get("port"), str):
            problems.append(f"endpoints[{i}].port must name a Service port")
        if not str(endpoint.get("path", "/")).startswith("/"):
            problems.append(f"endpoints[{i}].path must start with /")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.fullmatch(str(endpoint[key])):
                problems.append(f"endpoints[{i}].{key} {endpoint[key]!r} is not a duration")
    return problems


def prometheusrule_problems(obj: dict[str, Any]) -> list[str]:
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r}")
    if obj.get("kind") != "PrometheusRule":
        problems.append(f"kind {obj.get('kind')!r}")
    if not obj.get("metadata", {}).get("name"):
        problems.append("no metadata.name")
    groups = obj.get("spec", {}).get("groups")
    if not isinstance(groups, list) or not groups:
        return [*problems, "spec.groups is not a non-empty list"]
    for group in groups:
        name = group.get("name")
        if not name or set(group) - {"name", "rules", "interval"}:
            problems.append(f"group {name!r}: needs a name and rules, nothing else")
        for rule in group.get("rules") or []:
            alert = rule.get("alert")
            if set(rule) != {"alert", "expr", "for", "labels", "annotations"}:
                problems.append(
                    f"{alert}: keys {sorted(rule)}, want alert/expr/for/labels/annotations"
                )
                continue
            if not DURATION.fullmatch(str(rule["for"])):
                problems.append(f"{alert}: for {rule['for']!r} is not a duration")
            if rule["labels"].get("severity") not in ("critical", "warning", "info"):
                problems.append(f"{alert}: labels.severity must be critical, warning or info")
            missing = {"summary", "description", "runbook_url"} - set(rule["annotations"])
            if missing:
                problems.append(f"{alert}: annotations lack {sorted(missing)}")
            if not isinstance(rule["expr"], str) or not rule["expr"].strip():
                problems.append(f"{alert}: empty expr")
    return problems


CUSTOM_RESOURCE_CHECKS = {
    "ServiceMonitor": servicemonitor_problems,
    "PrometheusRule": prometheusrule_problems,
}


def kubernetes_problems(obj: dict[str, Any]) -> list[str]:
    """Schema problems of one object: the Kubernetes schemas, or our CRD checks."""
    if obj["kind"] in CUSTOM_RESOURCE_CHECKS:
        return CUSTOM_RESOURCE_CHECKS[obj["kind"]](obj)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        return [f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}"]
    return []


# --- helpers: PromQL --------------------------------------------------------------------

GRAFANA_RANGES = re.compile(r"\$\{?(__rate_interval|__interval|__range)\b\}?")


def metric_names(expr: str) -> set[str]:
    """Every series name a PromQL expression selects (it must parse)."""
    names: set[str] = set()
    for selector in vector_selectors(expr):
        if selector.name:
            names.add(selector.name)
        for matcher in label_matchers(selector):
            if matcher.name == "__name__":
                assert matcher.op == promql_parser.MatchOp.Equal, (
                    f"{expr}: select metrics by exact name, not {matcher.op}"
                )
                names.add(matcher.value)
    return names


def label_matchers(selector: promql_parser.VectorSelector) -> list[promql_parser.Matcher]:
    matchers = [*selector.matchers.matchers]
    for alternative in selector.matchers.or_matchers:
        matchers.extend(alternative)
    return matchers


def vector_selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """Every series selector in a PromQL expression (it must parse)."""
    selectors: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        elif isinstance(node, promql_parser.MatrixSelector):
            visit(node.vector_selector)
        elif isinstance(node, promql_parser.Call):
            for argument in node.args:
                visit(argument)
        elif isinstance(node, promql_parser.AggregateExpr):
            visit(node.expr)
            if node.param is not None:
                visit(node.param)
        elif isinstance(node, promql_parser.BinaryExpr):
            visit(node.lhs)
            visit(node.rhs)
        elif isinstance(
            node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr
        ):
            visit(node.expr)
        elif not isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral):
            raise AssertionError(f"{expr}: unexpected PromQL node {type(node).__name__}")

    visit(promql_parser.parse(expr))
    return selectors


def unknown_metric_names(expr: str, external: AbstractSet[str] = frozenset()) -> set[str]:
    """Names in ``expr`` that are neither exposed by dispatcher.core.metrics nor in
    ``external``: a typo in a dispatcher_* name always lands here."""
    exposed = Metrics().exposed_names()
    return {
        name
        for name in metric_names(expr)
        if (name not in exposed if name.startswith("dispatcher_") else name not in external)
    }


def grafana_to_promql(expr: str) -> str:
    """Grafana's range variables become a concrete range; the other variables sit
    inside label matcher strings, where PromQL takes them as text."""
    return GRAFANA_RANGES.sub("5m", expr)


def alert_rules() -> list[dict[str, Any]]:
    (rule_file,) = load_yaml_documents(ALERTS)
    return [rule for group in rule_file["spec"]["groups"] for rule in group["rules"]]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r}", grafana_to_promql(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, f"variable {variable['name']}: expected label_values(selector, label)"
        queries.append((f"variable {variable['name']!r}", match.group(1)))
    return queries


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


# --- helpers: Dockerfile ------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} in FROM lines substituted."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comments, also those inside a continued instruction
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name, []))
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def stage_args(stage: Stage) -> dict[str, str]:
    args = {}
    for keyword, rest in stage.instructions:
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return args


def pip_install_commands(stage: Stage) -> list[list[str]]:
    """The arguments after `pip install` of every pip command in the stage's RUNs,
    with the stage's ARG defaults substituted."""
    args = stage_args(stage)
    commands = []
    for keyword, rest in stage.instructions:
        if keyword != "RUN":
            continue
        for part in re.split(r"&&|;", rest):
            words = shlex.split(
                re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), part)
            )
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    commands.append(words[i + 2 :])
    return commands


def dockerignore_includes(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        globs = [glob, glob[3:]] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            included = negated
    return included


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"
    return found or (str(beside) if beside.exists() else None)
