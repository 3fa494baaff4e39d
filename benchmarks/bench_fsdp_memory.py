"""Per-process bytes of the frozen base, the adapters and the NF4 storage under FSDP2, for 1, 2 and 4
processes, on a Phi-3-mini-width model with a few layers (CPU, gloo).

The model is built on the meta device, injected (LoRA r=16 on every projection), sharded with the
job's own wrapping (:func:`lora_phi3.finetune.distributed.wrap_model`, ``fully_shard`` per decoder
layer and at the root) and only then materialised, so no process ever holds the whole model. The
figures are the bytes each process holds: the local shards of every parameter, and every buffer
(FSDP2 shards parameters only). One process is the unsharded model (what DDP keeps on every
process). The NF4 rows quantise the base first (``quantize_base="nf4"``); the job's wrapping
registers the 4-bit storage as frozen parameters so that FSDP2 shards it too.

    python benchmarks/bench_fsdp_memory.py                  # 2 layers, 1/2/4 processes
    python benchmarks/bench_fsdp_memory.py --layers 4 --world 1 2
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = 2
WORLDS = (1, 2, 4)
RANK = 16
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _model(layers: int, quantize: bool):
    from transformers import Phi3Config, Phi3ForCausalLM

    import lora_phi3 as lora
    cfg = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg).to(torch.bfloat16)
    lora.inject_lora(model, lora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                            quantize_base="nf4" if quantize else None),
                     input_recompute=False)
    return model


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _measure(rank: int, world: int, port: int, layers: int, quantize: bool, out) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    from lora_phi3.finetune.distributed import DistState, wrap_model
    model = _model(layers, quantize)
    if world > 1:
        wrap_model(model, DistState(rank=rank, world_size=world), fsdp=True)
    model.to_empty(device="cpu")  # materialise only this process's shards
    from lora_phi3.quant import NF4Weight
    storage = [t for m in model.modules() if isinstance(m, NF4Weight)
               for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]
    nf4_ids = {id(t) for t in storage}
    base = sum(_bytes(p) for p in model.parameters() if not p.requires_grad and id(p) not in nf4_ids)
    adapters = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    buffers = sum(_bytes(t) for t in storage)  # the NF4 codes and scales
    if rank == 0:
        out.put((world, quantize, base, adapters, buffers))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--world", type=int, nargs="+", default=list(WORLDS))
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for quantize in (False, True):
        for world in args.world:
            q = ctx.Queue()
            port = _free_port()
            procs = [ctx.Process(target=_measure, args=(r, world, port, args.layers, quantize, q))
                     for r in range(world)]
            for p in procs:
                p.start()
            rows.append(q.get(timeout=600))
            for p in procs:
                p.join(timeout=600)
    mib = 2 ** 20
    print(f"# Phi-3-mini width (hidden 3072, ffn 8192, vocab 32064), {args.layers} layers, bf16 "
          f"base, LoRA r={RANK} fp32 on {', '.join(TARGETS)}; bytes held by one process")
    print("| base | processes | base params MiB / process | adapters MiB / process | NF4 storage MiB / process |")
    print("|---|---|---|---|---|")
    for world, quantize, base, adapters, buffers in rows:
        print(f"| {'NF4' if quantize else 'bf16'} | {world}{' (no FSDP)' if world == 1 else ' (FSDP2)'} "
              f"| {base / mib:.1f} | {adapters / mib:.2f} | {buffers / mib:.1f} |")


if __name__ == "__main__":
    main()
