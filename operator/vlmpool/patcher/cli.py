"""`vlmpool patch`: what the patch Job runs. Exit 0 on success (also when the version already
exists), 1 on a refusal, 2 on bad arguments; a JSON summary (<= 4 KiB) goes to stdout and to the
termination-message file either way.

`vlmpool patch prune` and `vlmpool patch cleanup` are what the prune and cleanup Jobs run: they
remove old versions, or the whole adapter, from the volume under the publish lock
(vlmpool.patcher.publish owns the layout). Exit 0 when done (also when there was nothing to remove),
1 on a refusal (an invalid adapter name, the lock held too long), with a JSON line on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.options import BY_DEST, DEFAULT_LOCK_TIMEOUT, OPTIONS, REQUIRED

FAMILY_CHOICES = BY_DEST["family"].choices  # the one family table (vlmpool/families.py), as --family offers it


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="volume_action", metavar="{prune,cleanup}",
                                help="instead of patching: maintain an adapter's directory on the volume")
    p = sub.add_parser("prune", help="remove an adapter's versions except the kept ones and `current`")
    p.add_argument("--root", dest="volume_root", required=True, type=Path, help="the adapter volume's mount path")
    p.add_argument("--adapter", dest="volume_adapter", required=True, help="adapter name")
    p.add_argument("--keep", action="append", default=[], metavar="VERSION", help="a version to keep (repeatable)")
    p.add_argument("--lock-timeout", dest="volume_lock_timeout", type=float, default=DEFAULT_LOCK_TIMEOUT,
                   help="seconds to wait for the publish lock (default 600)")
    c = sub.add_parser("cleanup", help="remove everything of an adapter from the volume")
    c.add_argument("--root", dest="volume_root", required=True, type=Path, help="the adapter volume's mount path")
    c.add_argument("--adapter", dest="volume_adapter", required=True, help="adapter name")
    c.add_argument("--lock-timeout", dest="volume_lock_timeout", type=float, default=DEFAULT_LOCK_TIMEOUT,
                   help="seconds to wait for the publish lock (default 600)")

    for option in OPTIONS:
        option.add_to(parser)


def run_volume_action(args: argparse.Namespace) -> int:
    import json

    from vlmpool.patcher.publish import cleanup, prune

    try:
        if args.volume_action == "prune":
            pruned = prune(args.volume_root, args.volume_adapter, args.keep, lock_timeout=args.volume_lock_timeout)
            out = {"ok": True, "kept": pruned.kept, "removed": pruned.removed}
        else:
            out = {"ok": True, "removed": cleanup(args.volume_root, args.volume_adapter,
                                                  lock_timeout=args.volume_lock_timeout)}
    except PatchError as e:
        print(json.dumps({"ok": False, "reason": e.reason, "message": e.message}))
        print(f"vlmpool patch {args.volume_action}: refused ({e.reason}): {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "volume_action", None):
        return run_volume_action(args)
    missing = [f"--{k.replace('_', '-')}" for k in REQUIRED if getattr(args, k) is None]
    if missing:
        print(f"vlmpool patch: the following arguments are required: {', '.join(missing)}", file=sys.stderr)
        return 2
    from vlmpool.patcher.api import (
        default_termination_log,
        failure_summary,
        fit_summary,
        patch_and_publish,
        write_termination_message,
    )
    from vlmpool.patcher.pipeline import PatchOptions

    term = args.termination_log if args.termination_log is not None else default_termination_log()
    try:
        opts = PatchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PatchOptions)})
        summary = patch_and_publish(args.source, args.adapter, args.root, opts, sha256=args.sha256,
                                    max_file_bytes=args.max_file_bytes, pvc_root=args.pvc_root,
                                    lock_timeout=args.lock_timeout, tensor_io=args.tensor_io,
                                    fetch_timeout=args.fetch_timeout)
        code = 0
    except PatchError as e:
        summary, code = failure_summary(e), 1
    except Exception as e:  # noqa: BLE001 - a bug still gets a structured summary
        summary, code = failure_summary(e), 1
        import traceback

        traceback.print_exc(file=sys.stderr)
    write_termination_message(term, summary)
    print(fit_summary(summary).decode())
    if code:
        print(f"vlmpool patch: refused ({summary['reason']}): {summary['message']}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="vlmpool patch")
    configure(p)
    sys.exit(run(p.parse_args()))
