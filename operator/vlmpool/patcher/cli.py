"""`vlmpool patch`: what the patch Job runs. Exit 0 on success (also when the version already
exists), 1 on a refusal, 2 on bad arguments; a JSON summary (<= 4 KiB) goes to stdout and to the
termination-message file either way.

`vlmpool patch prune` and `vlmpool patch cleanup` are what the prune and cleanup Jobs run: they
remove old versions, or the whole adapter, from the volume under the publish lock
(vlmpool.patcher.publish owns the layout). Exit 0 when done (also when there was nothing to remove),
1 on a refusal (an invalid adapter name, the lock held too long), with a JSON line on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmpool.families import VLM_FAMILIES
from vlmpool.patcher.errors import PatchError

FAMILY_CHOICES = VLM_FAMILIES  # the one family table (vlmpool/families.py)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 1")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number")
    return v


# Options of the patch itself; not argparse-required, so that `vlmpool patch prune …` parses.
REQUIRED = ("source", "adapter", "root", "pool_base", "family")


def configure(parser: argparse.ArgumentParser) -> None:
    from vlmpool.patcher.families import DEFAULT_KEY_TEMPLATE
    from vlmpool.patcher.fetch import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_FILE_BYTES

    sub = parser.add_subparsers(dest="volume_action", metavar="{prune,cleanup}",
                                help="instead of patching: maintain an adapter's directory on the volume")
    p = sub.add_parser("prune", help="remove an adapter's versions except the kept ones and `current`")
    p.add_argument("--root", dest="volume_root", required=True, type=Path, help="the adapter volume's mount path")
    p.add_argument("--adapter", dest="volume_adapter", required=True, help="adapter name")
    p.add_argument("--keep", action="append", default=[], metavar="VERSION", help="a version to keep (repeatable)")
    p.add_argument("--lock-timeout", dest="volume_lock_timeout", type=float, default=600.0,
                   help="seconds to wait for the publish lock (default 600)")
    c = sub.add_parser("cleanup", help="remove everything of an adapter from the volume")
    c.add_argument("--root", dest="volume_root", required=True, type=Path, help="the adapter volume's mount path")
    c.add_argument("--adapter", dest="volume_adapter", required=True, help="adapter name")
    c.add_argument("--lock-timeout", dest="volume_lock_timeout", type=float, default=600.0,
                   help="seconds to wait for the publish lock (default 600)")

    parser.add_argument("--source", help="adapter source: a path, file:///path, pvc://claim/path, "
                        "https://host/adapter.tar.gz (.tar/.tgz/.zip) or https://host/dir/, hf://org/repo[@rev], "
                        "s3://bucket/prefix")
    parser.add_argument("--adapter", help="adapter name (the VLMAdapter's metadata.name)")
    parser.add_argument("--root", type=Path, help="the adapter volume's mount path")
    parser.add_argument("--pool-base", help="the pool's base model id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    parser.add_argument("--family", choices=FAMILY_CHOICES, help="the pool's model family")
    parser.add_argument("--served-base", default=None,
                        help="the pool's served model name (also accepted by the base check)")
    parser.add_argument("--max-rank", type=_positive_int, default=64, help="the pool's max LoRA rank (default 64)")
    parser.add_argument("--dora-policy", choices=("reject", "strip", "svd"), default="reject",
                        help="what to do with a DoRA adapter (default reject)")
    parser.add_argument("--svd-rank", type=_positive_int, default=None,
                        help="rank of the LoRA made by --dora-policy svd (default min(r, --max-rank))")
    parser.add_argument("--dora-max-error", type=float, default=None,
                        help="refuse (DoraErrorTooHigh) a strip/svd whose measured relative error is above this; "
                        "an unmeasured one is refused too (DoraErrorNotMeasured)")
    parser.add_argument("--base-weights", type=Path, default=None,
                        help="directory of the base model's *.safetensors "
                        "(needed by svd; lets strip measure its error)")
    parser.add_argument("--base-check", choices=("strict", "warn"), default="strict",
                        help="base_model_name_or_path vs the pool's base: strict fails, warn records (default strict)")
    parser.add_argument("--sha256", default=None, help="pin: sha256 of the archive, or of adapter_model.safetensors")
    parser.add_argument("--max-file-bytes", type=_positive_int, default=DEFAULT_MAX_FILE_BYTES,
                        help=f"largest file accepted (default {DEFAULT_MAX_FILE_BYTES})")
    parser.add_argument("--fetch-timeout", type=_positive_float, default=DEFAULT_FETCH_TIMEOUT,
                        help="seconds a remote (https, hf, s3) fetch may take in all, however slowly its bytes arrive; "
                        f"then FetchTimeout (default {DEFAULT_FETCH_TIMEOUT:g})")
    parser.add_argument("--declared-variant", default=None,
                        help="base variant a registry declares (advisory: a disagreement with the file is a warning)")
    parser.add_argument("--pvc-root", type=Path, default=Path("/mnt/sources"),
                        help="where pvc://<claim>/ sources are mounted, as <pvc-root>/<claim> (default /mnt/sources)")
    parser.add_argument("--vision-norm-threshold", type=float, default=0.0,
                        help="refuse when a dropped vision-tower lora_B has a norm above this (default 0.0)")
    parser.add_argument("--key-template", default=DEFAULT_KEY_TEMPLATE,
                        help=f"output key of a language-layer tensor (default {DEFAULT_KEY_TEMPLATE})")
    parser.add_argument("--svd-method", choices=("auto", "exact", "randomized"), default="auto",
                        help="truncated SVD of --dora-policy svd: exact, randomized (seeded), or auto (exact on a GPU "
                        "or for small matrices, randomized otherwise)")
    parser.add_argument("--tower-connector-lora", action="store_true",
                        help="the pool's vLLM runs with --enable-tower-connector-lora: keep the LoRA tensors of the "
                        "vision tower and connector modules vLLM serves for the family (default: drop untrained "
                        "ones, refuse trained ones)")
    parser.add_argument("--device", default=None, help="torch device for the DoRA math (default: cuda when available)")
    parser.add_argument("--tensor-io", choices=("bytes", "torch"), default="bytes",
                        help="how the adapter's tensors are read and written: bytes (the safetensors header and byte "
                        "ranges, no torch unless DoRA maths is needed; default) or torch (load_file/save; same output, "
                        "kept to compare with)")
    parser.add_argument("--lock-timeout", type=float, default=600.0, help="seconds to wait for the publish lock")
    parser.add_argument("--termination-log", default=None,
                        help="file for the JSON summary (default /dev/termination-log when it exists)")


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
        opts = PatchOptions(
            family=args.family, pool_base=args.pool_base, served_base=args.served_base, max_rank=args.max_rank,
            dora_policy=args.dora_policy, svd_rank=args.svd_rank, base_weights=args.base_weights,
            base_check=args.base_check, declared_variant=args.declared_variant,
            vision_norm_threshold=args.vision_norm_threshold, key_template=args.key_template, device=args.device,
            svd_method=args.svd_method, tower_connector_lora=args.tower_connector_lora,
            dora_max_error=args.dora_max_error,
        )
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
