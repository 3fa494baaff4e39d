"""QLoRA base-weight benchmark: NF4 storage and NF4LinearFunction against a frozen bf16 linear.

For one Phi-3-mini-sized projection (default: down_proj, weight (3072, 8192), T=256 tokens) it
measures, in one run and interleaved:
  * stored base-weight bytes (NF4 must be <= 0.27 of bf16, else the script exits 1),
  * peak training memory of one forward+backward step = stored weight + peak transient bytes,
  * forward+backward time (median),
  * weight round-trip error against the bf16 weight,
for bf16 ``F.linear``, our ``NF4LinearFunction`` and, when importable, bitsandbytes' NF4
``matmul_4bit`` (what ``bnb.nn.Linear4bit`` calls). Then it extrapolates base bytes to the full
Phi-3-mini (3.82B params; embeddings, lm_head and norms kept in bf16).

Memory method: on CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the
step. On CPU, the torch profiler's allocation events (``profile_memory=True``): the running sum
of allocated-minus-freed bytes during the step, whose maximum is the transient peak. Both count
only tensors allocated by torch, not Python objects or allocator caching.

Usage: python benchmarks/bench_qlora.py [--device cuda] [--tokens 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lora_phi3.quant.nf4 import DOUBLE_QUANT_BLOCK_SIZE, chunk_elements as _chunk_elements, nf4_dequantize, nf4_quantize
from lora_phi3.quant.nf4_linear import nf4_matmul

# Phi-3-mini-4k: hidden 3072, intermediate 8192, 32 layers, vocab 32064, untied lm_head.
HIDDEN, LAYERS, VOCAB = 3072, 32, 32064
LINEAR_SHAPES = {  # (out_features, in_features) of each projection, per decoder layer
    "qkv_proj": (9216, 3072),
    "o_proj": (3072, 3072),
    "gate_up_proj": (16384, 3072),
    "down_proj": (3072, 8192),
}
MAX_BYTES_RATIO = 0.27  # 4.127 bits / 16 bits = 0.258, plus slack for small layers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--in-features", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=256, help="T: rows of the input per step")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    return parser.parse_args()


def nf4_nbytes(numel: int, block_size: int, double_quant: bool) -> int:
    """Bytes our NF4Tensor stores for ``numel`` weights (checked against .nbytes in main)."""
    blocks = numel // block_size
    scales = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK_SIZE) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


def peak_transient_bytes(step, device: torch.device) -> int | None:
    """Peak bytes allocated above the starting point while ``step()`` runs (None: unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        from torch._C._profiler import _EventType  # allocation events of the CPU profiler (private)
    except ImportError:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def make_variants(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, args) -> dict:
    """name -> (training step, stored weight bytes, dense weight it computes with)."""
    double_quant = not args.no_double_quant

    def train_step(forward):
        def step():
            x.grad = None
            forward(x).backward(grad_out)

        return step

    variants = {"bf16 F.linear": (train_step(lambda inp: F.linear(inp, weight)), weight.nbytes, weight)}
    q = nf4_quantize(weight, block_size=args.block_size, double_quant=double_quant)
    assert q.nbytes == nf4_nbytes(weight.numel(), args.block_size, double_quant)
    variants["NF4 (ours)"] = (train_step(lambda inp: nf4_matmul(inp, q)), q.nbytes, q.dequantize())
    try:
        import bitsandbytes as bnb

        packed, state = bnb.functional.quantize_4bit(
            weight, blocksize=args.block_size, compress_statistics=double_quant, quant_type="nf4"
        )
        stored = [packed, state.absmax]
        if double_quant:  # bitsandbytes also stores the 256-entry 8-bit map with each weight
            stored += [state.state2.absmax, state.state2.code, state.offset]
        variants["bnb matmul_4bit"] = (
            train_step(lambda inp: bnb.matmul_4bit(inp, packed.t(), quant_state=state)),
            sum(t.nbytes for t in stored),
            bnb.functional.dequantize_4bit(packed, state),
        )
    except Exception as exc:  # optional peer: absent, or no 4-bit path on this device
        print(f"(bitsandbytes column skipped: {type(exc).__name__}: {exc})".splitlines()[0])
    return variants


def time_interleaved(variants: dict, device: torch.device, args) -> dict:
    """Median seconds per forward+backward step, the variants taking turns each round."""
    times = {name: [] for name in variants}
    for round_index in range(args.warmup + args.repeats):
        for name, (step, _, _) in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def full_model_rows(block_size: int, double_quant: bool) -> list[tuple[str, int, int, int]]:
    """(part, params, bf16 bytes, QLoRA bytes) for Phi-3-mini with NF4 projections."""
    linear = LAYERS * sum(out_f * in_f for out_f, in_f in LINEAR_SHAPES.values())
    linear_nf4 = LAYERS * sum(nf4_nbytes(o * i, block_size, double_quant) for o, i in LINEAR_SHAPES.values())
    embeddings = 2 * VOCAB * HIDDEN  # embed_tokens + lm_head, kept in bf16
    norms = (2 * LAYERS + 1) * HIDDEN  # two RMSNorms per layer + final, kept in bf16
    rows = [("decoder projections", linear, 2 * linear, linear_nf4),
            ("embed_tokens + lm_head", embeddings, 2 * embeddings, 2 * embeddings),
            ("RMSNorm weights", norms, 2 * norms, 2 * norms)]  # fmt: skip
    rows.append(("total", *(sum(column) for column in zip(*(row[1:] for row in rows)))))
    return rows


def main() -> int:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.out_features, args.in_features)
    weight = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    x = torch.randn(args.tokens, args.in_features, generator=gen, device=device, dtype=torch.bfloat16)
    x.requires_grad_(True)
    grad_out = torch.randn(args.tokens, args.out_features, generator=gen, device=device, dtype=torch.bfloat16)

    variants = make_variants(weight, x, grad_out, args)
    peaks = {name: peak_transient_bytes(step, device) for name, (step, _, _) in variants.items()}
    times = time_interleaved(variants, device, args)

    mib = 2**20
    base_bytes, base_time = variants["bf16 F.linear"][1], times["bf16 F.linear"]
    print(f"\nlayer weight {shape} bf16, T={args.tokens}, block {args.block_size}, "
          f"double quant {not args.no_double_quant}, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")  # fmt: skip
    header = (
        f"{'variant':<16} {'weight MiB':>10} {'bits/param':>10} {'bytes ratio':>11} "
        f"{'peak train MiB':>14} {'fwd+bwd ms':>10} {'time ratio':>10} {'weight rel err':>14}"
    )
    print(header + "\n" + "-" * len(header))
    for name, (_, stored, dense) in variants.items():
        err = ((dense.float() - weight.float()).norm() / weight.float().norm()).item()
        peak = "n/a" if peaks[name] is None else f"{(stored + peaks[name]) / mib:.2f}"
        print(f"{name:<16} {stored / mib:>10.2f} {8 * stored / weight.numel():>10.3f} "
              f"{stored / base_bytes:>11.3f} {peak:>14} "
              f"{times[name] * 1e3:>10.2f} {times[name] / base_time:>10.2f} {err:>14.4f}")  # fmt: skip

    q = nf4_quantize(weight, block_size=args.block_size, double_quant=not args.no_double_quant)
    deq_times = []
    for round_index in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        nf4_dequantize(q)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if round_index >= args.warmup:
            deq_times.append(time.perf_counter() - start)
    print(f"\nnf4_dequantize of the whole weight to bf16: {statistics.median(deq_times) * 1e3:.2f} ms "
          "(the training step above never does this: it dequantises slabs)")

    rows = full_model_rows(args.block_size, not args.no_double_quant)
    print("\nPhi-3-mini base weights, NF4 projections (extrapolated from the layout above)\n")
    print(f"{'part':<24} {'params (M)':>11} {'bf16 GiB':>9} {'QLoRA GiB':>10}")
    for part, params, bf16_bytes, qlora_bytes in rows:
        print(f"{part:<24} {params / 1e6:>11.1f} {bf16_bytes / 2**30:>9.3f} {qlora_bytes / 2**30:>10.3f}")
    total = rows[-1]
    print(f"{'ratio':<24} {'':>11} {'':>9} {total[3] / total[2]:>10.3f}")
    slab = max(_chunk_elements(device), max(o * args.block_size for o, _ in LINEAR_SHAPES.values()))
    print(f"(a QLoRA step also holds one transient dense slab of a projection on {device.type}: at most "
          f"{slab / 2**20:.0f} Mi elements, {6 * slab / mib:.0f} MiB with its fp32 staging)")  # fmt: skip

    ratio = variants["NF4 (ours)"][1] / base_bytes
    if ratio > MAX_BYTES_RATIO:
        print(f"FAIL: NF4/bf16 weight bytes {ratio:.3f} > {MAX_BYTES_RATIO}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
