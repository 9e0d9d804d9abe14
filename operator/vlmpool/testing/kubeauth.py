"""A counting exec credential plugin for tests of credential renewal.

:func:`write_exec_plugin` writes a script that kubeconfigs name as their user's ``exec`` command. Each run
appends a line to a counter file and prints an ExecCredential whose ``expirationTimestamp`` lies
``lifetime`` seconds ahead; the token is ``<prefix><n>`` for the n-th run, or, when a token directory is
given, the content of its file ``<n>`` (tests mint real ServiceAccount tokens there in advance).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SCRIPT = r'''#!{python}
import datetime, json, os, pathlib, sys, time
counter = pathlib.Path({counter!r})
with counter.open("a") as f:
    f.write(f"{{time.time()}}\n")
n = len(counter.read_text().splitlines())
info = json.loads(os.environ.get("KUBERNETES_EXEC_INFO") or "{{}}")
if info.get("apiVersion") != "client.authentication.k8s.io/v1":
    sys.exit("no KUBERNETES_EXEC_INFO of client.authentication.k8s.io/v1")
tokens = {tokens!r}
if tokens:
    path = pathlib.Path(tokens) / str(n)
    if not path.exists():
        sys.exit(f"no token {{n}} minted")
    token = path.read_text().strip()
else:
    token = f"{prefix}{{n}}"
exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds={lifetime})
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {{"token": token, "expirationTimestamp": exp.strftime("%Y-%m-%dT%H:%M:%SZ")}}}}))
'''


def write_exec_plugin(directory: Path, *, lifetime: float = 5.0, prefix: str = "exec-token-",
                      tokens: Path | None = None) -> tuple[Path, Path]:
    """Write the plugin into `directory`; returns (script, counter file)."""
    directory.mkdir(parents=True, exist_ok=True)
    script, counter = directory / "exec-plugin.py", directory / "exec-plugin.count"
    counter.write_text("")
    script.write_text(SCRIPT.format(python=sys.executable, counter=str(counter), lifetime=int(lifetime),
                                    prefix=prefix, tokens=str(tokens) if tokens else ""))
    script.chmod(0o755)
    return script, counter


def runs(counter: Path) -> int:
    """How many times the plugin ran."""
    return len(counter.read_text().splitlines())


def exec_user(script: Path) -> dict[str, Any]:
    """A kubeconfig ``user`` section that runs `script`."""
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(script),
                     "interactiveMode": "Never"}}
