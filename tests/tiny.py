"""Tiny models, dense references and a chat shared by the tests (nothing is downloaded)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

import lora_phi3
import lora_phi3.inject.named
from lora_phi3.inject.injector import inject_lora, lora_modules
from lora_phi3.config import LoraConfig
from lora_phi3.layers import Embedding, Linear, MergedLinear

# Grouped-query attention: 8 query heads share 2 key/value heads, so q, k and v differ in size.
TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=96, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
# Per-slice targets: q and v of qkv_proj, the whole gate_up_proj, o_proj and down_proj.
PER_SLICE = ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
X = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_config(**overrides) -> Phi3Config:
    """``TINY`` with ``overrides`` (e.g. ``hidden_size=128`` for NF4's block size of 64)."""
    return Phi3Config(**{**TINY, **overrides})


def tiny_phi3(dtype: torch.dtype = torch.float32, seed: int = 0, attn: str | None = None,
              **overrides) -> Phi3ForCausalLM:
    """The one tiny Phi-3 builder of the tests: same base weights for the same seed and overrides."""
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    if attn is not None:
        cfg._attn_implementation = attn
    return Phi3ForCausalLM(cfg).to(dtype).eval()


def randomize(model: nn.Module, seed: int, only=lambda name: True) -> nn.Module:
    """Random values in every trainable tensor (A, a non-zero B, saved modules, biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and only(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def randomize_lora(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Non-zero A and B in every LoRA layer, so every delta is non-zero (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    return model


def adapted(targets=PER_SLICE, seed=1, **kw) -> Phi3ForCausalLM:
    model = tiny_phi3()
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **kw}))
    return randomize(model, seed)


def logits(model, ids=X):
    with torch.no_grad():
        return model(ids).logits


def dense_reference(model) -> Phi3ForCausalLM:
    """A plain Phi-3 whose weights are ``W + s * B_i @ A_i`` in every adapted slice, written out
    slice by slice, with the trained non-LoRA tensors (modules_to_save, biases) copied over."""
    ref = tiny_phi3()
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            W, s = ref.get_submodule(name).weight, m.scaling
            if isinstance(m, MergedLinear):
                for sl in m.iter_slices():  # rows sl.out_rows get B_i @ A_i
                    W[sl.out_rows] += s * m.lora_B[sl.b_rows] @ m.lora_A[sl.a_rows]
            elif isinstance(m, Embedding):
                W += s * (m.lora_B @ m.lora_A).T
            else:
                W += s * m.lora_B @ m.lora_A
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                ref.get_parameter(name).copy_(p)
    return ref


def saved_bytes(fn, exclude=frozenset()) -> int:
    """The bytes autograd saves for backward while ``fn()`` runs, each storage counted once,
    storages whose data pointer is in ``exclude`` (the parameters') left out: the very count
    ``benchmarks/bench_memory.py`` reports (``benchmarks/common.saved_bytes``)."""
    return _bench_common().saved_bytes(fn, set(exclude))


def _bench_common():
    import importlib.util
    import pathlib
    import sys

    module = sys.modules.get("lora_phi3_bench_common")
    if module is None:
        path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
        spec = importlib.util.spec_from_file_location("lora_phi3_bench_common", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module



# -- generic tiny models (an MLP with embeddings, a conv net, GPT-2 with Conv1D) ---------------------
class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)

    def forward(self, h):
        return self.norm(h + self.fc2(F.gelu(self.fc1(h))))


class TinyNet(nn.Module):
    """Token embedding, three residual MLP blocks, an LM head: a stand-in for any transformer."""

    def __init__(self, vocab=20, dim=16, n_layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim) for _ in range(n_layers)])
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, dim)
        for block in self.layers:
            h = block(h)
        return self.lm_head(h)  # (B, T, vocab)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.conv2g = nn.Conv2d(8, 4, (3, 1), groups=2)
        self.conv3 = nn.Conv3d(2, 4, (1, 3, 3))

    def forward(self, x1, x2, x3):
        return self.conv1(x1), self.conv2g(self.conv2(x2)), self.conv3(x3)


def tiny_gpt2():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


class MagnitudeLinear(Linear):
    """A LoRA variant with one more adapter parameter, declared in ``adapter_param_names`` (as a
    DoRA magnitude would be): what every "which parameters are the adapter's" caller must follow."""

    adapter_param_names = ("lora_A", "lora_B", "magnitude")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.magnitude = nn.Parameter(torch.ones(self.out_features))


# A two-round conversation with a system prompt (the masking tests write its tokens out by hand).
CONV = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "Sort: c a b"},
    {"role": "assistant", "content": "a b c"},
    {"role": "user", "content": "Add 2 to that."},
    {"role": "assistant", "content": "5"},
]


def grads_of(fn, tensors, grad_out, seed: int = 7) -> list[torch.Tensor]:
    """``[fn(), d fn / d t for t in tensors]`` after ``torch.manual_seed(seed)`` (so dropout draws
    the same mask for every path compared) and a backward of ``grad_out``."""
    for t in tensors:
        t.grad = None
    torch.manual_seed(seed)
    y = fn()
    y.backward(grad_out)
    return [y.detach()] + [t.grad.clone() for t in tensors]


def assert_all_close(got, want, atol: float = 1e-5) -> None:
    """Pairwise ``assert_close`` with an absolute tolerance only (grads here are of order 1)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# Hidden and intermediate sizes that are multiples of NF4's block size 64 (QLoRA tests):
# tiny_phi3(attn="sdpa", **NF4_SIZES).
NF4_SIZES = dict(hidden_size=128, intermediate_size=256)


# -- several named adapters (tests/inject/test_named.py, tests/adapters/test_hotswap.py) ----------
NAMED_CFG_A = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
NAMED_CFG_B = LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_proj"])
NAMED_CFG_C = LoraConfig(r=3, lora_alpha=3, target_modules=["qkv_proj"], use_dora=True)


def two_adapters(c=False):
    """A model with adapters "default" (A) and "b" (B), both trained-looking; and "c" (DoRA)."""
    model = tiny_phi3()
    lora_phi3.inject_lora(model, NAMED_CFG_A)
    randomize_lora(model, seed=1)
    lora_phi3.add_adapter(model, NAMED_CFG_B, "b")
    lora_phi3.set_adapter(model, "b")
    randomize_lora(model, seed=2)
    if c:
        lora_phi3.add_adapter(model, NAMED_CFG_C, "c")
        lora_phi3.set_adapter(model, "c")
        randomize_lora(model, seed=3)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_magnitude.mul_(0.5 + torch.rand(layer.lora_magnitude.shape, generator=g))
    lora_phi3.set_adapter(model, "default")
    return model


def alone(model, name, config):
    """A fresh model holding only ``name``'s adapter, with its tensors: the single-adapter truth."""
    ref = tiny_phi3()
    lora_phi3.inject_lora(ref, config)
    with lora_phi3.inject.named.using_adapter(model, name):
        state = lora_phi3.lora_state_dict(model)
    ref.load_state_dict(state, strict=False)
    return ref
