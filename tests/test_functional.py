"""The fused LoRA autograd path against the plain autograd path and dense references.

Every comparison runs in fp32 with dropout on and a fixed seed: on CPU the fused path draws its
mask with ``torch.native_dropout``, which consumes the generator exactly as ``F.dropout`` does, so
the references below apply ``F.dropout`` after the same ``torch.manual_seed``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lora_phi3 as lora
from lora_phi3.layers.functional import enable_input_recompute, lora_linear, pack_mask, unpack_mask

ATOL = 1e-5


def _fill(layer, seed=1, scale=0.3):
    """Non-zero A and B (with B = 0 every gradient check on A would pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _run(fn, tensors, grad_out, seed=7):
    for t in tensors:
        t.grad = None
    torch.manual_seed(seed)
    y = fn()
    y.backward(grad_out)
    return [y.detach()] + [t.grad.clone() for t in tensors]


def _assert_all_close(got, want, atol=ATOL):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ------------------------------------------------------------------ mask packing
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 11)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


# ------------------------------------------------------------------ fused == plain == dense
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_fused_matches_dense_reference_with_dropout(bias, fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.Linear(12, 9, r=3, lora_alpha=6, lora_dropout=0.25, bias=bias,
                        fan_in_fan_out=fan_in_fan_out)
    _fill(layer)
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = 0.1 * torch.randn(2, 5, 9)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, layer.lora_A, layer.lora_B]
    W = layer.weight.T if fan_in_fan_out else layer.weight
    b = layer.bias if bias else 0

    def dense():  # written out: x W^T + b + s * dropout(x) (B A)^T
        return x @ W.T + b + 2.0 * F.dropout(x, 0.25, True) @ (layer.lora_B @ layer.lora_A).T
    fused = _run(lambda: layer(x), tensors, g)
    _assert_all_close(fused, _run(dense, tensors, g))
    assert layer(x).grad_fn.name() == "LoRALinearFunctionBackward"


def test_linear_fused_matches_plain_path_including_weight_and_bias_grads():
    torch.manual_seed(0)
    layer = lora.Linear(10, 6, r=2, lora_alpha=4, lora_dropout=0.3)
    _fill(layer)
    layer.weight.requires_grad_(True)  # full fine-tuning of the base too
    x = torch.randn(4, 3, 10, requires_grad=True)
    g = 0.1 * torch.randn(4, 3, 6)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, layer.weight, layer.bias, layer.lora_A, layer.lora_B]
    args = lambda fused: lambda: lora_linear(x, layer.weight, layer.bias, layer.lora_A,  # noqa: E731
                                             layer.lora_B, layer.scaling, 0.3, fused=fused)
    _assert_all_close(_run(args(True), tensors, g), _run(args(False), tensors, g))


@pytest.mark.parametrize("enable,splits", [([True, False, True], [4, 2, 3]),  # a GEMM per slice
                                           ([True, True, True], None),  # one batched GEMM
                                           ([True, False, True], None),  # batched, strided
                                           ([False, True], [5, 4])])
def test_merged_linear_fused_matches_dense_reference_with_dropout(enable, splits):
    torch.manual_seed(0)
    layer = lora.MergedLinear(8, 9, r=2, lora_alpha=6, lora_dropout=0.2, enable_lora=enable,
                              split_sizes=splits, bias=False)
    _fill(layer)
    x = torch.randn(3, 4, 8, requires_grad=True)
    g = 0.1 * torch.randn(3, 4, 9)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, layer.lora_A, layer.lora_B]
    sizes = splits or [9 // len(enable)] * len(enable)

    def dense():  # delta W written block by block from the stacked A and B
        A, B, rows, a0, b0 = layer.lora_A, layer.lora_B, [], 0, 0
        for on, size in zip(enable, sizes):
            if on:
                rows.append(B[b0:b0 + size] @ A[a0:a0 + 2])
                a0, b0 = a0 + 2, b0 + size
            else:
                rows.append(torch.zeros(size, 8))
        delta = torch.cat(rows) * 3.0
        return x @ layer.weight.T + F.dropout(x, 0.2, True) @ delta.T
    _assert_all_close(_run(lambda: layer(x), tensors, g), _run(dense, tensors, g))


def test_eval_mode_has_no_dropout_and_equals_merged():
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_alpha=2, lora_dropout=0.5, merge_weights=False)
    _fill(layer)
    layer.eval()
    x = torch.randn(7, 6)
    expected = x @ (layer.weight + layer.lora_B @ layer.lora_A).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer(x), layer(x))  # deterministic: no dropout
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_custom_dropout_module_takes_the_plain_path():
    class MyDropout(nn.Dropout):
        pass
    layer = lora.Linear(6, 5, r=2, lora_dropout=0.1)
    layer.lora_dropout = MyDropout(0.1)
    y = layer(torch.randn(3, 6, requires_grad=True))
    assert y.grad_fn.name() != "LoRALinearFunctionBackward"


def test_saves_x_once_packed_mask_and_rank_r_intermediate():
    layer = lora.Linear(64, 32, r=4, lora_dropout=0.1, bias=False)
    x = torch.randn(16, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    acts = sorted((tuple(t.shape), t.dtype) for t in saved if t.data_ptr() not in params)
    assert acts == sorted([((16, 64), torch.float32), ((16, 4), torch.float32),
                           ((16 * 64 // 8,), torch.uint8)])
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a dropped-out copy


# ------------------------------------------------------------------ dtypes
def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    layer = lora.MergedLinear.from_linear(base, r=2, lora_alpha=4, lora_dropout=0.1,
                                          enable_lora=[True, False, True], lora_dtype=torch.float32)
    _fill(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    g = 0.1 * torch.randn(3, 12, dtype=torch.bfloat16)
    tensors = [x, layer.lora_A, layer.lora_B]
    fused = _run(lambda: layer(x), tensors, g)
    plain = _run(lambda: lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                     layer.scaling, 0.1, layer.lora_slices, fused=False), tensors, g)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    _assert_all_close(fused, plain, atol=2e-2)


# ------------------------------------------------------------------ input recompute
def _tiny_phi3_layer(seed=0):
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

    cfg = Phi3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                     num_key_value_heads=4, num_hidden_layers=1, vocab_size=16, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = Phi3DecoderLayer(cfg, 0)
    for p in layer.parameters():
        nn.init.normal_(p, 0, 0.1) if p.dim() == 2 else nn.init.uniform_(p, 0.5, 1.5)
    at, mlp = layer.self_attn, layer.mlp
    kw = dict(r=2, lora_alpha=4, lora_dropout=0.1)
    at.qkv_proj = lora.MergedLinear.from_linear(at.qkv_proj, enable_lora=[True] * 3, **kw)
    at.o_proj = lora.Linear.from_linear(at.o_proj, **kw)
    mlp.gate_up_proj = lora.MergedLinear.from_linear(mlp.gate_up_proj, enable_lora=[True] * 2, **kw)
    mlp.down_proj = lora.Linear.from_linear(mlp.down_proj, **kw)
    for m in (at.qkv_proj, at.o_proj, mlp.gate_up_proj, mlp.down_proj):
        _fill(m, scale=0.2)
    lora.mark_only_lora_as_trainable(layer)
    x = torch.randn(2, 6, 32, requires_grad=True)
    pos = torch.arange(6)[None]
    kwargs = dict(attention_mask=None, position_ids=pos,
                  position_embeddings=Phi3RotaryEmbedding(cfg)(x, pos))
    return layer.train(), x, kwargs


def _lora_params(layer):
    return [p for n, p in layer.named_parameters() if "lora_" in n]


def _saved_bytes(fn, exclude):
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_input_recompute_gives_identical_gradients_and_saves_less():
    layer, x, kw = _tiny_phi3_layer()
    g = 0.1 * torch.randn(2, 6, 32)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x] + _lora_params(layer)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    torch.manual_seed(3)
    before, _ = _saved_bytes(lambda: layer(x, **kw), params)
    plain = _run(lambda: layer(x, **kw), tensors, g)
    handles = enable_input_recompute(layer)
    assert len(handles) == 3  # two norms and gate_up_proj
    torch.manual_seed(3)
    after, _ = _saved_bytes(lambda: layer(x, **kw), params)
    recomputed = _run(lambda: layer(x, **kw), tensors, g)
    _assert_all_close(recomputed, plain)
    # qkv and gate_up no longer keep the norm outputs, down no longer keeps up*silu(gate)
    assert before - after == 4 * (2 * 6 * 32 * 2 + 2 * 6 * 48), (before, after)
    for h in handles:
        h.remove()


def test_recompute_is_refused_when_the_input_was_modified_in_place():
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    layer = lora.Linear(8, 4, r=2, lora_dropout=0.2)
    _fill(layer)
    h = torch.randn(5, 8, requires_grad=True)
    g = 0.1 * torch.randn(5, 4)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [h, layer.lora_A, layer.lora_B]

    def modified():
        y = norm(h)
        y.mul_(2.0)  # allowed by autograd (LayerNorm keeps no output), but y != norm(h) now
        return layer(y)
    want = _run(modified, tensors, g)  # no hooks: the layer saves y itself
    handles = enable_input_recompute(norm)
    got = _run(modified, tensors, g)  # hooks: the version counter must veto the recipe
    _assert_all_close(got, want)
    unmodified = _run(lambda: layer(norm(h)), tensors, g)  # the recipe is used here
    for t in handles:
        t.remove()
    _assert_all_close(unmodified, _run(lambda: layer(norm(h)), tensors, g))


class _SwiGLU(nn.Module):
    """A Phi-3-style MLP outside transformers; ``spelled_out`` writes SiLU as ``g * sigmoid(g)``,
    which the graph match must not take for ``F.silu``."""

    def __init__(self, spelled_out=False):
        super().__init__()
        self.gate_up_proj = lora.Linear(8, 12, r=2, lora_alpha=4, lora_dropout=0.1, bias=False)
        self.down_proj = lora.Linear(6, 8, r=2, lora_alpha=4, lora_dropout=0.1, bias=False)
        self.spelled_out = spelled_out
        _fill(self.gate_up_proj)
        _fill(self.down_proj, seed=2)

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
    before, _ = _saved_bytes(lambda: mlp(x), params)
    want = _run(lambda: mlp(x), tensors, g)
    handles = enable_input_recompute(mlp)
    after, _ = _saved_bytes(lambda: mlp(x), params)
    _assert_all_close(_run(lambda: mlp(x), tensors, g), want)
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
    fused = _run(run, tensors, g)
    for m in plain_dropout:  # same layers through the plain autograd path
        m.lora_dropout = type("Plain", (nn.Dropout,), {})(m.lora_dropout.p)
    plain = _run(run, tensors, g)
    _assert_all_close(fused, plain, atol=3e-2)
    for m in plain_dropout:
        m.lora_dropout = nn.Dropout(m.lora_dropout.p)
    handles = enable_input_recompute(layer)
    _assert_all_close(_run(run, tensors, g), fused, atol=0)  # recompute: bit for bit
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
    _fill(layer)
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
    want = _run(run, tensors, g)
    handles = enable_input_recompute(norm)
    params = {p.untyped_storage().data_ptr() for p in [*norm.parameters(), *layer.parameters()]}
    saved, _ = _saved_bytes(run, params)
    _assert_all_close(_run(run, tensors, g), want, atol=0)  # bit for bit
    for t in handles:
        t.remove()
    saved_plain, _ = _saved_bytes(run, params)
    assert saved < saved_plain  # the recipe was used


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recompute_under_activation_checkpointing(use_reentrant):
    layer, x, kw = _tiny_phi3_layer()
    g = 0.1 * torch.randn(2, 6, 32)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x] + _lora_params(layer)
    plain = _run(lambda: layer(x, **kw), tensors, g)
    handles = enable_input_recompute(layer)
    ckpt = _run(lambda: checkpoint(lambda t: layer(t, **kw), x, use_reentrant=use_reentrant),
                tensors, g)
    _assert_all_close(ckpt, plain)
    for h in handles:
        h.remove()


# ------------------------------------------------------------------ torch.compile
class _Block(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.qkv = lora.MergedLinear(16, 24, r=2, lora_alpha=4, lora_dropout=p,
                                     enable_lora=[True, False, True])
        self.out = lora.Linear(24, 8, r=2, lora_alpha=4, lora_dropout=p)

    def forward(self, x):
        return self.out(torch.relu(self.qkv(x)))


def test_compile_has_no_graph_breaks_in_lora_layers():
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_Block(0.1).train())(torch.randn(3, 16, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_matches_eager_without_dropout():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block(0.0).train()
    _fill(block.qkv)
    _fill(block.out, seed=2)
    x = torch.randn(3, 16, requires_grad=True)
    g = 0.1 * torch.randn(3, 8)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, block.qkv.lora_A, block.qkv.lora_B, block.out.lora_A, block.out.lora_B]
    compiled = torch.compile(block, backend="aot_eager")
    _assert_all_close(_run(lambda: compiled(x), tensors, g), _run(lambda: block(x), tensors, g))


# ------------------------------------------------------------------ bad input
def test_lora_linear_rejects_mismatched_shapes():
    x, W = torch.randn(2, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"lora_A \(2, 6\), lora_B \(4, 2\) and slices"):
        lora_linear(x, W, None, torch.randn(2, 6), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"lora_A \(3, 6\).*slices=\(\(0, 2\), \(2, 3\)\)"):
        lora_linear(x, W, None, torch.randn(3, 6), torch.randn(5, 1), 1.0, slices=[(0, 2), (2, 3)])
    # sizes that add up but a slice that runs past the output (rows 4..6 of 5)
    with pytest.raises(ValueError, match=r"slices=\(\(0, 2\), \(4, 2\)\) do not fit x \(\.\.\., 6\) "
                                         r"-> \(\.\.\., 5\)"):
        lora_linear(x, W, None, torch.randn(4, 6), torch.randn(4, 2), 1.0, slices=[(0, 2), (4, 2)])


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_lora_linear_rejects_bad_dropout(p):
    x, W = torch.randn(2, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got"):
        lora_linear(x, W, None, torch.randn(2, 6), torch.randn(5, 2), 1.0, dropout_p=p)
