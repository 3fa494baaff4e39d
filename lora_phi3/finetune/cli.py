"""The ``lora-phi3`` command: ``finetune``, ``merge``, ``export-peft`` and ``generate``.

``python -m lora_phi3.finetune.cli ...`` and ``python -m lora_phi3 ...`` are the same as the console
script. Under ``torchrun --nproc_per_node N`` the ``finetune`` command trains with DDP.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .model_kwargs import ATTN_IMPLEMENTATIONS, TORCH_DTYPES
from .recipe import LR_SCHEDULERS, ON_BAD_ROW, flag_name
from .run_lock import RunDirLocked

logger = logging.getLogger("lora_phi3.cli")

_REGEX_CHARS = set("*+?[](){}|^$\\")

# flag -> (section, field, type, help); section None = top level of the recipe
_TRAINING_FLAGS: list[tuple[str, type, str]] = [
    ("learning_rate", float, "AdamW peak learning rate"),
    ("batch_size", int, "rows per device per micro-batch"),
    ("gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    ("epochs", float, "passes over the training data (overrides the recipe's max_steps)"),
    ("max_steps", int, "optimizer steps (wins over --epochs)"),
    ("warmup_ratio", float, "share of steps with linear warm-up, in [0, 1)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("loraplus_lr_ratio", float, "LoRA+: train lora_B at this many times the learning rate "
                                 "(e.g. 16; default: off)"),
    ("max_grad_norm", float, "gradient clipping norm (0 = off)"),
    ("max_seq_length", int, "longest example in tokens (and packed row length)"),
    ("logging_steps", int, "log the loss every N steps"),
    ("eval_steps", int, "evaluate every N steps (0 = only before and after training)"),
    ("save_steps", int, "checkpoint every N steps (0 = only the final adapter)"),
    ("save_total_limit", int, "keep at most N checkpoints (0 = all)"),
    ("seed", int, "seed of adapter init, dropout and data order"),
    ("eval_fraction", float, "held-out share when the data has no eval split"),
    ("eval_accuracy_rows", int, "score exact match on the first N held-out chats (0 = all)"),
]
_BOOL_FLAGS: list[tuple[str, str]] = [
    ("packing", "pack examples into full rows (default) or pad per batch with --no-packing"),
    ("gradient_checkpointing", "recompute activations in backward"),
    ("fsdp", "shard the base and adapters over the torchrun processes with FSDP2 (default: DDP)"),
    ("bf16", "bf16 base weights and autocast"),
    ("train_on_prompt", "train on prompt tokens too (default: assistant tokens only)"),
    ("eval_accuracy", "also score exact match of greedy answers at each evaluation (default: on "
                      "for the demo, off with --model)"),
]
_LORA_FLAGS: list[tuple[str, type, str]] = [
    ("r", int, "LoRA rank"),
    ("lora_alpha", float, "LoRA alpha (scaling = alpha / r)"),
    ("lora_dropout", float, "dropout on the adapter input, in [0, 1)"),
]


def _target_modules(text: str) -> list[str] | str:
    """``a,b,c`` -> list of names; ``all-linear`` or a regex -> that string."""
    text = text.strip()
    if text == "all-linear" or (_REGEX_CHARS & set(text) and "," not in text):
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--target-modules needs module names, got {text!r}")
    return names


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lora-phi3`` (all four subcommands)."""
    parser = argparse.ArgumentParser(
        prog="lora-phi3", description="LoRA fine-tuning of Phi-3 (and other causal LMs).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser("finetune", help="train LoRA adapters on chat data",
                        description="Train LoRA adapters. Without --model and --config this runs "
                                    "the offline tiny demo; flags override the recipe file.")
    ft.add_argument("--config", help="recipe YAML with 'training', 'lora' and 'model_kwargs' "
                                     "sections (e.g. recipes/phi4-mini.yaml)")
    ft.add_argument("--model", help="hub id or local directory (default: embedded tiny demo model, "
                                    "e.g. --model microsoft/Phi-3-mini-4k-instruct)")
    ft.add_argument("--data", help=".jsonl/.json file, directory with train.jsonl, or HF dataset "
                                   "(default: bundled toy chat set)")
    ft.add_argument("--output-dir", help="run directory (default: lora-phi3-output)")
    ft.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                    help="continue from the newest complete checkpoint in --output-dir "
                         "(or from CHECKPOINT)")
    ft.add_argument("--overwrite-output-dir", action="store_true",
                    help="delete a previous run's files in --output-dir first")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    for name, typ, help_ in _TRAINING_FLAGS:
        ft.add_argument(flag_name(name), dest=f"training.{name}", type=typ, help=help_,
                        metavar=name.split("_")[-1].upper())
    ft.add_argument("--lr-scheduler", dest="training.lr_scheduler", choices=LR_SCHEDULERS,
                    help="learning-rate schedule after warm-up")
    ft.add_argument("--on-bad-row", dest="training.on_bad_row", choices=ON_BAD_ROW,
                    help="skip (count, warn) or error on a bad data row")
    for name, help_ in _BOOL_FLAGS:
        ft.add_argument(flag_name(name), dest=f"training.{name}", action=argparse.BooleanOptionalAction,
                        default=None, help=help_)
    for name, typ, help_ in _LORA_FLAGS:
        ft.add_argument(flag_name(name), dest=f"lora.{name}", type=typ, help=help_,
                        metavar=name.split("_")[-1].upper())
    ft.add_argument("--target-modules", dest="lora.target_modules", type=_target_modules,
                    metavar="NAMES",
                    help="comma-separated module names, 'all-linear', or one regex")
    ft.add_argument("--quantize-base", dest="lora.quantize_base", choices=["nf4"],
                    help="store the frozen base weights in 4-bit NF4 (QLoRA)")
    # how the model is loaded: the recipe's model_kwargs section
    ft.add_argument("--attn-implementation", dest="model_kwargs.attn_implementation",
                    choices=ATTN_IMPLEMENTATIONS,
                    help="attention: sdpa (default), eager, or flash_attention_2 (needs the "
                         "flash-attn package; not with packing)")
    ft.add_argument("--torch-dtype", dest="model_kwargs.torch_dtype", choices=TORCH_DTYPES,
                    help="weight dtype (default: bfloat16 with --bf16, else float32; auto = the "
                         "checkpoint's)")
    ft.add_argument("--use-cache", dest="model_kwargs.use_cache",
                    action=argparse.BooleanOptionalAction, default=None,
                    help="the model config's use_cache (default: off while training)")
    ft.add_argument("--trust-remote-code", dest="model_kwargs.trust_remote_code",
                    action=argparse.BooleanOptionalAction, default=None,
                    help="run modelling code shipped with the checkpoint (default: off)")
    _add_common(ft)

    for name, help_ in (("merge", "fold an adapter into its base: a plain HF checkpoint directory"),
                        ("export-peft", "write an adapter in PEFT's format")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--adapter", required=True, help="adapter directory (e.g. RUN/adapter)")
        p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
        p.add_argument("--output-dir", required=True, help="directory to write")
        _add_common(p)

    gen = sub.add_parser("generate", help="answer a prompt with a model and an adapter",
                         description="Greedy, chat-templated generation.")
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--system", help="optional system message")
    gen.add_argument("--adapter", help="adapter directory (default: the base model alone)")
    gen.add_argument("--model", help="base model (default: the adapter's, else the tiny demo)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    _add_common(gen)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {"model": args.model, "data": args.data, "output_dir": args.output_dir,
                            "model_kwargs": {}, "training": {}, "lora": {}}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            over[section][name] = value
    return over


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=getattr(logging, level) if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("matplotlib", "PIL", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _base_model_of(adapter: str, model: str | None) -> str | None:
    """``--model`` if given, else the base recorded in the adapter (None = embedded tiny model)."""
    if model is not None:
        return model
    from .. import read_adapter

    doc, _ = read_adapter(adapter)
    name = (doc.get("base_model") or {}).get("name_or_path")
    if name in (None, "", "embedded-tiny-phi3"):
        return None
    logger.info("base model from the adapter: %s", name)
    return name


def _load_base(name: str | None):
    from .models import load_model
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(name)
    return load_model(name, tokenizer=tokenizer), tokenizer


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .job import DEMO_NOTICE, TrainingInterrupted, finetune
    from .recipe import load_recipe

    recipe = load_recipe(args.config, overrides=_overrides(args))
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
        ctx = logging_redirect_tqdm()
    except ImportError:  # pragma: no cover
        import contextlib
        ctx = contextlib.nullcontext()
    threads = torch.get_num_threads()
    if recipe.is_demo and "OMP_NUM_THREADS" not in os.environ \
            and (args.device == "cpu" or (args.device is None and not torch.cuda.is_available())):
        # The demo's 128-wide matrices gain little from a second intra-op thread, and OpenMP
        # threads that spin-wait stall badly when the cores are busy (5x slower measured here).
        torch.set_num_threads(1)
        logger.info("tiny demo on CPU: using 1 intra-op thread (set OMP_NUM_THREADS to choose)")
    try:
        with ctx:
            summary = finetune(recipe, resume=args.resume or False,
                               overwrite_output_dir=args.overwrite_output_dir,
                               progress=not args.no_progress, device=args.device)
    except TrainingInterrupted as e:
        if main_rank:
            print(f"lora-phi3 finetune: {e}", file=sys.stderr)
        return e.exit_status  # 128 + signal number, as if the signal had ended the process
    finally:
        torch.set_num_threads(threads)
    if main_rank:
        _print_report(summary, Path(recipe.output_dir))
        if recipe.is_demo:
            print(f"NOTE: {DEMO_NOTICE}")
    return 0


def _print_report(summary: dict[str, Any], out: Path) -> None:
    """The final report of ``finetune``: loss, exact match (overall and per task), samples, files."""
    if summary["final_eval_loss"] is not None and summary["base_eval_loss"] is not None:
        print(f"eval loss: base {summary['base_eval_loss']:.4f} -> final "
              f"{summary['final_eval_loss']:.4f} (perplexity {summary['base_eval_perplexity']:.1f}"
              f" -> {summary['final_eval_perplexity']:.1f}) after {summary['steps']} steps, "
              f"{summary['seconds']:.1f} s, {summary['tokens_per_second']:.0f} tokens/s")
    else:
        print(f"trained {summary['steps']} steps (no eval data)")
    base, final = summary.get("base_eval_accuracy"), summary.get("final_eval_accuracy")
    if final is not None:
        before = "n/a" if base is None else f"{100 * base:.1f}%"
        print(f"exact match on {summary['eval_accuracy_rows']} held-out chats: base {before} -> "
              f"final {100 * final:.1f}%")
        per_task = summary.get("eval_accuracy_per_task") or {}
        cells = [f"{t} {_pct(v['base'])}->{_pct(v['final'])}" for t, v in per_task.items()]
        for i in range(0, len(cells), 4):
            print(("  per task: " if i == 0 else "            ") + ", ".join(cells[i:i + 4]))
    samples = summary.get("samples") or []
    if samples:
        print("held-out samples (greedy answers of the tuned model):")
    for s in samples:
        mark = {True: "right", False: "WRONG", None: "     "}[s.get("correct")]
        print(f"  [{mark}] {s['prompt']!r} -> {s['answer']!r}"
              + ("" if s.get("correct") else f" (reference {s['reference']!r})"))
    plot = out / "loss_curve.svg"
    print(f"adapter: {out / 'adapter'}  summary: {out / 'summary.json'}"
          + (f"  plot: {plot}" if plot.exists() else ""))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _cmd_merge(args: argparse.Namespace) -> int:
    from .. import load_adapter, merge_and_unload
    from ..atomic import atomic_dir
    from .run_lock import RunLock

    out = Path(args.output_dir)
    with RunLock.beside(out):  # one writer: refuse a second merge into the same directory
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"lora-phi3 merge: --output-dir {out} exists and is not empty; choose "
                             "a new directory (a merged checkpoint is never written over another)")
        base = _base_model_of(args.adapter, args.model)
        model, tokenizer = _load_base(base)
        load_adapter(model, args.adapter)
        model = merge_and_unload(model)
        # Written complete into a temp dir beside the target, then renamed: a crash never leaves
        # a half-written checkpoint that from_pretrained would load.
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained or "
          f"--model {out})")
    return 0


def _cmd_export_peft(args: argparse.Namespace) -> int:
    from .. import export_peft, load_adapter

    base = _base_model_of(args.adapter, args.model)
    model, _ = _load_base(base)
    load_adapter(model, args.adapter)
    export_peft(model, args.output_dir)
    print(f"PEFT adapter written to {args.output_dir}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_answer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    base = _base_model_of(args.adapter, args.model) if args.adapter else args.model
    model, tokenizer = _load_base(base)
    if args.adapter:
        from .. import load_adapter
        load_adapter(model, args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    print(generate_answer(model, tokenizer, messages, max_new_tokens=args.max_new_tokens))
    return 0


_COMMANDS = {"finetune": _cmd_finetune, "merge": _cmd_merge, "export-peft": _cmd_export_peft,
             "generate": _cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-phi3``. User errors exit with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, NotImplementedError, RunDirLocked) as e:
        logger.debug("error details", exc_info=True)
        parser.exit(2, f"lora-phi3 {args.command}: error: {e}\n")
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
