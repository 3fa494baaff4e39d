"""Per-layer LoRA cost at Phi-3-mini sizes, against the frozen layer and the peers, interleaved.

For each projection of a Phi-3-mini decoder layer (qkv 3072->9216 with q,k,v or only q,v adapted,
gate_up 3072->16384, down 8192->3072, o 3072->3072) it times one training step (forward plus
backward; frozen weight, input requiring grad, LoRA r=16) for:

- ``frozen``: the torch ``nn.Linear`` alone;
- ``ours``: ``lora_phi3.Linear``/``MergedLinear`` (the fused autograd path);
- ``ours plain``: the same maths in plain autograd ops (``lora_linear(..., fused=False)``);
- ``loralib`` 0.1.2 and HF ``peft`` LoRA layers of the same configuration, when installed.
  PEFT has no per-slice adapters, so for the fused projections it adapts the whole output with
  one rank-r pair; for "q,v only" it has no equivalent and is left out.

All candidates of one row run round-robin in the same rounds; every figure is the median over
rounds of the per-round time ratio. A second table times inference (``no_grad`` forward): ours
unmerged and merged against the frozen layer.

    python benchmarks/bench_layers.py            # full (a few minutes on 2 cores)
    python benchmarks/bench_layers.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_phi3 as lora  # noqa: E402
from lora_phi3.layers import lora_linear  # noqa: E402
from common import (PHI3_MINI_PROJECTIONS, have, interleaved, load, machine,  # noqa: E402
                    markdown_table, paired_ratio, peft_wrap, train_step_fn)

CONFIGS = PHI3_MINI_PROJECTIONS  # name, in, out, enable_lora (None: Linear), split sizes


class PlainPath(nn.Module):
    """Our layer's maths through plain autograd ops (what the fused Function replaces)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        p = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) and m.training else 0.0
        return lora_linear(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, p,
                           getattr(m, "lora_slices", None), fused=False)


def _randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def build(in_f: int, out_f: int, enable, splits, r: int, alpha: float, dropout: float,
          peers: bool, dtype: torch.dtype) -> dict[str, nn.Module]:
    frozen = nn.Linear(in_f, out_f, bias=False, dtype=dtype).requires_grad_(False)
    if enable is None:
        ours = lora.Linear.from_linear(frozen, r=r, lora_alpha=alpha, lora_dropout=dropout)
    else:
        ours = lora.MergedLinear.from_linear(frozen, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                             enable_lora=enable, split_sizes=splits)
    _randomize(ours)
    models = {"frozen": frozen, "ours": ours, "ours plain": PlainPath(ours)}
    if peers and have("loralib"):
        import loralib

        if enable is None:
            ll = loralib.Linear(in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=dropout, bias=False)
        else:
            ll = loralib.MergedLinear(in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                      enable_lora=enable, bias=False)
        ll.to(dtype)
        _randomize(ll)
        models["loralib"] = ll
    if peers and have("peft") and (enable is None or all(enable)):
        models["peft"] = peft_wrap(copy.deepcopy(frozen), r, alpha, dropout)
    for m in models.values():
        m.train()
    return models


def infer_fn(model: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            model(x)
    return step


def compile_report() -> list[list]:
    """Graph breaks under ``torch._dynamo.explain`` of a tiny Phi-3 with ``inject_lora`` (r=4, dropout
    0.05, input recompute on): one decoder layer, then the whole model; with the source locations
    dynamo logs for each break."""
    import logging
    import re

    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=4, num_hidden_layers=2, vocab_size=128, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    lora.inject_lora(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05))  # recompute on
    model.train()
    messages: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
    handler = Capture()
    torch._logging.set_logs(graph_breaks=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    rows = []
    try:
        layer = model.model.layers[0]
        x = torch.randn(2, 16, 64, requires_grad=True)
        pos = torch.arange(16)[None]
        cases = [("one injected decoder layer", layer,
                  ((x,), dict(attention_mask=None, position_ids=pos,
                              position_embeddings=model.model.rotary_emb(x, pos)))),
                 ("whole model (loss from labels)", model,
                  ((), dict(input_ids=torch.randint(3, 128, (2, 16)),
                            labels=torch.randint(3, 128, (2, 16)))))]
        for name, module, (args, kwargs) in cases:
            torch._dynamo.reset()
            messages.clear()
            e = torch._dynamo.explain(module)(*args, **kwargs)
            where = sorted({f"{os.path.relpath(m.group(1))}:{m.group(2)}" if "lora_phi3" in m.group(1)
                            else f"{m.group(1).split('site-packages/')[-1]}:{m.group(2)}"
                            for msg in messages
                            for m in [re.search(r"in user code at (\S+):(\d+)", msg)] if m})
            in_layers = sum(("lora_phi3/layers/" in w) for w in where)
            rows.append([name, e.graph_count, e.graph_break_count, in_layers,
                         ", ".join(where) or "—"])
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="T, tokens per step (default 256)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    ap.add_argument("--repeats", type=int, default=11, help="timed rounds per row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true", help="skip loralib and PEFT")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference table")
    ap.add_argument("--only", default=None, help="comma-separated row names to run (e.g. o,down)")
    ap.add_argument("--compile", action="store_true",
                    help="also count torch.compile graph breaks of an injected tiny Phi-3")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall time, or CPU time of the main thread (needs --threads 1; robust "
                         "to other processes sharing the cores)")
    ap.add_argument("--quick", action="store_true", help="T=32, 3 rounds, 1 warmup: a smoke run")
    args = ap.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        ap.error(f"--clock thread needs --threads 1 (torch's worker threads would go uncounted), "
                 f"got --threads {args.threads}")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.repeats, args.warmup = 32, 3, 1
    torch.manual_seed(0)
    print(f"machine: {machine()}; load average at start {load()}")
    print(f"T={args.tokens} r={args.r} alpha={args.alpha} dropout={args.dropout} fp32, "
          f"{args.repeats} interleaved rounds after {args.warmup} warmups, {args.clock} clock; "
          "cells: median per-round time ratio\n")
    only = set(args.only.split(",")) if args.only else None
    train_rows, infer_rows = [], []
    for name, in_f, out_f, enable, splits in CONFIGS:
        if only and name.split(" ")[0] not in only and name not in only:
            continue
        models = build(in_f, out_f, enable, splits, args.r, args.alpha, args.dropout,
                       not args.no_peers, torch.float32)
        x = torch.randn(1, args.tokens, in_f, requires_grad=True)
        g = torch.randn(1, args.tokens, out_f)
        times = interleaved({k: train_step_fn(m, x, g) for k, m in models.items()},
                            args.repeats, args.warmup, clock)
        ms = 1e3 * sorted(times["frozen"])[len(times["frozen"]) // 2]

        def ratio(a: str, b: str) -> float | None:
            return paired_ratio(times, a, b) if a in times and b in times else None
        train_rows.append([name, f"{in_f}→{out_f}", f"{ms:.1f}", ratio("ours", "frozen"),
                           ratio("ours plain", "frozen"), ratio("loralib", "frozen"),
                           ratio("peft", "frozen"), ratio("ours", "loralib"),
                           ratio("ours", "peft")])
        print(f"{name}: done", file=sys.stderr, flush=True)
        if not args.no_inference:
            ours = models["ours"]
            unmerged = copy.copy(ours)  # same parameters, own flags
            unmerged.merge_weights = False
            unmerged.eval()
            merged = lora.MergedLinear.from_linear(copy.deepcopy(models["frozen"]), r=args.r,
                                                   enable_lora=enable, split_sizes=splits) \
                if enable is not None else lora.Linear.from_linear(
                    copy.deepcopy(models["frozen"]), r=args.r)
            merged.load_state_dict(ours.state_dict())
            merged.eval()  # merges
            xi = x.detach()
            t2 = interleaved({"frozen": infer_fn(models["frozen"], xi),
                              "unmerged": infer_fn(unmerged, xi), "merged": infer_fn(merged, xi)},
                             args.repeats, args.warmup, clock)
            infer_rows.append([name, paired_ratio(t2, "unmerged", "frozen"),
                               paired_ratio(t2, "merged", "frozen")])
        del models
    print(f"\nload average at end {load()}")
    print("\n### Training step (forward + backward), time ratio\n")
    print(markdown_table(["layer", "in→out", "frozen ms", "ours/frozen", "ours plain/frozen",
                          "loralib/frozen", "peft/frozen", "ours/loralib", "ours/peft"],
                         train_rows))
    if infer_rows:
        print("\n### Inference (no_grad forward), time ratio to the frozen layer\n")
        print(markdown_table(["layer", "ours unmerged", "ours merged"], infer_rows))
    if args.compile:
        print("\n### torch.compile graph breaks (torch._dynamo.explain)\n")
        print(markdown_table(["module", "graphs", "graph breaks", "breaks in lora_phi3/layers/",
                              "where"], compile_report()))


if __name__ == "__main__":
    main()
