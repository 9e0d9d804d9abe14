"""Issue #11 item 7: hostile adapter_config.json. Non-finite numbers, absurd values, giant containers,
deep nesting and regular-expression bombs in rank_pattern are refused as InvalidConfig (never an
InternalError), nothing is published, and what is published is always strict JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmpool.patcher import PatchError, PatchOptions, patch_and_publish
from vlmpool.testing.adapters import write_lora

FAM = "qwen2_5_vl"
BASE = "Qwen/Qwen2.5-VL-3B-Instruct"


def _strict(text: str):
    def bad(name):
        raise ValueError(f"non-finite {name}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture
def adapter(tmp_path) -> Path:
    return write_lora(tmp_path / "src", base=BASE)


def _set_config_text(adapter: Path, text: str) -> None:
    (adapter / "adapter_config.json").write_text(text)


def _config_with(adapter: Path, raw_value: str, field: str = "lora_alpha") -> str:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[field] = "__X__"
    return json.dumps(cfg).replace('"__X__"', raw_value)


def _refused(adapter: Path, tmp_path: Path, match: str, reason: str = "InvalidConfig") -> PatchError:
    with pytest.raises(PatchError) as ei:
        patch_and_publish(str(adapter), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=BASE))
    assert ei.value.reason == reason, ei.value
    assert match in ei.value.message, ei.value.message
    versions = tmp_path / "vol" / "ad" / "versions"
    assert not versions.exists() or not any(versions.iterdir())
    return ei.value


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_alpha_is_invalid_config(adapter, tmp_path, raw):
    _set_config_text(adapter, _config_with(adapter, raw))
    _refused(adapter, tmp_path, f"holds the non-finite number {raw}")


@pytest.mark.parametrize("field", ["r", "lora_alpha", "lora_dropout"])
def test_numbers_that_overflow_to_infinity_are_invalid_config(adapter, tmp_path, field):
    _set_config_text(adapter, _config_with(adapter, "1e999", field))
    _refused(adapter, tmp_path, "overflows to infinity")


def test_non_finite_anywhere_is_refused(adapter, tmp_path):
    # a field the patcher does not read still ends up in the published config
    _set_config_text(adapter, _config_with(adapter, "[1, NaN]", "loftq_config"))
    _refused(adapter, tmp_path, "non-finite number NaN")


@pytest.mark.parametrize("field, raw, match", [
    ("r", str(10 ** 30), "rank 'r' must be a positive integer of at most 65536"),
    ("r", "-8", "rank 'r' must be a positive integer"),
    ("r", "8.5", "rank 'r' must be a positive integer"),
    ("r", "9" * 5000, "not valid JSON"),  # over Python's int digit limit
    ("lora_alpha", "-16", "lora_alpha must be a positive number"),
    ("lora_alpha", "0", "lora_alpha must be a positive number"),
    ("lora_alpha", "1e300", "lora_alpha must be a positive number of at most 1e+06"),
    ("lora_alpha", "true", "lora_alpha must be a positive number"),
    ("rank_pattern", '{"q_proj": 1e20}', "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", '{"q_proj": -4}', "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", '[4]', "rank_pattern must be an object"),
    ("alpha_pattern", '{"q_proj": -1}', "alpha_pattern['q_proj'] must be a positive number"),
    ("rank_pattern", '{"(": 4}', "is not a valid regular expression"),
])
def test_absurd_values_are_invalid_config(adapter, tmp_path, field, raw, match):
    _set_config_text(adapter, _config_with(adapter, raw, field))
    _refused(adapter, tmp_path, match)


def test_giant_list_is_invalid_config(adapter, tmp_path):
    _set_config_text(adapter, _config_with(adapter, json.dumps(["q_proj"] * 100_000), "target_modules"))
    _refused(adapter, tmp_path, "a list or object of 100000 entries (at most 4096)")


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deep_nesting_is_invalid_config(adapter, tmp_path, depth):
    # 40: parses, refused by the depth check; 100000: the parser itself would recurse too deeply
    _set_config_text(adapter, _config_with(adapter, "[" * depth + "]" * depth, "extra"))
    _refused(adapter, tmp_path, "nested too deeply")


def test_slow_rank_pattern_regex_is_cut_short(adapter, tmp_path, monkeypatch):
    """rank_pattern keys are the author's regular expressions, matched (as vLLM does) with the regex module,
    under a timeout. The regex module defuses the classic catastrophic patterns on names this short, so
    the timeout is lowered to below what this backtracking-heavy key needs (~10 ms)."""
    from vlmpool.patcher import config_checks

    monkeypatch.setattr(config_checks, "PATTERN_TIMEOUT", 1e-6)
    _set_config_text(adapter, _config_with(adapter, json.dumps({"(([a-z_.]|[a-z_])+)+[0-9]j": 4}), "rank_pattern"))
    _refused(adapter, tmp_path, "takes too long to match module names")


def test_the_cli_reports_invalid_config_not_internal_error(adapter, tmp_path):
    _set_config_text(adapter, _config_with(adapter, "NaN"))
    done = subprocess.run([sys.executable, "-m", "vlmpool", "patch", "--source", str(adapter), "--adapter", "ad",
                           "--root", str(tmp_path / "vol"), "--pool-base", BASE, "--family", FAM,
                           "--termination-log", str(tmp_path / "term")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    summary = _strict((tmp_path / "term").read_text())
    assert summary["reason"] == "InvalidConfig" and "NaN" in summary["message"]
    assert "Traceback" not in done.stderr


def test_published_config_is_strict_json(adapter, tmp_path):
    s = patch_and_publish(str(adapter), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=BASE))
    cfg = _strict((Path(s["path"]) / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16
    _strict((Path(s["path"]) / "patch_report.json").read_text())
