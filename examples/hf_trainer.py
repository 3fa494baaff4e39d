"""A LoRA-injected model inside transformers' ``Trainer``.

``inject_lora`` leaves a normal ``PreTrainedModel`` whose only trainable parameters are the
adapters, so ``Trainer`` trains it as is; we only save the adapter ourselves (``save_adapter``),
since ``Trainer`` would checkpoint the whole model. Needs ``accelerate`` (``pip install
accelerate``), as every ``Trainer`` does. Runs offline on the tiny demo model in under a minute:

    python examples/hf_trainer.py
    python examples/hf_trainer.py --model microsoft/Phi-3-mini-4k-instruct --data chats.jsonl
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from lora_phi3 import LoraConfig, inject_lora, save_adapter
from lora_phi3.finetune.conversations import load_conversations
from lora_phi3.finetune.data import tokenize_dataset
from lora_phi3.finetune.packing import collate
from lora_phi3.finetune.models import load_model
from lora_phi3.finetune.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="hub id or local dir; omit for the tiny demo model")
    ap.add_argument("--data", help="chat data; omit for the bundled toy set")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, tokenizer=tokenizer)
    inject_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))  # Phi-3 default targets

    train, held_out, _ = load_conversations(args.data)
    train_ds = tokenize_dataset(tokenizer, train, 512)  # list of {"input_ids", "labels"}
    eval_ds = tokenize_dataset(tokenizer, held_out[:64], 512)

    def data_collator(rows):  # dynamic padding; assistant-only labels from tokenize_dataset
        batch = collate(rows, tokenizer.pad_token_id, packing=False)
        return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}

    demo = args.model is None
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.output_dir or tmp, max_steps=args.max_steps,
            per_device_train_batch_size=16 if demo else 4, per_device_eval_batch_size=16,
            learning_rate=5e-3 if demo else 2e-4, lr_scheduler_type="cosine",
            warmup_steps=0.05,  # a float in [0, 1) is a ratio (transformers 5; 4.x: warmup_ratio)
            logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[],
            remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
            bf16=not demo and torch.cuda.is_available(),
            gradient_checkpointing=not demo,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=data_collator)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        print(f"held-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.0f} -> "
              f"{math.exp(after):.1f})")
        path = save_adapter(model, f"{targs.output_dir}/adapter")
        print(f"adapter saved to {path}" + (" (temporary directory)" if not args.output_dir else ""))


if __name__ == "__main__":
    main()
