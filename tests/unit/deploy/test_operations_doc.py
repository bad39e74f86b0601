"""docs/operations.md: what it quotes and states matches the repository, and its links,
anchors and paths lead somewhere."""

from __future__ import annotations

import re

from dispatcher.core.config import Settings
from dispatcher.services.reaper import PRUNE_BATCH, PRUNE_BATCHES_PER_PASS
from tests.unit.deploy.support import (
    ALERTS,
    BASE,
    DOCKERFILE,
    KUBERNETES_VERSION,
    OPERATIONS,
    ROOT,
    load_yaml_documents,
    markdown_anchors,
    parse_dockerfile,
)

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
AUTOVACUUM = re.compile(r"^ALTER TABLE \{\{schema\}\}\.jobs SET \(\n.*?^\);", re.M | re.DOTALL)
# A path as the doc writes one in inline code: folders and a file, or a file at the root.
REPOSITORY_PATH = re.compile(
    r"(?:[\w-]+/)+[\w.-]*|[\w.-]+\.(?:md|ya?ml|json|sql|py|toml)|Dockerfile|\.dockerignore"
)
# (docs/operations.md, "Section title"), possibly broken across two comment lines.
CITATION = re.compile(r'docs/operations\.md,\s*(?:#\s*)?"([^"]+)"')


def text() -> str:
    return OPERATIONS.read_text(encoding="utf-8")


def prose() -> str:
    """The doc without its fenced code blocks."""
    return FENCE.sub("", text())


def anchor(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_the_doc_quotes_the_autovacuum_settings_verbatim() -> None:
    migration = (ROOT / "sql" / "0001_initial.sql").read_text(encoding="utf-8")
    (settings,) = AUTOVACUUM.findall(migration)
    blocks = [body.rstrip("\n") for language, body in FENCE.findall(text()) if language == "sql"]
    assert settings in blocks, "docs/operations.md misquotes the jobs table's autovacuum block"

    # ... and its explanation states the numbers of the block.
    values = dict(re.findall(r"(\w+) = ([\d.]+)", settings))
    assert values["autovacuum_vacuum_scale_factor"] == "0.01"
    assert values["autovacuum_vacuum_threshold"] == "1000"
    assert values["fillfactor"] == "90"
    explanation = prose()
    assert "after 1% of the rows (plus 1,000) are dead" in explanation
    assert "pages keep 10% free" in explanation


def test_internal_links_and_anchors_resolve() -> None:
    headings = [
        line.lstrip("#").strip() for line in prose().splitlines() if re.match(r"#{1,6}\s", line)
    ]
    assert len(headings) == len(set(headings)), "two sections share a heading (and an anchor)"
    anchors = markdown_anchors(OPERATIONS)
    assert anchor("Zero to three replicas on Kubernetes") in anchors
    links = re.findall(r"\]\(([^)\s]+)\)", prose())
    assert links, "no links found: the link pattern is broken"
    for link in links:
        if re.match(r"\w+://", link):
            continue
        target, _, fragment = link.partition("#")
        page = (OPERATIONS.parent / target).resolve() if target else OPERATIONS
        assert page.exists(), f"link {link}: no {target}"
        if fragment and page == OPERATIONS:
            assert fragment in anchors, f"link {link}: no such section"

    # Sections the artifacts send readers to.
    cited = {
        path: CITATION.findall(path.read_text(encoding="utf-8"))
        for path in [DOCKERFILE, *sorted((ROOT / "deploy").rglob("*.yaml"))]
    }
    assert sum(len(titles) for titles in cited.values()) >= 3
    for path, titles in cited.items():
        for title in titles:
            assert anchor(title) in anchors, f"{path.name} cites a missing section {title!r}"


def test_every_repository_path_the_doc_names_exists() -> None:
    named = set()
    for code in re.findall(r"`([^`\n]+)`", prose()):
        candidate = code.split("#")[0]
        if REPOSITORY_PATH.fullmatch(candidate):
            named.add(candidate)
    assert {".dockerignore", "deploy/prometheus/alerts.yaml", "sql/0001_initial.sql"} <= named
    for path in sorted(named):
        if "/" in path:
            assert (ROOT / path).exists(), f"docs/operations.md names {path}, which is missing"
        else:
            # A file name alone: at the root, or in the folder its table row names.
            found = (ROOT / path).exists() or any((ROOT / "deploy").rglob(path))
            assert found, f"docs/operations.md names {path}, which is nowhere"


def test_the_doc_states_the_numbers_the_artifacts_use() -> None:
    doc = prose()
    (deployment,) = load_yaml_documents(BASE / "deployment.yaml")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    grace = spec["terminationGracePeriodSeconds"]
    assert f"`terminationGracePeriodSeconds: {grace}`" in doc, f"the grace period is {grace}"
    shutdown = f"`DISPATCHER_SHUTDOWN_TIMEOUT` ({Settings().shutdown_timeout:g} s)"
    assert shutdown in doc, f"the doc does not say {shutdown}"
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    stated = re.search(r"asks for (\S+) CPU and (\d+) Mi, limited to (\S+) CPU\s+and (\d+) Mi", doc)
    assert stated, "the Sizing section no longer states the Deployment's resources"
    assert stated.groups() == (
        requests["cpu"],
        requests["memory"].removesuffix("Mi"),
        limits["cpu"],
        limits["memory"].removesuffix("Mi"),
    )
    (user,) = [
        rest for kw, rest in parse_dockerfile(DOCKERFILE)[1][-1].instructions if kw == "USER"
    ]
    uid = user.partition(":")[0]
    assert f"runs as UID {uid}" in doc, f"the image runs as UID {uid}"
    words = " ".join(doc.split())
    defaults = Settings()
    for setting, value in (
        ("DISPATCHER_RETENTION_COMPLETED", defaults.retention_completed),
        ("DISPATCHER_RETENTION_FAILED", defaults.retention_failed),
    ):
        days = f"{value / 86400:g} day{'s' if value != 86400 else ''}"
        assert f"`{setting}` ({days})" in words, f"{setting} defaults to {days}"
    assert f"batches of {PRUNE_BATCH:,} rows" in words, f"the reaper deletes {PRUNE_BATCH}"
    assert f"at most {PRUNE_BATCHES_PER_PASS} batches per pass" in words
    minimum = re.search(r"Kubernetes cluster (\d+\.\d+) or newer", doc)
    assert minimum and minimum.group(1) == KUBERNETES_VERSION, (
        "the manifests are validated against another Kubernetes than the doc requires"
    )


def test_every_alert_has_a_runbook_section() -> None:
    alerts = re.findall(r"- alert: (\w+)", ALERTS.read_text(encoding="utf-8"))
    runbooks = re.findall(r"^### (Dispatcher\w+)$", prose(), re.MULTILINE)
    assert sorted(alerts) == sorted(runbooks), "alerts and runbooks differ"
