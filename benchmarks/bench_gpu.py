"""Accelerator benchmark: per-projection LoRA cost in bf16 and a full Phi-3-mini training step.

Part 1: for each Phi-3-mini projection (qkv, q,v-only qkv, gate_up, down, o), T in {2048, 8192}
tokens and r in {8, 16, 64}: one training step (forward + backward; bf16 frozen base, fp32 adapter
as ``inject_lora`` makes it, input requiring grad) of ours and of HF PEFT, interleaved with the
frozen layer; cells are median per-round time ratios.

Part 2: a full Phi-3-mini-sized model (random weights, 32 layers, hidden 3072, vocab 32064; bf16)
with LoRA on qkv, o, gate_up and down: tokens/s, peak memory and MFU of a training step (forward,
chunked loss, backward, AdamW). MFU counts 4N FLOPs per token (N = parameters outside the input
embedding: 2N forward + 2N for the input gradients of the frozen weights; attention scores and the
adapters are left out) against the peak dense bf16 rate given by ``--peak-tflops`` (989 for an
H200/H100 SXM). With PEFT installed, the same step the reference way (PEFT layers, the model's
own loss on full logits) runs too.

    python benchmarks/bench_gpu.py              # on a CUDA device (about 5 minutes on an H200)
    python benchmarks/bench_gpu.py --dry-run    # tiny sizes, any device, seconds: checks the script
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_phi3 as lora  # noqa: E402
from lora_phi3.finetune.losses import lm_loss_sum  # noqa: E402
from common import (have, interleaved, machine, markdown_table, paired_ratio, peft_wrap,  # noqa: E402
                    train_step_fn)

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def projections(hidden: int, inter: int) -> list[tuple]:
    """(name, in, out, enable_lora or None for Linear, split sizes) of one decoder layer."""
    return [("qkv (q,k,v)", hidden, 3 * hidden, [True] * 3, [hidden] * 3),
            ("qkv (q,v)", hidden, 3 * hidden, [True, False, True], [hidden] * 3),
            ("gate_up", hidden, 2 * inter, [True, True], [inter, inter]),
            ("down", inter, hidden, None, None),
            ("o", hidden, hidden, None, None)]


def layer_table(device, hidden, inter, tokens_list, ranks, dropout, repeats, warmup) -> list[list]:
    rows = []
    for name, in_f, out_f, enable, splits in projections(hidden, inter):
        for T in tokens_list:
            x = torch.randn(T, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(T, out_f, device=device, dtype=torch.bfloat16)
            for r in ranks:
                frozen = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
                frozen.requires_grad_(False)
                kw = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, lora_dtype=torch.float32)
                ours = lora.Linear.from_linear(frozen, **kw) if enable is None else \
                    lora.MergedLinear.from_linear(frozen, enable_lora=enable, split_sizes=splits, **kw)
                models = {"frozen": frozen, "ours": ours}
                if have("peft") and (enable is None or all(enable)):
                    base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
                    base.requires_grad_(False)
                    peft = peft_wrap(base, r, 2 * r, dropout)
                    for n, p in peft.named_parameters():
                        if "lora_" in n:
                            p.data = p.data.float()  # the same fp32 adapter as ours
                    models["peft"] = peft
                for m in models.values():
                    m.train()
                times = interleaved({k: train_step_fn(m, x, g) for k, m in models.items()}, repeats, warmup)
                ms = 1e3 * sorted(times["frozen"])[len(times["frozen"]) // 2]
                ratio = lambda a, b: paired_ratio(times, a, b) if a in times and b in times else None  # noqa: E731
                rows.append([name, T, r, f"{ms:.3f}", ratio("ours", "frozen"),
                             ratio("peft", "frozen"), ratio("ours", "peft")])
                print(f"{name} T={T} r={r}: done", file=sys.stderr, flush=True)
                del models, ours, frozen
                gc.collect()
    return rows


# -- full model step ------------------------------------------------------------------------------
def _phi3(device, layers: int, hidden: int, inter: int, heads: int, vocab: int) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                     num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Phi3ForCausalLM(cfg).to(torch.bfloat16)
    return model


def full_step(variant: str, device, args, dims) -> dict:
    """Tokens/s, peak memory and MFU of ``variant`` ("ours" or "peft")."""
    layers, hidden, inter, heads, vocab = dims
    torch.manual_seed(0)
    model = _phi3(device, layers, hidden, inter, heads, vocab)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if variant == "ours":
        lora.inject_lora(model, lora.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                lora_dropout=args.dropout, target_modules=TARGETS))
        # inject_lora turns input recompute on by default (the lean path)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                 lora_dropout=args.dropout, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, vocab, (args.batch, args.seq), device=device)

    def step() -> None:
        if variant == "ours":
            hidden_states = model.model(input_ids=ids, use_cache=False).last_hidden_state
            loss, n = lm_loss_sum(hidden_states, model.lm_head, ids, chunk_size=1024)
            loss = loss / n
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.step_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    tok_s = args.batch * args.seq / dt
    return dict(tok_s=tok_s, step_s=dt, peak=peak, n=n_params,
                mfu=tok_s * 4 * n_params / (args.peak_tflops * 1e12))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on whatever device there is: checks that the script runs")
    ap.add_argument("--tokens", default="2048,8192", help="T values for part 1")
    ap.add_argument("--ranks", default="8,16,64", help="r values for part 1")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-layers", action="store_true", help="skip part 1")
    ap.add_argument("--skip-step", action="store_true", help="skip part 2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16, help="rank for part 2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--step-warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense bf16 TFLOPS of the device (H200/H100 SXM: 989)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, inter, heads, layers, vocab = 3072, 8192, 32, 32, 32064
    tokens = [int(t) for t in args.tokens.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.dry_run:
        hidden, inter, heads, layers, vocab = 192, 512, 2, 2, 1000
        tokens, ranks = [64], [8]
        args.repeats, args.warmup, args.batch, args.seq, args.steps, args.step_warmup = 2, 1, 2, 64, 1, 1
    elif device.type != "cuda":
        print("warning: no CUDA device; the full sizes will be very slow (use --dry-run)",
              file=sys.stderr)
    print(f"machine: {machine()}")
    print(f"device: {device}; bf16 base, fp32 adapters; dropout {args.dropout}\n")
    if not args.skip_layers:
        rows = layer_table(device, hidden, inter, tokens, ranks, args.dropout, args.repeats,
                           args.warmup)
        print(f"### Per projection: training step (fwd+bwd) time ratio, {args.repeats} interleaved "
              "rounds, median\n")
        print(markdown_table(["layer", "T", "r", "frozen ms", "ours/frozen", "peft/frozen",
                              "ours/peft"], rows))
    if not args.skip_step:
        dims = (layers, hidden, inter, heads, vocab)
        results = {}
        for variant in ["ours"] + (["peft"] if have("peft") else []):
            results[variant] = full_step(variant, device, args, dims)
            gc.collect()  # the model of the previous variant is gone once full_step returned
            if device.type == "cuda":
                torch.cuda.empty_cache()
        n = results["ours"]["n"]
        print(f"\n### Full training step: {layers} layers, hidden {hidden}, vocab {vocab} "
              f"(N={n / 1e9:.3f}B without the input embedding), batch {args.batch} x {args.seq} "
              f"tokens, LoRA r={args.r} on {', '.join(TARGETS)}\n")
        rows = [[v, f"{res['step_s'] * 1e3:.1f}", f"{res['tok_s']:.0f}",
                 f"{res['peak'] / 2**30:.2f}" if res["peak"] is not None else None,
                 f"{100 * res['mfu']:.1f}%"] for v, res in results.items()]
        print(markdown_table(["variant", "step ms", "tokens/s", "peak GiB", "MFU (4N)"], rows))


if __name__ == "__main__":
    main()
