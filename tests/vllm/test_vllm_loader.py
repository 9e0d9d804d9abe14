"""The pinned vLLM's own LoRA loader (vllm_loader.py, run in the pinned vLLM's cached venv) judges (1) the patcher's
output for every family: real PEFT adapters patched by the real `vlmpool patch`, each of whose kept tensors
must map to a language-model module of vLLM's model; (2) the simulator: on a corpus of good and bad
adapter directories its accept/refuse verdict (and message) must equal vLLM's; (3) the simulator's
model facts (expected modules, weight mapper) must equal those read from vLLM's model classes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corpus import CORPUS
from corpus import build as build_corpus

from vlmpool.families import FAMILIES as TABLE
from vlmpool.sim import adapters as sim_adapters
from vlmpool.sim import contract
from vlmpool.testing.adapters import FAMILIES, LANG_TARGETS, POOL_BASE, VISION_TARGETS, make_adapter, tiny_model

HERE = Path(__file__).parent
KINDS = ("lora", "partial", "legacy", "dora", "patterns", "tower", "all")
TOWER_MODULE = re.compile(r"^visual\.")


def _kinds(family: str) -> list[str]:
    """tower: only where the patcher keeps vision tensors for the family (Family.tower_lora_modules); all: only
    where the family serves more than the attention and MLP projections (Qwen3.5's linear attention)."""
    return [k for k in KINDS if (k != "tower" or TABLE[family].tower_lora_modules)
            and (k != "all" or list(TABLE[family].module_names) != LANG_TARGETS)]


def _architectures(family: str) -> dict:
    f = TABLE[family]
    return {"architecture": f.vllm_architecture, "text_architecture": f.vllm_text_architecture}


def _patterns_adapter(family: str, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(LANG_TARGETS), lora_dropout=0.0,
                     rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 64})
    pm = get_peft_model(tiny_model(family), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            vision = any(m in name for m in TABLE[family].vision_markers)
            if "lora_B" in name and not vision:  # trained language LoRA, untrained vision
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    data = json.loads((out / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = POOL_BASE[family]
    (out / "adapter_config.json").write_text(json.dumps(data))
    return out


def _sources(family: str, root: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    src = {
        "lora": make_adapter(family, root / "lora", targets=LANG_TARGETS + VISION_TARGETS[family]),
        "partial": make_adapter(family, root / "partial", targets=["q_proj", "v_proj"]),
        "dora": make_adapter(family, root / "dora", dora=True),
        "patterns": _patterns_adapter(family, root / "patterns"),
    }
    if "all" in _kinds(family):  # every language module the family serves (Qwen3.5: linear attention too)
        src["all"] = make_adapter(family, root / "all", targets=list(TABLE[family].module_names))
    if "tower" in _kinds(family):  # a trained vision-tower LoRA, patched for a pool with engine.towerConnectorLora
        src["tower"] = make_adapter(family, root / "tower", targets=LANG_TARGETS + VISION_TARGETS[family],
                                    train_vision=True)
    legacy = root / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((src["partial"] / "adapter_config.json").read_text())
    tensors = load_file(str(src["partial"] / "adapter_model.safetensors"))
    save_file({k.replace("model.language_model.layers.", "model.layers."): t for k, t in tensors.items()},
              str(legacy / "adapter_model.safetensors"))
    src["legacy"] = legacy
    return src


def _patch(family: str, kind: str, source: Path, root: Path) -> dict:
    """The real CLI, as the patch Job runs it."""
    adapter = f"{family.replace('_', '-')}-{kind}"
    cmd = [sys.executable, "-m", "vlmpool", "patch", "--source", str(source), "--adapter", adapter,
           "--root", str(root), "--pool-base", POOL_BASE[family], "--family", family, "--termination-log", ""]
    if kind == "dora":
        cmd += ["--dora-policy", "strip"]
    if kind == "tower":
        cmd += ["--tower-connector-lora"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def judged(vllm_python, tmp_path_factory):
    """Everything built, then judged by vLLM in one run (importing vLLM takes a while)."""
    root = tmp_path_factory.mktemp("vllm")
    cases, patched = [], {}
    for family in FAMILIES:
        for kind, source in _sources(family, root / "src" / family).items():
            summary = _patch(family, kind, source, root / "vol")
            patched[(family, kind)] = summary
            cases.append({"id": f"patched/{family}/{kind}", "family": family, "path": summary["path"],
                          "max_lora_rank": 64, "tower_connector_lora": kind == "tower"})
            cases.append({"id": f"source/{family}/{kind}", "family": family, "path": str(source), "max_lora_rank": 64})
    corpus = build_corpus(root / "corpus")
    cases += corpus
    for case in cases:
        case.update(_architectures(case["family"]))
    (root / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([vllm_python, str(HERE / "vllm_loader.py"), str(root / "cases.json")],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["by_id"] = {r["id"]: r for r in out["results"]}
    bugs = [r for r in out["results"] if r["ok"] is None]
    assert not bugs, bugs[0]["error"]
    out["patched"] = patched
    out["cases"] = {c["id"]: c for c in cases}
    return out


def test_the_pinned_release_is_installed(judged):
    assert judged["vllm"] == contract.VLLM_RELEASE


@pytest.mark.parametrize(("family", "kind"), [(f, k) for f in FAMILIES for k in _kinds(f)])
def test_patched_adapters_load_in_vllm_and_map_to_language_modules(judged, family, kind):
    r = judged["by_id"][f"patched/{family}/{kind}"]
    language_module = TABLE[family].vllm_layer_pattern()
    assert r["ok"], r["error"]
    summary = judged["patched"][(family, kind)]
    modules = r["modules"]
    # every kept tensor (an A/B pair per module) is one vLLM language-model module: none orphaned,
    # none in the vision tower, none dropped by vLLM
    assert len(modules) * 2 == summary["tensorsKept"] > 0
    tower = [m for m in modules if TOWER_MODULE.match(m)]
    stray = [m for m in modules if not language_module.match(m) and m not in tower]
    assert not stray, stray
    if kind == "tower":  # kept vision tensors land on vLLM's vision modules, which the family serves
        assert tower and all(sim_adapters.VISION_MODULES[family].match(m) for m in tower), tower
    else:
        assert not tower, tower
    if kind == "all":  # every served language module of every layer is one vLLM module
        assert {m.rsplit(".", 1)[-1] for m in modules} == set(TABLE[family].module_names)
    for name, (a, b, rank, _scaling) in modules.items():
        assert a[0] == rank and b[1] == rank, (name, a, b, rank)
    if kind == "patterns":  # per-module rank and alpha survive the key rewrite, as vLLM reads them
        q = [v for m, v in modules.items() if m.endswith("q_proj")]
        vv = [v for m, v in modules.items() if m.endswith("v_proj")]
        o = [v for m, v in modules.items() if m.endswith("o_proj")]
        assert q and all(v[2] == 4 and v[3] == pytest.approx(16 / 4) for v in q)
        assert vv and all(v[2] == 8 and v[3] == pytest.approx(64 / 8) for v in vv)
        assert o and all(v[2] == 8 and v[3] == pytest.approx(16 / 8) for v in o)


def test_unpatched_sources_show_what_the_patcher_fixes(judged):
    # DoRA is refused by vLLM; the patched (strip) output loads (above)
    assert not judged["by_id"]["source/qwen2_vl/dora"]["ok"]
    assert "vLLM does not yet support DoRA." in judged["by_id"]["source/qwen2_vl/dora"]["error"]
    # a legacy-layout Qwen3-VL adapter loads but maps to no module: vLLM would serve the bare base model
    legacy3 = judged["by_id"]["source/qwen3_vl/legacy"]
    language_module = TABLE["qwen3_vl"].vllm_layer_pattern()
    assert legacy3["ok"] and legacy3["modules"] and not any(language_module.match(m) for m in legacy3["modules"])


# What the class scan (vllm_loader.model_facts) finds that the live model of the family's checkpoints does not
# build: MistralDecoderLayer makes its ada_rms_norm_t_cond Sequential (linears 0 and 2) only when the config
# sets ada_rms_norm_t_cond (Voxtral-style checkpoints), which Mistral-Small-3.1/3.2 do not.
SCAN_EXTRAS = {"mistral3": {"0", "2"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_simulator_model_facts_are_vllm_s(judged, family):
    facts = judged["families"][family]
    fam = sim_adapters.family(family)
    assert set(fam.expected_modules) == set(facts["expected"]) - SCAN_EXTRAS.get(family, set()), facts
    assert [list(p) for p in TABLE[family].weights_mapper] == [list(p) for p in facts["mapper"].items()]
    # the simulator applies the mapper as vLLM's rename mapper does: entries mapping to None left out
    assert dict(fam.prefix_map) == {k: v for k, v in facts["mapper"].items() if v is not None}
    assert facts["architecture"] == fam.architecture == TABLE[family].vllm_architecture


def _normalise(message: str) -> str:
    # vLLM prints expected_lora_modules as a Python set (hash order); the simulator sorts it
    def sort_set(m: re.Match) -> str:
        return "{" + ", ".join(sorted(x.strip() for x in m.group(1).split(","))) + "}"
    return re.sub(r"(?<=expected target modules in )\{(.*?)\}", sort_set, message)


def _sim_verdict(case: dict) -> tuple[bool, int | None, str]:
    try:
        info = sim_adapters.validate_adapter("x", case["path"], max_lora_rank=case["max_lora_rank"],
                                             family_name=case["family"], strict_layout=False,
                                             shape_check="off")
    except sim_adapters.AdapterError as e:
        return False, e.status, e.reason
    return True, None, ",".join(info.modules)


@pytest.mark.parametrize("cid", [c[0] for c in CORPUS])
def test_simulator_verdict_equals_vllm_s(judged, cid):
    """The simulator in its vLLM-faithful settings (no layout extra, no rank-vs-config shape check)."""
    case = judged["cases"][f"corpus/{cid}"]
    v = judged["by_id"][f"corpus/{cid}"]
    ok, status, detail = _sim_verdict(case)
    assert ok == v["ok"], f"sim {'accepts' if ok else 'refuses'} ({detail}); vLLM: {v.get('error') or 'accepts'}"
    if ok:
        assert detail.split(",") == sorted(v["modules"])  # same vLLM module names after the mapper
    elif v["error"].startswith("FileNotFoundError"):
        assert status == 404  # LoRAAdapterNotFoundError
    else:
        assert status == 500 and _normalise(detail) == _normalise(v["error"])


def test_corpus_records_what_vllm_did(judged):
    """The corpus's verdict column is what the pinned vLLM really does (a moved pin shows up here)."""
    wrong = {cid: judged["by_id"][f"corpus/{cid}"].get("error") for cid, _f, verdict, _kw in CORPUS
             if judged["by_id"][f"corpus/{cid}"]["ok"] != (verdict == "ok")}
    assert not wrong, wrong
