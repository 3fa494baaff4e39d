"""DoRA on ``Embedding`` and on ``Conv1d/2d/3d`` (``lora_layout="peft"``), against dense references
written out here and against HF PEFT 0.21's own DoRA layers holding the same tensors.

An embedding's "output rows" are the columns of its table (one magnitude per embedding dimension);
a convolution's are its output channels (the norm over ``(in / groups, *kernel)``).
"""

import copy
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora
from lora_phi3.layers.dora import peft_grouped_conv_update

CONVS = {nn.Conv1d: (lora.Conv1d, F.conv1d), nn.Conv2d: (lora.Conv2d, F.conv2d),
         nn.Conv3d: (lora.Conv3d, F.conv3d)}


def _randomize(layer, gen, scale=0.3):
    """Non-zero A, B and a magnitude away from its initial value."""
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * scale)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
        layer.lora_magnitude.mul_(0.5 + torch.rand(layer.lora_magnitude.shape, generator=gen))


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def peft_dora(module: nn.Module, r=4, lora_alpha=8) -> nn.Module:
    """PEFT's DoRA layer over a copy of ``module`` (B non-zero)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Wrap(copy.deepcopy(module)), peft.LoraConfig(
            r=r, lora_alpha=lora_alpha, target_modules=["inner"], init_lora_weights=False,
            use_dora=True))
    return model.base_model.model.inner


# -- embeddings ------------------------------------------------------------------------------------
def _dense_embedding_dora(x, E, A, B, m, s):
    """The table ``E + s (B A)^T`` with each column (embedding dimension) rescaled to length ``m``."""
    V = E + s * (B @ A).T  # (num_embeddings, dim)
    norm = V.norm(dim=0).detach()  # (dim,)
    return F.embedding(x, V * (m / norm)[None, :])


def test_embedding_dora_forward_and_grads_match_dense_reference():
    gen = torch.Generator().manual_seed(0)
    layer = lora.Embedding(30, 6, r=3, lora_alpha=6, use_dora=True)
    assert layer.lora_magnitude.shape == (6,)
    torch.testing.assert_close(layer.lora_magnitude, layer.weight.norm(dim=0))  # B A = 0 at init
    _randomize(layer, gen)
    x = torch.randint(0, 30, (4, 5), generator=gen)
    out = layer(x)
    dy = torch.randn(out.shape, generator=gen)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    grads = torch.autograd.grad(out, params, dy)
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    ref = _dense_embedding_dora(x, layer.weight.detach(), *refs, 2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, torch.autograd.grad(ref, refs, dy)):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def test_embedding_dora_matches_peft_and_its_merge():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 8)
    theirs = peft_dora(emb)
    ours = lora.Embedding.from_embedding(emb, r=4, lora_alpha=8, use_dora=True)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_embedding_A["default"])
        ours.lora_B.copy_(theirs.lora_embedding_B["default"])
        ours.reset_dora_magnitude()  # m = ||E + s (B A)^T|| per column, as PEFT initialised it
        torch.testing.assert_close(ours.lora_magnitude,
                                   theirs.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=1e-6)
        theirs.lora_magnitude_vector["default"].weight.mul_(1.3)
        ours.lora_magnitude.mul_(1.3)
    x = torch.randint(0, 40, (3, 7))
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        theirs.merge()
        ours.merge()
    torch.testing.assert_close(ours.weight, theirs.get_base_layer().weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_dora_merge_is_the_forward_and_unmerge_restores_bits(dtype):
    gen = torch.Generator().manual_seed(1)
    layer = lora.Embedding(50, 8, r=2, lora_alpha=4, lora_dtype=torch.float32, use_dora=True,
                           merge_weights=False)
    layer.weight.data = layer.weight.data.to(dtype)
    _randomize(layer, gen)
    x = torch.randint(0, 50, (2, 9), generator=gen)
    W0 = layer.weight.detach().clone()
    with torch.no_grad():
        out = layer(x)
        layer.merge()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(layer(x), out, **tol)
        for _ in range(3):
            layer.unmerge()
            assert torch.equal(layer.weight, W0)
            layer.merge()
        layer.unmerge()
    assert torch.equal(layer.weight, W0)


def test_embedding_dora_starts_as_the_lora_function():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6)
    plain = lora.Embedding.from_embedding(emb, r=2, lora_alpha=4, init_lora_weights=False)
    dora = lora.Embedding.from_embedding(emb, r=2, lora_alpha=4, use_dora=True)
    with torch.no_grad():
        dora.lora_A.copy_(plain.lora_A)
        dora.lora_B.copy_(plain.lora_B)
        dora.reset_dora_magnitude()
    x = torch.randint(0, 20, (3, 4))
    torch.testing.assert_close(dora(x), plain(x), atol=1e-6, rtol=1e-6)


# -- convolutions ----------------------------------------------------------------------------------
def _dense_conv_dora(conv_fn, x, W, b, A, B, m, s, **kw):
    """``conv(x, W')`` with ``W' = m * (W + s delta) / ||W + s delta||`` per output channel, where
    ``delta[o] = sum_j B[o, j] A[j]`` (groups 1)."""
    V = W + s * (B.flatten(1) @ A.flatten(1)).view(W.shape)
    norm = V.flatten(1).norm(dim=1).detach()
    return conv_fn(x, V * (m / norm).view(-1, *(1,) * (W.dim() - 1)), b, **kw)


CASES = [
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1), (2, 4, 11)),
    (nn.Conv2d, dict(kernel_size=(3, 2), padding=1), (2, 4, 7, 6)),
    (nn.Conv3d, dict(kernel_size=3, stride=2, padding=1), (1, 4, 5, 6, 5)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv_cls,kwargs,shape", CASES)
def test_conv_dora_forward_and_grads_match_dense_reference(conv_cls, kwargs, shape, bias):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    conv = conv_cls(4, 8, bias=bias, **kwargs)
    ours_cls, conv_fn = CONVS[conv_cls]
    layer = ours_cls.from_conv(conv, r=3, lora_alpha=6, lora_layout="peft", use_dora=True)
    assert layer.lora_magnitude.shape == (8,)
    torch.testing.assert_close(layer.lora_magnitude, conv.weight.flatten(1).norm(dim=1))
    _randomize(layer, gen)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    out = layer(x)
    dy = torch.randn(out.shape, generator=gen)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude]
    grads = torch.autograd.grad(out, params, dy)
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    ref = _dense_conv_dora(conv_fn, refs[0], conv.weight.detach(), conv.bias, *refs[1:], 2.0,
                           stride=kwargs.get("stride", 1), padding=kwargs["padding"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, torch.autograd.grad(ref, refs, dy)):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv_cls,kwargs,shape", CASES + [
    (nn.Conv2d, dict(kernel_size=3, padding=1, groups=2), (2, 4, 6, 6)),
    (nn.Conv2d, dict(kernel_size=1), (2, 4, 5, 5)),
])
def test_conv_dora_matches_peft(conv_cls, kwargs, shape):
    torch.manual_seed(0)
    conv = conv_cls(4, 8, **kwargs)
    theirs = peft_dora(conv)
    grouped = conv.groups > 1
    ours = CONVS[conv_cls][0].from_conv(conv, r=4, lora_alpha=8, lora_layout="peft", use_dora=True,
                                        merge_weights=not grouped)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        ours.reset_dora_magnitude()  # PEFT's own norm, groups included
        M = theirs.lora_magnitude_vector["default"].weight
        assert M.shape == (1, 8, *(1,) * (conv.weight.dim() - 2))
        torch.testing.assert_close(ours.lora_magnitude, M.flatten(), atol=1e-6, rtol=1e-6)
        M.mul_(1.25)
        ours.lora_magnitude.mul_(1.25)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        if not grouped:  # PEFT refuses to merge grouped convs, as we do
            theirs.merge()
            ours.merge()
            torch.testing.assert_close(ours.weight, theirs.get_base_layer().weight,
                                       atol=1e-6, rtol=1e-5)


def test_grouped_conv_dora_norm_is_peft_s():
    """For groups > 1, PEFT's DoRA divides by the norm of W + s * (B.view(-1, r) @ A.view(r, -1))
    reshaped to W's shape (not the update's own form, which spans all input channels): written out
    here index by index, and the layer takes exactly that norm."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 6, 3, groups=2)  # W (6, 4, 3, 3)
    layer = lora.Conv2d.from_conv(conv, r=4, lora_alpha=4, lora_layout="peft", use_dora=True,
                                  merge_weights=False)
    _randomize(layer, gen)
    A, B, W = layer.lora_A.detach(), layer.lora_B.detach(), conv.weight.detach()
    r, g = 4, 2
    flat = torch.zeros(6 // g, 8 * 9)  # B.view(-1, r) @ A.view(r, -1), element by element
    for p in range(6 // g):
        for q in range(r):
            o, j = p * g + q // (r // g), q % (r // g)
            flat[p] += B[o, j, 0, 0] * A[q].flatten()
    update = flat.reshape(W.shape)
    torch.testing.assert_close(peft_grouped_conv_update(A, B, W.shape), update)
    norm = (W + 1.0 * update).flatten(1).norm(dim=1)
    torch.testing.assert_close(layer._dora_norm(), norm, atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 8, 5, 5, generator=gen)
    base = F.conv2d(x, W, None, groups=2)
    adapter = F.conv2d(F.conv2d(x, A), B, groups=2)
    gain = (layer.lora_magnitude.detach() / norm).view(1, -1, 1, 1)
    ref = gain * (base + adapter) + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv_cls,kwargs,shape", CASES)
def test_conv_dora_merge_is_the_forward_and_unmerge_restores_bits(conv_cls, kwargs, shape, dtype):
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    conv = conv_cls(4, 8, **kwargs).to(dtype)
    layer = CONVS[conv_cls][0].from_conv(conv, r=2, lora_alpha=4, lora_layout="peft",
                                         lora_dtype=torch.float32, use_dora=True)
    _randomize(layer, gen)
    W0 = layer.weight.detach().clone()
    x = torch.randn(*shape, generator=gen).to(dtype)
    with torch.no_grad():
        out = layer(x)
        layer.eval()  # merge_weights=True: eval merges, train unmerges
        assert layer.merged
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
        torch.testing.assert_close(layer(x), out, **tol)
        for _ in range(3):
            layer.train()
            assert torch.equal(layer.weight, W0)
            layer.eval()
        layer.train()
    assert torch.equal(layer.weight, W0)


def test_conv_dora_merge_and_unload_and_a_changed_adapter():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    lora.inject_lora(model, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                            use_dora=True))
    for layer in lora.lora_modules(model).values():
        _randomize(layer, gen)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    out = model(x)
    with torch.no_grad():  # an in-place step is seen by the cached norm
        model[0].lora_B.mul_(2.0)
    changed = model(x)
    assert not torch.allclose(changed, out, atol=1e-4)
    plain = lora.merge_and_unload(model)
    assert type(plain[0]) is nn.Conv2d and type(plain[2]) is nn.Conv2d
    torch.testing.assert_close(plain(x), changed, atol=1e-5, rtol=1e-5)


def test_dora_embedding_through_named_adapters():
    """Two DoRA adapters on one embedding: switching moves each one's magnitude with it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 4), nn.Linear(4, 4))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0"], use_dora=True,
                                            init_lora_weights=False))
    lora.add_adapter(model, lora.LoraConfig(r=3, target_modules=["0"], use_dora=True,
                                            init_lora_weights=False), "other")
    x = torch.randint(0, 12, (2, 3))
    first = model(x)
    lora.set_adapter(model, "other")
    assert model[0].lora_magnitude.shape == (4,) and model[0].r == 3
    second = model(x)
    lora.set_adapter(model, "default")
    torch.testing.assert_close(model(x), first, atol=0, rtol=0)
    assert not torch.allclose(first, second)
