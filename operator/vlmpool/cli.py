"""The `vlmpool` console script.

Each subcommand lives in its own module that exposes ``configure(parser)`` (adds its arguments) and
``run(args) -> int``. Modules are imported only when their subcommand is registered, and a module
must keep heavy imports (torch, kopf) inside ``run`` so that ``vlmpool --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from vlmpool import __version__

# name -> (module, one-line help). A subcommand is offered only when its module is present.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("vlmpool.sim.cli", "run the vLLM simulator: vLLM's HTTP contract on CPU, runtime LoRA included"),
    "proxy": ("vlmpool.proxy.cli", "run the OpenAI-compatible proxy in front of a pod's vLLM"),
    "patch": ("vlmpool.patcher.cli", "turn a PEFT LoRA/DoRA adapter into a vLLM-ready version and publish it"),
    "operator": ("vlmpool.controller.cli", "run the Kubernetes operator (kopf)"),
    "dev": ("vlmpool.localcluster.cli", "run the whole system on this machine, no Docker needed"),
    "crds": ("vlmpool.api.crdgen", "write the CRD YAML generated from the typed models"),
    "testing": ("vlmpool.testing.cli", "make test material here: a tiny real VLM that vLLM serves, adapters for it"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (the subcommand about to run) only that subcommand's module is
    imported, so `vlmpool patch` does not pay for the operator's or the CRD generator's imports."""
    parser = argparse.ArgumentParser(
        prog="vlmpool",
        description="vlmpool: pools of vision-language models on vLLM, many LoRA adapters per pool.",
    )
    parser.add_argument("--version", action="version", version=f"vlmpool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if command in SUBCOMMANDS and name != command:
            sub.add_parser(name, help=help_text, description=help_text)  # listed, never run: not imported
            continue
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
