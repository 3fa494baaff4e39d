"""The Python API equivalent of ``lora-phi3 finetune``.

With no arguments this runs the offline tiny demo (embedded pretrained tiny Phi-3, bundled toy
chats) for a few steps, then scores the tuned model's answers on held-out chats. With ``--model microsoft/Phi-3-mini-4k-instruct --data chats.jsonl`` it runs the
real recipe (``recipes/phi3-mini.yaml`` values; a GPU with bf16 is the intended target).

    python examples/finetune_phi3.py --max-steps 20
    python examples/finetune_phi3.py --model microsoft/Phi-3-mini-4k-instruct --data chats.jsonl
    torchrun --nproc_per_node 2 examples/finetune_phi3.py --max-steps 20   # DDP, same result as
                                                                            # --batch-size 2x
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lora_phi3 import load_adapter
from lora_phi3.finetune import exact_match_accuracy, finetune, generate_answer
from lora_phi3.finetune.conversations import load_conversations
from lora_phi3.finetune.models import load_model
from lora_phi3.finetune.recipe import load_recipe
from lora_phi3.finetune.tokenizer import load_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "phi3-mini.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="hub id or local dir; omit for the tiny demo model")
    ap.add_argument("--data", help="chat data (.jsonl/.json/dir); omit for the bundled toy set")
    ap.add_argument("--output-dir", default="runs/finetune_phi3_example")
    ap.add_argument("--max-steps", type=int, default=40)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # Same precedence as the CLI: built-in defaults < recipe file < explicit overrides.
    recipe = load_recipe(
        RECIPE if args.model else None,
        overrides={"model": args.model, "data": args.data, "output_dir": args.output_dir,
                   "training": {"max_steps": args.max_steps}},
    )
    summary = finetune(recipe, overwrite_output_dir=True, progress=True)
    print(f"eval loss {summary['base_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s, {summary['seconds']:.1f} s")

    # Use the trained adapter: a fresh base model + load_adapter (which injects the saved config).
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer=tokenizer)
    load_adapter(model, Path(recipe.output_dir) / "adapter")
    question = [{"role": "user", "content": "What is 12 plus 7?"}]
    print("answer:", generate_answer(model, tokenizer, question, max_new_tokens=16))

    # Exact match of greedy answers on (the first 50) held-out chats of the same data.
    _, held_out, _ = load_conversations(recipe.data)
    report = exact_match_accuracy(model, tokenizer, held_out[:50])
    print(f"exact match on {report.total} held-out chats: {report.accuracy:.0%}")


if __name__ == "__main__":
    main()
