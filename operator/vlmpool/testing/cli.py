"""``vlmpool testing``: make the test material the real engine needs, here, with nothing downloaded.

* ``vlmpool testing make-model DIR [--seed N]``: a tiny Qwen2.5-VL that real vLLM serves
  (:mod:`vlmpool.testing.vlm_model`: random bf16 weights, tokenizer, chat template, processor).
* ``vlmpool testing make-adapter DIR --model MODEL_DIR [--rank R] [--seed N]``: a PEFT LoRA adapter for it
  (:func:`vlmpool.testing.adapters.make_adapter`), q/k/v/o/gate/up/down.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="testing_command", metavar="WHAT", required=True)
    m = sub.add_parser("make-model", help="write a tiny Qwen2.5-VL (random weights) that real vLLM serves")
    m.add_argument("dir", help="directory to write (created)")
    m.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    a = sub.add_parser("make-adapter", help="write a PEFT LoRA adapter for a model made by make-model")
    a.add_argument("dir", help="directory to write (created)")
    a.add_argument("--model", required=True, help="the model directory (make-model's output)")
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    if args.testing_command == "make-model":
        from vlmpool.testing.vlm_model import make_model

        print(make_model(args.dir, seed=args.seed))
        return 0
    from vlmpool.testing.adapters import make_adapter

    if args.rank < 1:
        print("vlmpool testing make-adapter: --rank must be >= 1", file=sys.stderr)
        return 2
    print(make_adapter("qwen2_5_vl", args.dir, r=args.rank, alpha=2 * args.rank, seed=args.seed,
                       model_dir=args.model, base_name=args.model))
    return 0
