"""Regression guard for benchmarks/bench_memory.py: saved activations of a LoRA Phi-3 layer.

The count is deterministic, so it can be checked exactly. The config is Phi-3-mini's divided by 8
in every size (hidden 384, intermediate 1024, 4 heads of 96, T=32, r=2), so ratios match the full
layer's (docs/benchmarks.md has those).
"""

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
_spec = importlib.util.spec_from_file_location("bench_memory", _PATH)
bm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bm  # dataclasses look their module up there
_spec.loader.exec_module(bm)


@pytest.fixture(scope="module")
def measured():
    setup = bm.Setup.scaled(8)
    variants = ["frozen", "ours+recompute", "ours"] + (["peft"] if bm.have("peft") else [])
    return setup, bm.memory_table(setup, variants)


def test_scaled_setup_is_proportional():
    s = bm.Setup.scaled(8)
    assert (s.hidden, s.intermediate, s.heads, s.tokens, s.r) == (384, 1024, 4, 32, 2)
    assert s.alpha / s.r == 2.0 and s.dropout == 0.05


def test_fused_with_recompute_adds_only_o_input_masks_and_rank_r(measured):
    s, mem = measured
    T, H, I, r = s.tokens, s.hidden, s.intermediate, s.r
    o_input = T * H * 4  # the attention output copy o_proj reads (not kept by the frozen layer)
    masks = (3 * T * H + T * I) // 8  # 1 bit per adapter-input element: qkv, o, gate_up, down
    rank_r = T * (3 * r + r + 2 * r + r) * 4  # h of qkv (3 slices), o, gate_up (2 slices), down
    assert mem["ours+recompute"] - mem["frozen"] == o_input + masks + rank_r
    assert mem["ours+recompute"] / mem["frozen"] <= 1.08  # measured 1.073; issue target 1.10


def test_fused_without_recompute_keeps_the_norm_and_swiglu_outputs(measured):
    s, mem = measured
    T, H, I = s.tokens, s.hidden, s.intermediate
    assert mem["ours"] - mem["ours+recompute"] == 4 * (2 * T * H + T * I)
    assert mem["ours"] / mem["frozen"] <= 1.36  # measured 1.356


def test_beats_peft(measured):
    _, mem = measured
    if "peft" not in mem:
        pytest.skip("peft not installed")
    assert mem["peft"] / mem["frozen"] >= 1.6  # measured 1.687: a dropped-out copy per input
    assert mem["ours+recompute"] < mem["ours"] < mem["peft"]
