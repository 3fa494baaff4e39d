"""PiSSA / OLoRA initialisation math, checked densely and against PEFT itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lora_phi3.layers.data_init import olora_factors, parse_init_lora_weights, pissa_factors, to_original_base

OUT, IN, R, ALPHA = 40, 24, 4, 6  # alpha/r = 1.5: not a power of two, so op order shows in the bits

# PEFT warns that PiSSA/OLoRA mutate the base weights; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:.*changes the base weights:UserWarning")


def _scaling(use_rslora: bool) -> float:
    return ALPHA / math.sqrt(R) if use_rslora else ALPHA / R


def _base(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 3)).to(dtype)


def _ours(weight, init, scaling):
    kind, niter = parse_init_lora_weights(init)
    if kind == "olora":
        return olora_factors(weight, R, scaling)
    return pissa_factors(weight, R, scaling, niter=niter)


def _peft_init(model, init, use_rslora, monkeypatch=None):
    """Wrap ``model`` with PEFT; return the PeftModel, its LoRA layer and the RNG state
    PEFT's ``svd_lowrank`` call saw (PEFT draws kaiming inits before it, so a seed set
    beforehand does not reach the sketch unchanged)."""
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.layer as peft_layer

    seen = []
    if monkeypatch is not None:
        real = peft_layer.svd_lowrank

        def spy(*args, **kwargs):
            seen.append(torch.get_rng_state())
            return real(*args, **kwargs)

        monkeypatch.setattr(peft_layer, "svd_lowrank", spy)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=init, use_rslora=use_rslora)
    torch.manual_seed(1234)
    pm = peft.get_peft_model(model, cfg)
    if init.startswith("pissa_niter"):
        assert len(seen) == 1, "PEFT did not call svd_lowrank as expected"
        torch.set_rng_state(seen[0])
    return pm, pm.base_model.model[0]


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "value, expected",
    [("pissa", ("pissa", None)), ("pissa_niter_4", ("pissa", 4)), ("pissa_niter_16", ("pissa", 16)),
     ("olora", ("olora", None)), ("OLoRA", ("olora", None))],
)
def test_parse_ok(value, expected):
    assert parse_init_lora_weights(value) == expected


@pytest.mark.parametrize("value", ["pissa_niter_0", "pissa_niter_x", "pissa_niter_", "pissa_niter_-1", "loftq",
                                   "foo", "PISSA", "pissa_4", True, None])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match=r"init_lora_weights=.*expected 'pissa', 'pissa_niter_K'.*'olora'"):
        parse_init_lora_weights(value)


@pytest.mark.parametrize("fn", [pissa_factors, olora_factors])
def test_rank_too_large_or_zero(fn):
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"r=6 must be in \[1, min\(out, in\)=5\]"):
        fn(w, 6, 1.0)
    with pytest.raises(ValueError, match=r"r=0"):
        fn(w, 0, 1.0)


def test_non_float_weight_rejected():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pissa_factors(torch.ones(6, 5, dtype=torch.float64), 2, 1.0)


# ------------------------------------------------------------------ dense identity
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_residual_identity(init, dtype, atol):
    torch.manual_seed(3)
    w = (torch.randn(OUT, IN) * 0.2).to(dtype)
    s = _scaling(False)
    A, B, res = _ours(w, init, s)
    assert A.shape == (R, IN) and B.shape == (OUT, R) and res.shape == (OUT, IN)
    assert A.dtype == B.dtype == torch.float32 and res.dtype == dtype
    rebuilt = res.float() + s * B @ A
    torch.testing.assert_close(rebuilt, w.float(), atol=atol, rtol=0)
    # The adapter really carries the weight's leading part: a nonzero delta.
    assert (s * B @ A).abs().max() > 0.05


def test_pissa_is_best_rank_r():
    torch.manual_seed(4)
    w = torch.randn(OUT, IN)
    A, B, _ = pissa_factors(w, R, 0.5)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(0.5 * B @ A, U[:, :R] @ torch.diag(S[:R]) @ Vh[:R], atol=1e-5, rtol=0)
    # sqrt(S) split evenly: A A^T and B^T B are the same diagonal matrix.
    torch.testing.assert_close(A @ A.T, B.T @ B, atol=1e-5, rtol=1e-5)


def test_olora_b_orthonormal():
    torch.manual_seed(5)
    _, B, _ = olora_factors(torch.randn(OUT, IN), R, 2.0)
    torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ against PEFT
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_matches_peft_fp32(init, use_rslora, monkeypatch):
    model = _base()
    w = model[0].weight.detach().clone()
    _, layer = _peft_init(model, init, use_rslora, monkeypatch)  # restores the RNG state PEFT's sketch used
    s = _scaling(use_rslora)
    assert layer.scaling["default"] == s
    A, B, res = _ours(w, init, s)
    assert torch.equal(layer.lora_A["default"].weight, A)
    assert torch.equal(layer.lora_B["default"].weight, B)
    assert torch.equal(layer.base_layer.weight, res)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_matches_peft_bf16(init, monkeypatch):
    model = _base(torch.bfloat16)
    w = model[0].weight.detach().clone()
    _, layer = _peft_init(model, init, False, monkeypatch)
    A, B, res = _ours(w, init, _scaling(False))
    assert torch.equal(layer.base_layer.weight, res)
    # PEFT moves the fp32 factors to the base dtype, then autocasts them back to fp32.
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(layer.lora_A["default"].weight, A.to(torch.bfloat16).float())
    assert torch.equal(layer.lora_B["default"].weight, B.to(torch.bfloat16).float())


# ------------------------------------------------------------------ conversion back to the original base
@pytest.mark.parametrize("use_rslora", [False, True])
def test_to_original_base_identity(use_rslora):
    torch.manual_seed(6)
    w = torch.randn(OUT, IN) * 0.2
    s = _scaling(use_rslora)
    A0, B0, res = pissa_factors(w, R, s)
    A, B = A0 + 0.05 * torch.randn_like(A0), B0 + 0.05 * torch.randn_like(B0)
    A2, B2, r2, alpha2 = to_original_base(A, B, A0, B0, R, ALPHA, use_rslora)
    assert A2.shape == (2 * R, IN) and B2.shape == (OUT, 2 * R) and r2 == 2 * R
    s2 = alpha2 / math.sqrt(r2) if use_rslora else alpha2 / r2
    assert s2 == pytest.approx(s, rel=1e-12)
    torch.testing.assert_close(w + s2 * B2 @ A2, res + s * B @ A, atol=1e-5, rtol=0)


def test_to_original_base_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        to_original_base(torch.zeros(4, 5), torch.zeros(6, 4), torch.zeros(3, 5), torch.zeros(6, 3), 4, 8)
    with pytest.raises(ValueError, match="r=3 does not match"):
        to_original_base(torch.zeros(4, 5), torch.zeros(6, 4), torch.zeros(4, 5), torch.zeros(6, 4), 3, 8)


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", True)])
def test_to_original_base_matches_peft_save(tmp_path, init, use_rslora):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _base()
    w = model[0].weight.detach().clone()
    pm, layer = _peft_init(model, init, use_rslora)
    A0 = layer.lora_A["default"].weight.detach().clone()
    B0 = layer.lora_B["default"].weight.detach().clone()
    w_res = layer.base_layer.weight.detach().clone()
    # PEFT's documented recipe: save the init with init_lora_weights=True, tune, save converted.
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        layer.lora_A["default"].weight.add_(0.05 * torch.randn(A0.shape, generator=g))
        layer.lora_B["default"].weight.add_(0.05 * torch.randn(B0.shape, generator=g))
    A = layer.lora_A["default"].weight.detach().clone()
    B = layer.lora_B["default"].weight.detach().clone()
    pm.save_pretrained(str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    A2, B2, r2, alpha2 = to_original_base(A, B, A0, B0, R, ALPHA, use_rslora)
    saved = safetensors.load_file(str(tmp_path / "conv" / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.0.lora_A.weight"], A2)
    assert torch.equal(saved["base_model.model.0.lora_B.weight"], B2)
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert cfg["r"] == r2 == 2 * R
    assert cfg["lora_alpha"] == alpha2
    assert cfg["init_lora_weights"] is True
    s, s2 = _scaling(use_rslora), (alpha2 / math.sqrt(r2) if use_rslora else alpha2 / r2)
    torch.testing.assert_close(w + s2 * B2 @ A2, w_res + s * B @ A, atol=1e-5, rtol=0)
