"""Every Kubernetes manifest in the docs is valid, checked offline by kubernetes-validate against
the schemas it ships: the oldest Kubernetes the docs support (1.28, for the
`apps.kubernetes.io/pod-index` label) and the newest the package knows."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DOCS = Path(__file__).resolve().parent.parent / "docs"
OLDEST = "1.28.0"  # docs/scaling.md: the pod-index label needs 1.28
FENCE = re.compile(r"^(?P<indent>[ \t]*)```yaml[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


@dataclass(frozen=True)
class Manifest:
    where: str  # docs/<page>.md:<line of the fence>
    document: dict[str, Any]


def manifests() -> list[Manifest]:
    """The YAML documents with an `apiVersion` and a `kind` in the docs' ```yaml blocks."""
    found: list[Manifest] = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for block in FENCE.finditer(text):
            line = text.count("\n", 0, block.start()) + 1
            body = textwrap.dedent(block["body"])
            for document in yaml.safe_load_all(body):
                if isinstance(document, dict) and {"apiVersion", "kind"} <= document.keys():
                    found.append(Manifest(f"docs/{page.name}:{line}", document))
    return found


def test_the_docs_have_manifests_to_check() -> None:
    """The extraction finds the ConfigMap and the StatefulSet of docs/scaling.md, so the check
    below cannot pass by finding nothing."""
    kinds = {(m.where.split(":")[0], m.document["kind"]) for m in manifests()}
    assert {("docs/scaling.md", "ConfigMap"), ("docs/scaling.md", "StatefulSet")} <= kinds


@pytest.mark.parametrize("version", [OLDEST, kubernetes_validate.latest_version()])
def test_every_kubernetes_manifest_in_the_docs_is_valid(version: str) -> None:
    """Strict: an unknown or misspelt field (`livenesProbe`) is an error too."""
    problems = []
    for manifest in manifests():
        try:
            kubernetes_validate.validate(manifest.document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            field = ".".join(str(part) for part in error.absolute_path) or "(top)"
            kind = manifest.document["kind"]
            problems.append(f"{manifest.where} ({kind}) {field}: {error.message}")
    assert not problems, "\n".join(problems)


def test_the_docs_workloads_run_this_projects_image() -> None:
    """Each container of a workload in the docs runs the image the Dockerfile builds, from the
    user's own registry (`<registry>/scheduler-publisher:<tag>`)."""
    images = [
        container["image"]
        for manifest in manifests()
        if manifest.document["kind"] in {"StatefulSet", "Deployment", "DaemonSet"}
        for container in manifest.document["spec"]["template"]["spec"]["containers"]
    ]
    assert images
    for image in images:
        assert re.fullmatch(r"[a-z0-9.-]+(:\d+)?/scheduler-publisher:[\w.-]+", image), image
