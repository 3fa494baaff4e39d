"""Smoke test of benchmarks/bench_dora.py: ``--tiny`` runs every row, prints both tables, and our
LoRA and DoRA agree with PEFT's (the script asserts that itself; checked here again). No timing
is asserted: the timings of a shared 2-core machine say nothing at these sizes."""

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dora.py"
_spec = importlib.util.spec_from_file_location("bench_dora", _PATH)
bd = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bd
_spec.loader.exec_module(bd)


@pytest.fixture(scope="module")
def tiny_run():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = bd.main(["--tiny"])
    return results, out.getvalue()


def test_tiny_run_prints_both_tables_with_every_row(tiny_run):
    results, printed = tiny_run
    assert "### Training step (forward + backward), time ratio" in printed
    assert "| layer | in→out | frozen ms | our lora/frozen | our dora/frozen |" in printed
    assert "### Kept for backward after the forward" in printed
    names = [name for name, *_ in bd.PROJECTIONS]
    assert list(results) == names
    for name in names:
        assert printed.count(f"| {name} |") == 2, name  # one row in each table
        row = results[name]
        assert row["our dora/our lora"] > 0 and row["our lora/frozen"] > 0
    assert "goal our dora/our lora <= 1.3" in printed


def test_tiny_run_ours_and_peft_agree(tiny_run):
    pytest.importorskip("peft")
    results, printed = tiny_run
    for name, _, _, enable, _ in bd.PROJECTIONS:
        diff = results[name]["disagreement"]
        if enable is None:  # whole projections have both PEFT contenders
            assert set(diff) == {"lora", "dora"}, name
            assert max(diff.values()) <= bd.AGREE_RTOL, (name, diff)
            assert f"{name}: our dora vs peft dora: max relative difference" in printed
            assert results[name]["peft dora/our dora"] is not None
        else:  # per-slice: PEFT has no equivalent
            assert diff == {} and results[name]["peft dora/our dora"] is None


def test_dora_keeps_more_than_lora_and_the_frozen_layer_keeps_nothing(tiny_run):
    results, _ = tiny_run
    for name, row in results.items():
        kept = row["kept"]
        assert kept["frozen"] == 0, name  # only the weight, a parameter
        assert kept["our dora"] > kept["our lora"] > 0, name


def test_a_different_function_is_caught():
    """The agreement check can fail: PEFT's magnitude nudged by 1% in one row."""
    import torch

    pytest.importorskip("peft")
    torch.manual_seed(0)
    models = bd.build(32, 48, None, None, r=4, alpha=8.0, peers=True)
    with torch.no_grad():
        bd._peft_layer(models["peft dora"]).lora_magnitude_vector["default"].weight[3] *= 1.01
    x, dy = torch.randn(1, 8, 32), torch.randn(1, 8, 48)
    diff = bd.disagreement(models, x, dy)
    assert diff["lora"] <= bd.AGREE_RTOL < diff["dora"]
