"""A QLoRA layer's training step: saved activations and time against the frozen 4-bit layer.

For one Phi-3-mini-sized projection (default down_proj, 8192 -> 3072, T=256 tokens, bf16 compute)
it builds, from the same bf16 ``nn.Linear``:

- ``frozen nf4``: the 4-bit base alone (``lora.Linear4bit`` with ``r=0``);
- ``qlora``: ``lora.Linear4bit`` with LoRA ``r=16``, fp32 adapters, dropout 0.05;
- ``bf16 lora``: the dense ``lora.Linear`` over the bf16 weight, the same adapter.

and reports, for a forward + backward with the input requiring grad, the bytes autograd saves for
backward (storages counted once, parameters and the 4-bit buffers excluded; deterministic), as MiB
and as a multiple of the input's bytes, and the step time as a ratio to ``frozen nf4``, all candidates interleaved in the same rounds. It uses
only the package's top-level names, so the same file measures any revision of the library.

    python benchmarks/bench_qlora_layer.py --threads 1 --clock thread
    python benchmarks/bench_qlora_layer.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_phi3 as lora  # noqa: E402
from common import (interleaved, load, machine, markdown_table, paired_ratio,  # noqa: E402
                    saved_bytes, train_step_fn)

IN_FEATURES, OUT_FEATURES, TOKENS, RANK, ALPHA, DROPOUT = 8192, 3072, 256, 16, 32.0, 0.05


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Linear(args.in_features, args.out_features, bias=False).to(torch.bfloat16)
    lora_kw = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                   lora_dtype=torch.float32, merge_weights=False)
    frozen = lora.Linear4bit.from_linear(dense, r=0)
    qlora = lora.Linear4bit.from_linear(dense, **lora_kw)
    bf16 = lora.Linear.from_linear(nn.Linear(args.in_features, args.out_features, bias=False)
                                   .to(torch.bfloat16), **lora_kw)
    with torch.no_grad():
        bf16.weight.copy_(dense.weight)
        for m in (qlora, bf16):  # a non-zero B, the same adapter in both
            g = torch.Generator().manual_seed(1)
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.02)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    return {"frozen nf4": frozen.train(), "qlora": qlora.train(), "bf16 lora": bf16.train()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--in-features", type=int, default=IN_FEATURES)
    p.add_argument("--out-features", type=int, default=OUT_FEATURES)
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--r", type=int, default=RANK)
    p.add_argument("--alpha", type=float, default=ALPHA)
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    p.add_argument("--quick", action="store_true", help="1024 -> 512, T=32, 3 rounds")
    args = p.parse_args()
    if args.quick:
        args.in_features, args.out_features, args.tokens, args.repeats, args.warmup = 1024, 512, 32, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        p.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
    print(f"machine: {machine()}; {load()}")
    print(f"library: {os.path.dirname(lora.__file__)}")
    print(f"{args.in_features}->{args.out_features}, T={args.tokens}, r={args.r}, "
          f"dropout={args.dropout}, bf16 compute, fp32 adapters; {args.repeats} interleaved rounds, "
          f"{args.clock} clock")
    models = build(args)
    torch.manual_seed(2)
    x = torch.randn(args.tokens, args.in_features, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, dtype=torch.bfloat16)
    steps = {name: train_step_fn(m, x, grad) for name, m in models.items()}
    exclude = {t.untyped_storage().data_ptr() for m in models.values()
               for t in [*m.parameters(), *m.buffers()]}
    saved = {name: saved_bytes(step, exclude) for name, step in steps.items()}
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    times = interleaved(steps, args.repeats, args.warmup, clock=clock)
    x_bytes = x.numel() * x.element_size()  # the frozen 4-bit layer itself keeps no activation
    rows = [[name, saved[name] / 2**20, saved[name] / x_bytes,
             paired_ratio(times, name, "frozen nf4")] for name in models]
    print(markdown_table(["variant", "saved MiB", "saved / input bytes",
                          f"step time vs frozen nf4 ({args.clock} clock)"], rows))


if __name__ == "__main__":
    main()
