"""The simulator's GPU LoRA slots (sim/engine.py): an LRU of max_loras adapters; a request whose adapter
is in no slot is admitted after an activation (a swap, counted, costing lora_activate_ms), one whose
adapter is still in a slot is not; a slot whose adapter runs is never the victim."""

from __future__ import annotations

import time

from vlmpool.sim.engine import Engine, Seq


def engine(max_loras: int = 2) -> Engine:
    return Engine(model_name="base", max_num_seqs=8, max_loras=max_loras, max_cpu_loras=8, max_lora_rank=16,
                  family="qwen2_5_vl", strict_layout=False, enable_lora=True)


async def run(e: Engine, lora: str) -> Seq:
    seq = Seq(request_id=lora, lora=lora)
    await e.acquire(seq)
    e.release(seq)
    return seq


async def test_activations_follow_an_lru_of_max_loras_slots():
    e = engine(max_loras=2)
    assert [(await run(e, n)).activated for n in ("a", "b", "a", "c", "a", "b")] == [
        True, True, False, True, False, True]  # c evicts b (a was used more recently), then b evicts c
    assert e.stats()["lora_activations"] == 4


async def test_a_running_adapter_keeps_its_slot_and_a_swap_costs_time():
    e = engine(max_loras=1)
    e.lora_activate_ms = 30.0
    hold = Seq(request_id="h", lora="a")
    await e.acquire(hold)  # "a" runs; "b" must wait for the batch to free its only LoRA slot
    t0 = time.monotonic()
    e.release(hold)
    seq = await run(e, "b")
    assert seq.activated and time.monotonic() - t0 >= 0.03
    assert not (await run(e, "b")).activated
