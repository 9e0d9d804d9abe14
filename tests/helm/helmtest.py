"""Helpers for the chart tests (imported by name, unlike conftest.py): the helm binary (found or built and
cached by hack/k8s-bins.sh) and rendering the chart into objects."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from vlmpool.localcluster.controlplane import find_helm  # noqa: F401 - the tests import it from here
from vlmpool.pins import K8S_VERSION

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "vlmpool"
VALUES = Path(__file__).resolve().parent / "values"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
KUBE_VERSION = K8S_VERSION  # the version helm renders for: the pinned Kubernetes
VARIANTS = sorted(p.stem for p in VALUES.glob("*.yaml"))


class Helm:
    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        # Keep helm's cache/config/data out of the user's home.
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
        return res

    def template(self, *args: str, release: str = "vlmpool", namespace: str = "vlmpool-system",
                 crds: bool = False) -> list[dict]:
        out = self.run("template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
                       *(["--include-crds"] if crds else []), *args).stdout
        return [d for d in yaml.safe_load_all(out) if d]


def variant_args(name: str) -> list[str]:
    return [] if name == "default" else ["-f", str(VALUES / f"{name}.yaml")]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
