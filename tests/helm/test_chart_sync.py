"""The chart's generated parts are current (CRDs from the models, RBAC rules from rbac.RULES) and its
versions and image names agree with the package, the pools' defaults and images/build.sh."""

from __future__ import annotations

import importlib.util
import re
import tomllib

import yaml
from helmtest import CHART, REPO


def _generator():
    spec = importlib.util.spec_from_file_location("chart_generate", CHART / "hack" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_are_current():
    stale = _generator().stale()
    assert not stale, f"stale chart files {stale}: run `python charts/vlmpool/hack/generate.py`"


def test_chart_crds_are_byte_identical_to_the_repository_crds():
    repo = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert repo and chart == repo


def test_rules_template_holds_exactly_the_operator_rules():
    from vlmpool.controller.rbac import LEADER_ELECTION_RULES, RULES

    text = (CHART / "templates" / "_rules.tpl").read_text()

    def define(name: str) -> object:
        return yaml.safe_load(text.split('{{- define "' + name + '" -}}\n', 1)[1].split("{{- end }}", 1)[0])

    assert define("vlmpool.operatorRules") == RULES
    assert define("vlmpool.leaderElectionRules") == LEADER_ELECTION_RULES


def test_the_generator_repairs_a_stale_chart(tmp_path):
    import shutil

    gen = _generator()
    chart = tmp_path / "vlmpool"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "_rules.tpl").write_text("{{- define \"vlmpool.operatorRules\" -}}\n[]\n{{- end }}\n")
    (chart / "crds" / "extra.yaml").write_text("kind: Stale\n")
    crd = sorted((chart / "crds").glob("vlmpool.io_*.yaml"))[0]
    crd.write_text(crd.read_text() + "# edited by hand\n")
    assert gen.stale(chart) == sorted(["templates/_rules.tpl", "crds/extra.yaml", f"crds/{crd.name}"])
    gen.write(chart)
    assert gen.stale(chart) == []


def test_versions_and_image_names_agree():
    from vlmpool.api.pool import DEFAULT_PROXY_IMAGE

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    registry = "ghcr.io/vlmpool"
    # The pools' default proxy image is what `make images` builds as the proxy.
    assert DEFAULT_PROXY_IMAGE == f"{registry}/vlmpool:{version}"
    build = (REPO / "images" / "build.sh").read_text()
    names = dict(re.findall(r"^\s+(operator|proxy|patcher|simulator)\) echo \"\$REGISTRY/([a-z-]+):\$TAG\"", build,
                            re.M))
    assert names == {"operator": "vlmpool-operator", "proxy": "vlmpool", "patcher": "vlmpool-patcher",
                     "simulator": "vlmpool-sim"}
    assert values["image"]["repository"] == f"{registry}/{names['operator']}"
    assert values["patcher"]["image"]["repository"] == f"{registry}/{names['patcher']}"
    dockerfile = (REPO / "images" / "Dockerfile").read_text()
    for target in names:
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, re.M), target
    # Pinned base image: an exact patch release (or a digest), never a floating tag.
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    assert dockerfile.count("USER 65532:65532") == 3  # core (operator, proxy, simulator), patcher, patcher-dora
