"""Activation memory of LoRA on a Phi-3-mini decoder layer, and of the LM head + loss.

Part 1 (deterministic): one ``Phi3DecoderLayer`` from transformers (hidden 3072, intermediate
8192, 32 heads, T=256, fp32, train mode) with LoRA r=16 (alpha 32, dropout 0.05) on qkv, o,
gate_up and down. The figure is the bytes of the tensors autograd saves for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's storage once (deduped by
its data pointer), parameter storages left out; relative to the same layer without adapters and
with its input requiring grad. Rows: ours (fused path, with and without
``enable_input_recompute``; and the plain autograd path), HF PEFT, loralib (MergedLinear for the
fused qkv and gate_up). With ``--time`` it also times a training step of each, interleaved.

Part 2 (``--lm-head``): peak memory of the LM head + cross-entropy (vocab 32064, hidden 3072,
T=2048, frozen head, fp32) for ``lm_loss_sum`` without chunking and with chunks. On CPU the peak
is measured allocator-independently: a TorchDispatchMode records the storage of every tensor any
op creates during forward+backward and tracks the sum of those still alive after each op; the
figure is the maximum (tensors that existed before the step, the head's weight and the hidden
states, are not included). On CUDA it is ``torch.cuda.max_memory_allocated`` above the start.

    python benchmarks/bench_memory.py                  # part 1
    python benchmarks/bench_memory.py --time --lm-head # everything
    python benchmarks/bench_memory.py --quick          # shape-proportional 1/8 config
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_phi3 as lora  # noqa: E402
from lora_phi3.layers import enable_input_recompute  # noqa: E402
from lora_phi3.finetune.losses import lm_loss_sum  # noqa: E402
from common import (have, interleaved, load, machine, markdown_table, paired_ratio,  # noqa: E402
                    saved_bytes)

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class Setup:
    hidden: int = 3072
    intermediate: int = 8192
    heads: int = 32
    tokens: int = 256
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    @classmethod
    def scaled(cls, factor: int) -> "Setup":
        """Every size divided by ``factor`` (head dim kept at 96), so all ratios stay alike."""
        return cls(3072 // factor, 8192 // factor, 32 // factor, 256 // factor, max(16 // factor, 1),
                   2.0 * max(16 // factor, 1), 0.05)


class _PlainDropout(nn.Dropout):
    """An ``nn.Dropout`` subclass: our layers do not recognise it and take the plain autograd path."""


def _config(s: Setup):
    from transformers import Phi3Config

    cfg = Phi3Config(hidden_size=s.hidden, intermediate_size=s.intermediate,
                     num_attention_heads=s.heads, num_key_value_heads=s.heads,
                     num_hidden_layers=1, vocab_size=128, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    return cfg


def _phi3_layer(s: Setup, seed: int = 0) -> nn.Module:
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    torch.manual_seed(seed)
    layer = Phi3DecoderLayer(_config(s), 0)
    for p in layer.parameters():  # HF leaves init to the PreTrainedModel; give sane scales
        nn.init.normal_(p, 0, 0.02) if p.dim() == 2 else nn.init.ones_(p)
    return layer


def _randomize_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def _train_only_lora(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def build(variant: str, s: Setup, seed: int = 0) -> nn.Module:
    """A decoder layer with the named adapter variant, in train mode.

    Variants: ``frozen``, ``ours+recompute``, ``ours``, ``ours plain``, ``peft``, ``loralib``.
    """
    layer = _phi3_layer(s, seed)
    attn, mlp = layer.self_attn, layer.mlp
    qkv_split = [attn.qkv_proj.out_features // 3] * 3
    gu_split = [mlp.gate_up_proj.out_features // 2] * 2
    kw = dict(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout)
    if variant.startswith("ours"):
        attn.qkv_proj = lora.MergedLinear.from_linear(attn.qkv_proj, enable_lora=[True] * 3,
                                                      split_sizes=qkv_split, **kw)
        attn.o_proj = lora.Linear.from_linear(attn.o_proj, **kw)
        mlp.gate_up_proj = lora.MergedLinear.from_linear(mlp.gate_up_proj, enable_lora=[True] * 2,
                                                         split_sizes=gu_split, **kw)
        mlp.down_proj = lora.Linear.from_linear(mlp.down_proj, **kw)
        if variant == "ours plain":
            for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                m.lora_dropout = _PlainDropout(s.dropout)
        if variant == "ours+recompute":
            enable_input_recompute(layer)
    elif variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        layer = inject_adapter_in_model(LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                   target_modules=list(TARGETS)), layer)
    elif variant == "loralib":
        import loralib

        def swap(old: nn.Linear, enable=None) -> nn.Module:
            if enable is None:
                new = loralib.Linear(old.in_features, old.out_features, bias=False, **kw)
            else:
                new = loralib.MergedLinear(old.in_features, old.out_features, bias=False,
                                           enable_lora=enable, **kw)
            new.weight = old.weight
            return new
        attn.qkv_proj = swap(attn.qkv_proj, [True] * 3)
        attn.o_proj = swap(attn.o_proj)
        mlp.gate_up_proj = swap(mlp.gate_up_proj, [True] * 2)
        mlp.down_proj = swap(mlp.down_proj)
    elif variant != "frozen":
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    _randomize_b(layer)
    _train_only_lora(layer)
    return layer.train()


VARIANTS = ("frozen", "ours+recompute", "ours", "ours plain", "peft", "loralib")


def inputs(s: Setup, seed: int = 1):
    """``(x, kwargs)`` for one decoder-layer call: x ``(1, T, hidden)`` requiring grad."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    rot = Phi3RotaryEmbedding(_config(s))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, s.tokens, s.hidden, generator=g).requires_grad_(True)
    pos = torch.arange(s.tokens)[None]
    cos, sin = rot(x, pos)
    return x, dict(attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))


def layer_saved_bytes(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> int:
    """Bytes of the storages autograd saves for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return saved_bytes(lambda: layer(x, **kwargs), params)


def memory_table(s: Setup, variants=VARIANTS) -> dict[str, int]:
    """Saved bytes of each variant (same weights, input and seed)."""
    x, kwargs = inputs(s)
    result = {}
    for v in variants:
        if (v == "peft" and not have("peft")) or (v == "loralib" and not have("loralib")):
            continue
        layer = build(v, s)
        torch.manual_seed(2)
        result[v] = layer_saved_bytes(layer, x, kwargs)
    return result


def time_table(s: Setup, variants, repeats: int, warmup: int,
               clock=time.perf_counter) -> dict[str, float]:
    x, kwargs = inputs(s)
    g = torch.randn(1, s.tokens, s.hidden)
    layers = {v: build(v, s) for v in variants}

    def step_fn(layer):
        params = [p for p in layer.parameters() if p.requires_grad]

        def step() -> None:
            x.grad = None
            for p in params:
                p.grad = None
            layer(x, **kwargs).backward(g)
        return step
    times = interleaved({v: step_fn(m) for v, m in layers.items()}, repeats, warmup, clock)
    return {v: paired_ratio(times, v, "frozen") for v in layers}


# -- LM head + loss peak ----------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, sampled after each op."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        # Views and in-place results share an input's storage: not a new allocation.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if st._cdata not in self.live and st._cdata not in inputs:
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def lm_head_peak(tokens: int, hidden: int, vocab: int, chunk: int | None, seed: int = 0) -> int:
    """Peak bytes above the start of one forward+backward of ``lm_loss_sum``."""
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    h = (torch.randn(1, tokens, hidden) * 0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens))
    if torch.cuda.is_available():
        head, h = head.cuda(), h.detach().cuda().requires_grad_(True)
        labels = labels.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss, n = lm_loss_sum(h, head, labels, chunk_size=chunk)
        (loss / n).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with LiveBytes() as mode:
        loss, n = lm_loss_sum(h, head, labels, chunk_size=chunk)
        (loss / n).backward()
    return mode.peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 1/8-scaled config (seconds)")
    ap.add_argument("--time", action="store_true", help="also time a training step per variant")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for --time")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="--time measures wall time, or CPU time of the main thread (--threads 1)")
    ap.add_argument("--lm-head", action="store_true", help="peak memory of the LM head + loss")
    ap.add_argument("--lm-tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--hidden", type=int, default=None,
                    help="hidden size of the --lm-head part (default: the decoder layer's, 3072)")
    ap.add_argument("--lm-head-only", action="store_true",
                    help="skip the decoder-layer table (e.g. Phi-4-mini's head: --lm-head-only "
                         "--vocab 200064 --lm-tokens 4096)")
    args = ap.parse_args(argv)
    if args.lm_head_only:
        args.lm_head = True
    if args.clock == "thread" and args.threads != 1:
        ap.error(f"--clock thread needs --threads 1, got --threads {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setup.scaled(8) if args.quick else Setup()
    print(f"machine: {machine()}; load average {load()}")
    print(f"decoder layer: hidden {s.hidden}, intermediate {s.intermediate}, {s.heads} heads, "
          f"T={s.tokens}, fp32; LoRA r={s.r} alpha={s.alpha} dropout={s.dropout} on "
          f"{', '.join(TARGETS)}\n")
    if not args.lm_head_only:
        mem = memory_table(s)
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        times = time_table(s, list(mem), args.repeats, args.warmup, clock) if args.time else {}
        rows = [[v, f"{b / 2**20:.2f}", f"{b / mem['frozen']:.3f}", times.get(v)]
                for v, b in mem.items()]
        header = ["variant", "saved MiB", "saved vs frozen"] + \
            ([f"step time vs frozen ({args.clock} clock)"] if times else [])
        print(markdown_table(header, [r[:len(header)] for r in rows]))
    if args.lm_head:
        hidden = args.hidden or s.hidden
        tokens = args.lm_tokens // (8 if args.quick else 1)
        vocab = args.vocab // (8 if args.quick else 1)
        print(f"\nLM head + loss: T={tokens}, hidden {hidden}, vocab {vocab}, fp32, frozen head; "
              f"peak bytes above the start ({'CUDA allocator' if torch.cuda.is_available() else 'live tensor storages'})\n")
        full_logits = tokens * vocab * 4
        lm_rows = []
        for chunk in (None, 1024, 256):
            peak = lm_head_peak(tokens, hidden, vocab, chunk)
            lm_rows.append([chunk or "none (full logits)", f"{peak / 2**20:.1f}",
                            peak / full_logits])
        print(markdown_table(["chunk_size", "peak MiB", "peak / one fp32 logits tensor"], lm_rows))


if __name__ == "__main__":
    main()
