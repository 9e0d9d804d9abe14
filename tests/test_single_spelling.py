"""Each version pin and the API's version are spelled ONCE: the pins in operator/vlmpool/pins.py, the API
group and version in operator/vlmpool/names.py. Everything else (code, scripts, the Makefile, the chart,
the image build, the tests, the benches) reads them from there: this test fails when a pin's value or the
API version is written again where it can be read instead.

Not scanned: documentation (*.md, docs/, examples/: YAML written for people) and generated files (the
CRDs, which `make crds` writes from the models, and test fixtures copied from elsewhere). ALLOWED lists
the few places that state a fact about one release on purpose (a measurement taken on it, upstream's
source at that tag), each with its reason: moving the pin means re-reading them.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlmpool import names, pins

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("operator", "hack", "charts", "images", "tests", "bench", ".ci", "Makefile", "pyproject.toml")
SKIP_DIRS = {"__pycache__", "fixtures", "crds", ".venv", "node_modules"}
SKIP_SUFFIXES = {".md", ".pyc", ".png", ".jpg", ".safetensors", ".bin", ".tgz", ".gz"}
PINS_FILE = "operator/vlmpool/pins.py"
NAMES_FILE = "operator/vlmpool/names.py"

# (path, pin) -> why this file may name that release itself
ALLOWED = {
    ("bench/scale.py", "VLLM_RELEASE"): "LOAD_MS_SOURCE: a timing measured on that release",
    ("operator/vlmpool/manifests/routing.py", "GIE_VERSION"): "upstream's behaviour and chart at that tag",
    ("tests/routing/routing_helpers.py", "GIE_VERSION"): "upstream's standalone chart at that tag",
}


def _files() -> list[Path]:
    out = []
    for top in SCANNED:
        path = ROOT / top
        if path.is_file():
            out.append(path)
            continue
        for p in sorted(path.rglob("*")):
            if (p.is_file() and p.suffix not in SKIP_SUFFIXES and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
                    and not any(part.endswith(".egg-info") for part in p.parts)):
                out.append(p)
    return out


def _text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def _release(value: str) -> re.Pattern[str]:
    # the release as a whole version, with or without a leading v: "1.5.0" but not "11.5.0" or "1.5.01"
    return re.compile(rf"(?<![\w.]){'v?' + re.escape(value)}(?![\w]|\.\d)")


def test_every_pin_is_spelled_only_in_pins_py():
    found = []
    for p in _files():
        rel = p.relative_to(ROOT).as_posix()
        if rel in (PINS_FILE, "tests/test_single_spelling.py"):
            continue
        text = _text(p)
        for key, value in pins.PINS.items():
            if (rel, key) in ALLOWED:
                continue
            for m in _release(value).finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{rel}:{line}: {key} {value} (read it: vlmpool.pins.{key}, or "
                             f"`python3 operator/vlmpool/pins.py {key}` in a script)")
    assert not found, "a pin spelled again:\n" + "\n".join(found)


def test_the_api_version_is_spelled_only_in_names_py():
    spellings = [names.API_VERSION, f'"{names.GROUP}"', f'"{names.VERSION}"',
                 f"{names.POOL_PLURAL}.{names.GROUP}", f"{names.ADAPTER_PLURAL}.{names.GROUP}"]
    found = []
    for p in _files():
        rel = p.relative_to(ROOT).as_posix()
        if rel in (NAMES_FILE, "tests/test_single_spelling.py") or rel.startswith("charts/"):
            continue  # the chart's templates cannot import Python (its generated parts come from the models)
        text = _text(p)
        for s in spellings:
            for m in re.finditer(re.escape(s), text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{rel}:{line}: {s} (import it from vlmpool.names)")
    assert not found, "an API name spelled again:\n" + "\n".join(found)


def test_scripts_read_pins_and_never_parse_source_files():
    """The hack/ scripts and the image build read a pin by running pins.py (plain stdlib, no venv), never
    by `sed` on a Python module, where a reformatting of the line would silently give an empty version."""
    scripts = sorted((ROOT / "hack").glob("*.sh")) + [ROOT / "images" / "build.sh"]
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in scripts for line in p.read_text().splitlines()
                 if re.search(r"\bsed\b.*operator/vlmpool/\S+\.py", line)]
    assert not offenders, "\n".join(offenders)
    readers = {p.name for p in scripts if "operator/vlmpool/pins.py" in p.read_text()}
    assert {"k8s-bins.sh", "epp.sh", "containerd-bins.sh", "vllm-env.sh", "node.sh", "build.sh"} <= readers


def test_allowed_exceptions_still_exist():
    """An ALLOWED entry whose file no longer names the release is stale: remove it."""
    for (rel, key), why in ALLOWED.items():
        assert _release(pins.PINS[key]).search(_text(ROOT / rel)), (rel, key, why)


def test_pins_py_runs_as_a_script_without_vlmpool():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-I", str(ROOT / PINS_FILE), "GIE_VERSION"], capture_output=True,
                         text=True, cwd="/", check=True)
    assert res.stdout == pins.GIE_VERSION + "\n"
    res = subprocess.run([sys.executable, "-I", str(ROOT / PINS_FILE)], capture_output=True, text=True, check=True)
    assert dict(line.split("=", 1) for line in res.stdout.splitlines()) == pins.PINS
