"""The proxy's shape: routes attach to the request pipeline and never import the module that wires them
(server.py), so no route and the wiring import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import vlmpool.proxy

PROXY = Path(vlmpool.proxy.__file__).parent
WIRING = {"server", "cli"}  # server.py wires the parts; cli.py runs it


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # from .x import y / from . import x
                out |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod.startswith("vlmpool.proxy."):
                out.add(mod.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("vlmpool.proxy.")}
    return out


def test_no_part_of_the_proxy_imports_its_wiring():
    offenders = {p.stem: _imports(p) & WIRING for p in PROXY.glob("*.py") if p.stem not in WIRING}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_routes_attach_to_the_pipeline():
    for route in ("routes_openai", "crop_describe"):
        assert "pipeline" in _imports(PROXY / f"{route}.py"), route
