"""Input recompute: LoRA layers rebuild norm outputs and ``up * silu(gate)`` in backward, bit for bit."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lora_phi3 as lora
from lora_phi3.layers import enable_input_recompute, lora_layers
from tiny import assert_all_close, grads_of, randomize_lora, saved_bytes, tiny_phi3


# ------------------------------------------------------------------ input recompute
def _tiny_phi3_layer(seed=0):
    model = tiny_phi3(seed=seed, attn="sdpa", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=1, vocab_size=16)
    layer = model.model.layers[0]
    for p in layer.parameters():
        nn.init.normal_(p, 0, 0.1) if p.dim() == 2 else nn.init.uniform_(p, 0.5, 1.5)
    at, mlp = layer.self_attn, layer.mlp
    kw = dict(r=2, lora_alpha=4, lora_dropout=0.1)
    at.qkv_proj = lora.MergedLinear.from_linear(at.qkv_proj, enable_lora=[True] * 3, **kw)
    at.o_proj = lora.Linear.from_linear(at.o_proj, **kw)
    mlp.gate_up_proj = lora.MergedLinear.from_linear(mlp.gate_up_proj, enable_lora=[True] * 2, **kw)
    mlp.down_proj = lora.Linear.from_linear(mlp.down_proj, **kw)
    for m in lora_layers(layer).values():
        randomize_lora(m, 1, 0.2)
    lora.mark_only_lora_as_trainable(layer)
    x = torch.randn(2, 6, 32, requires_grad=True)
    pos = torch.arange(6)[None]
    kwargs = dict(attention_mask=None, position_ids=pos,
                  position_embeddings=model.model.rotary_emb(x, pos))
    return layer.train(), x, kwargs


def _lora_params(layer):
    return [p for m in lora_layers(layer).values() for p in m.adapter_params().values()]


def test_input_recompute_gives_identical_gradients_and_saves_less():
    layer, x, kw = _tiny_phi3_layer()
    g = 0.1 * torch.randn(2, 6, 32)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x] + _lora_params(layer)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    torch.manual_seed(3)
    before = saved_bytes(lambda: layer(x, **kw), params)
    plain = grads_of(lambda: layer(x, **kw), tensors, g)
    handles = enable_input_recompute(layer)
    assert len(handles) == 3  # two norms and gate_up_proj
    torch.manual_seed(3)
    after = saved_bytes(lambda: layer(x, **kw), params)
    recomputed = grads_of(lambda: layer(x, **kw), tensors, g)
    assert_all_close(recomputed, plain)
    # qkv and gate_up no longer keep the norm outputs, down no longer keeps up*silu(gate)
    assert before - after == 4 * (2 * 6 * 32 * 2 + 2 * 6 * 48), (before, after)
    for h in handles:
        h.remove()


def test_recompute_is_refused_when_the_input_was_modified_in_place():
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    layer = lora.Linear(8, 4, r=2, lora_dropout=0.2)
    randomize_lora(layer, 1, 0.3)
    h = torch.randn(5, 8, requires_grad=True)
    g = 0.1 * torch.randn(5, 4)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [h, layer.lora_A, layer.lora_B]

    def modified():
        y = norm(h)
        y.mul_(2.0)  # allowed by autograd (LayerNorm keeps no output), but y != norm(h) now
        return layer(y)
    want = grads_of(modified, tensors, g)  # no hooks: the layer saves y itself
    handles = enable_input_recompute(norm)
    got = grads_of(modified, tensors, g)  # hooks: the version counter must veto the recipe
    assert_all_close(got, want)
    unmodified = grads_of(lambda: layer(norm(h)), tensors, g)  # the recipe is used here
    for t in handles:
        t.remove()
    assert_all_close(unmodified, grads_of(lambda: layer(norm(h)), tensors, g))


class _SwiGLU(nn.Module):
    """A Phi-3-style MLP outside transformers; ``spelled_out`` writes SiLU as ``g * sigmoid(g)``,
    which the graph match must not take for ``F.silu``."""

    def __init__(self, spelled_out=False):
        super().__init__()
        self.gate_up_proj = lora.Linear(8, 12, r=2, lora_alpha=4, lora_dropout=0.1, bias=False)
        self.down_proj = lora.Linear(6, 8, r=2, lora_alpha=4, lora_dropout=0.1, bias=False)
        self.spelled_out = spelled_out
        randomize_lora(self.gate_up_proj, 1, 0.3)
        randomize_lora(self.down_proj, 2, 0.3)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act = gate * torch.sigmoid(gate) if self.spelled_out else F.silu(gate)
        return self.down_proj(up * act)


@pytest.mark.parametrize("spelled_out", [False, True])
def test_swiglu_recompute_outside_phi3(spelled_out):
    mlp = _SwiGLU(spelled_out)
    x = torch.randn(5, 8, requires_grad=True)
    g = 0.1 * torch.randn(5, 8)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x] + _lora_params(mlp)
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    before = saved_bytes(lambda: mlp(x), params)
    want = grads_of(lambda: mlp(x), tensors, g)
    handles = enable_input_recompute(mlp)
    after = saved_bytes(lambda: mlp(x), params)
    assert_all_close(grads_of(lambda: mlp(x), tensors, g), want)
    # the product (5, 6) fp32 is rebuilt instead of kept, only for a real F.silu
    assert before - after == (0 if spelled_out else 5 * 6 * 4)
    for h in handles:
        h.remove()


def test_fused_and_recompute_under_cpu_autocast():
    # The trainer runs the model under bf16 autocast: the fused path must agree with the plain
    # one, and recomputed norm outputs must be rebuilt under the same autocast state.
    layer, x, kw = _tiny_phi3_layer()
    g = 0.1 * torch.randn(2, 6, 32)
    tensors = [x] + _lora_params(layer)
    plain_dropout = [m for m in layer.modules() if isinstance(m, lora.LoRALayer)]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x, **kw).float()
    fused = grads_of(run, tensors, g)
    for m in plain_dropout:  # same layers through the plain autograd path
        m.lora_dropout = type("Plain", (nn.Dropout,), {})(m.lora_dropout.p)
    plain = grads_of(run, tensors, g)
    assert_all_close(fused, plain, atol=3e-2)
    for m in plain_dropout:
        m.lora_dropout = nn.Dropout(m.lora_dropout.p)
    handles = enable_input_recompute(layer)
    assert_all_close(grads_of(run, tensors, g), fused, atol=0)  # recompute: bit for bit
    for h in handles:
        h.remove()


class MatmulRMSNorm(nn.Module):
    """An RMSNorm whose mean of squares is a matmul, so autocast changes its output's values."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.register_buffer("avg", torch.full((d, 1), 1.0 / d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt((x * x) @ self.avg + 1e-6)


def test_norm_recompute_replays_the_autocast_state():
    torch.manual_seed(0)
    norm = MatmulRMSNorm(8)
    layer = lora.Linear(8, 4, r=2, lora_dropout=0.2)
    randomize_lora(layer, 1, 0.3)
    h = torch.randn(5, 8, requires_grad=True)
    g = 0.1 * torch.randn(5, 4)
    tensors = [h, layer.lora_A, layer.lora_B]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(norm(h)).float()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = norm(h)
        assert not torch.equal(under_autocast, norm(h))  # so a replay without autocast would differ
    want = grads_of(run, tensors, g)
    handles = enable_input_recompute(norm)
    params = {p.untyped_storage().data_ptr() for p in [*norm.parameters(), *layer.parameters()]}
    saved = saved_bytes(run, params)
    assert_all_close(grads_of(run, tensors, g), want, atol=0)  # bit for bit
    for t in handles:
        t.remove()
    saved_plain = saved_bytes(run, params)
    assert saved < saved_plain  # the recipe was used


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recompute_under_activation_checkpointing(use_reentrant):
    layer, x, kw = _tiny_phi3_layer()
    g = 0.1 * torch.randn(2, 6, 32)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x] + _lora_params(layer)
    plain = grads_of(lambda: layer(x, **kw), tensors, g)
    handles = enable_input_recompute(layer)
    ckpt = grads_of(lambda: checkpoint(lambda t: layer(t, **kw), x, use_reentrant=use_reentrant),
                tensors, g)
    assert_all_close(ckpt, plain)
    for h in handles:
        h.remove()
