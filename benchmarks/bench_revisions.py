"""This checkout's LoRA layers against another revision's, in one process, interleaved.

A refactor must not make a layer slower. Two separate benchmark runs differ by a few percent on a
shared machine (the same code measured twice moves by up to +-0.05 in ``bench_layers.py``'s
ratios), so this script loads a second copy of the package from another checkout under another
name and times both revisions' layers round-robin in the same rounds, on the same weights and
inputs, for each Phi-3-mini projection of ``bench_layers.py``. Every cell is the median over
rounds of the per-round time ratio this/baseline (1.00 = no change). Training step = forward and
backward, frozen weight, input requiring grad, LoRA r=16; inference = ``no_grad`` forward.

    git worktree add /tmp/baseline <revision>
    python benchmarks/bench_revisions.py --baseline /tmp/baseline --threads 1 --clock thread

Only the top-level names ``Linear``/``MergedLinear`` are used, so any revision works.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_phi3 as lora  # noqa: E402
from common import (PHI3_MINI_PROJECTIONS, interleaved, load, machine,  # noqa: E402
                    markdown_table, paired_ratio, train_step_fn)

CONFIGS = PHI3_MINI_PROJECTIONS  # name, in, out, enable_lora (None: Linear), split sizes


def load_baseline(checkout: str):
    """The package of another checkout, imported as ``lora_phi3_baseline`` beside ours."""
    root = os.path.join(os.path.abspath(checkout), "lora_phi3")
    spec = importlib.util.spec_from_file_location("lora_phi3_baseline", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {checkout!r}: no lora_phi3/__init__.py there")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_phi3_baseline"] = module
    spec.loader.exec_module(module)
    return module


def build(pkg, frozen: nn.Linear, enable, splits, args) -> nn.Module:
    kw = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout)
    layer = pkg.Linear.from_linear(copy.deepcopy(frozen), **kw) if enable is None else \
        pkg.MergedLinear.from_linear(copy.deepcopy(frozen), enable_lora=enable, split_sizes=splits, **kw)
    return layer.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="a checkout of the revision to compare with")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated row names (e.g. o,down)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    p.add_argument("--quick", action="store_true", help="T=32, 3 rounds, 1 warmup")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.warmup = 32, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        p.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
    base = load_baseline(args.baseline)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"machine: {machine()}; load average at start {load()}")
    print(f"this: {os.path.dirname(lora.__file__)}; baseline: {os.path.dirname(base.__file__)}")
    print(f"T={args.tokens} r={args.r} dropout={args.dropout} fp32, {args.repeats} interleaved rounds "
          f"after {args.warmup} warmups, {args.clock} clock; cells: median per-round ratio this/baseline")
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    for name, n_in, n_out, enable, splits in CONFIGS:
        if wanted and name not in wanted:
            continue
        torch.manual_seed(0)
        frozen = nn.Linear(n_in, n_out)
        layers = {"this": build(lora, frozen, enable, splits, args),
                  "baseline": build(base, frozen, enable, splits, args)}
        with torch.no_grad():  # the same non-zero adapter in both
            for m in layers.values():
                g = torch.Generator().manual_seed(1)
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.02)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        grad = torch.randn(args.tokens, n_out)
        train = interleaved({k: train_step_fn(m, x, grad) for k, m in layers.items()},
                            args.repeats, args.warmup, clock=clock)
        xi = x.detach()

        def infer(m: nn.Module):
            def run() -> None:
                with torch.no_grad():
                    m(xi)
            return run
        infer_times = interleaved({k: infer(m) for k, m in layers.items()}, args.repeats, args.warmup,
                                  clock=clock)
        rows.append([name, f"{n_in}→{n_out}", 1e3 * sorted(train["baseline"])[len(train["baseline"]) // 2],
                     paired_ratio(train, "this", "baseline"), paired_ratio(infer_times, "this", "baseline")])
        print(f"{name}: done", flush=True)
    print(f"load average at end {load()}")
    print(markdown_table(["layer", "in→out", "baseline train ms", "train step this/baseline",
                          "inference this/baseline"], rows))


if __name__ == "__main__":
    main()
