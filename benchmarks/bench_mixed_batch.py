"""Serving several adapters: one mixed batch against one batch per adapter, interleaved.

A Phi-3 model (Phi-3-mini's layer shapes scaled down by ``--width-div``; grouped-query attention
as in the real model) holds ``--adapters`` named adapters (rank 16 on every projection). A batch
of ``adapters x rows`` prompts, ``rows`` per adapter, is run:

- ``mixed``: once, under ``lora_phi3.mixed_batch`` (each layer runs one group per adapter);
- ``separate``: as one batch of ``rows`` per adapter, with ``set_adapter`` before each;
- ``one adapter``: the whole batch with a single adapter (the floor: no grouping at all).

HF PEFT's own mixed batch (``adapter_names=``) is not a peer here: PEFT adapts the fused
``qkv_proj``/``gate_up_proj`` whole while these adapters are per slice, so the work differs.

The figure is the median over rounds of each candidate's time over ``separate``'s in the same
round (no_grad forward, the serving case). The outputs of ``mixed`` are checked against
``separate`` before timing.

    python benchmarks/bench_mixed_batch.py            # default (about a minute on 2 cores)
    python benchmarks/bench_mixed_batch.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_phi3 as lora  # noqa: E402
from common import interleaved, load, machine, markdown_table, paired_ratio  # noqa: E402

ADAPTERS = 4
ROWS = 2            # prompts per adapter
TOKENS = 128        # tokens per prompt
LAYERS = 4
WIDTH_DIV = 4       # Phi-3-mini's hidden 3072, ffn 8192, 32 heads / 32 kv heads, divided by this
RANK = 16
REPEATS = 8
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def build(layers: int, width_div: int, adapters: int, seed: int = 0):
    """A random-weight Phi-3 with ``adapters`` named adapters ("a0", ...), all B non-zero."""
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=32064, hidden_size=3072 // width_div,
                     intermediate_size=8192 // width_div, num_hidden_layers=layers,
                     num_attention_heads=32 // width_div, num_key_value_heads=32 // width_div,
                     pad_token_id=0)
    model = Phi3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(adapters):
        config = lora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
        if i == 0:
            lora.inject_lora(model, config, adapter_name="a0")
        else:
            lora.add_adapter(model, config, f"a{i}")
        lora.set_adapter(model, f"a{i}")
        with torch.no_grad():
            for layer in lora.lora_modules(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=ADAPTERS)
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--width-div", type=int, default=WIDTH_DIV)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.width_div, args.tokens, args.repeats = 1, 16, 16, 2
    model = build(args.layers, args.width_div, args.adapters)
    names = [f"a{i}" for i in range(args.adapters)]
    row_names = [n for n in names for _ in range(args.rows)]
    ids = torch.randint(3, 32064, (len(row_names), args.tokens),
                        generator=torch.Generator().manual_seed(2))

    def separate():
        outs = []
        for i, name in enumerate(names):
            lora.set_adapter(model, name)
            outs.append(model(ids[i * args.rows:(i + 1) * args.rows]).logits)
        return torch.cat(outs)

    def mixed():
        with lora.mixed_batch(model, row_names):
            return model(ids).logits

    def one_adapter():
        lora.set_adapter(model, names[0])
        return model(ids).logits

    with torch.no_grad():
        torch.testing.assert_close(mixed(), separate(), atol=1e-4, rtol=0)
        fns = {"separate": separate, "mixed": mixed, "one adapter": one_adapter}
        times = interleaved(fns, repeats=args.repeats, warmup=1)
    rows = [[name, f"{sorted(t)[len(t) // 2] * 1e3:.0f}", f"{paired_ratio(times, name, 'separate'):.2f}x"]
            for name, t in times.items()]
    print(f"# {machine()}, load {load()}")
    print(f"# Phi-3 shapes / {args.width_div}, {args.layers} layers, {args.adapters} adapters x "
          f"{args.rows} prompts x {args.tokens} tokens, rank {RANK} on {', '.join(TARGETS)}; "
          f"no_grad forward, median of {args.repeats} interleaved rounds")
    print(markdown_table(["candidate", "median ms", "time / separate"], rows))


if __name__ == "__main__":
    main()
