"""``finetune(recipe)``: the whole job: model, data, LoRA, training, evaluation, outputs.

This is what ``lora-phi3 finetune`` runs, and the Python API equivalent of it. Outputs in
``recipe.output_dir`` (written by rank 0 only): ``checkpoint-<step>/``, ``adapter/``,
``metrics.jsonl``, ``loss_curve.png`` (with matplotlib), ``summary.json`` and ``recipe.json``.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..adapters.files import load_adapter, save_adapter
from .checkpoint import (capture_rng_state, clean_partial_checkpoints, find_latest_checkpoint,
                         load_training_state, restore_rng_state, save_checkpoint)
from .data import load_conversations, tokenize_dataset
from .packing import collate, pack_examples
from .distributed import (DistState, all_gather_objects, barrier, setup_distributed,
                          teardown_distributed, wrap_model)
from ..layers.functional import enable_input_recompute
from ..inject.injector import inject_lora
from .models import REAL_PHI3_MINI, count_parameters, load_model
from ..quant.qlora import load_quantized_model
from .recipe import Recipe
from .reporting import MetricsLog, peak_memory_bytes, perplexity, plot_loss_curve, write_json_atomic
from .tokenizer import load_tokenizer
from .train import (CausalLMLoss, enable_gradient_checkpointing, evaluate, global_batch_indices, local_micro_batches,
                    make_optimizer, make_scheduler, plan_steps, train_step)

logger = logging.getLogger(__name__)

__all__ = ["finetune", "DEMO_NOTICE", "generate_answer", "set_seed"]

DEMO_NOTICE = (
    "This is the embedded TINY DEMONSTRATION model (a randomly initialised 2-layer Phi-3 on toy "
    "tasks), not Phi-3-mini: it shows the pipeline end to end, offline, in under a minute. "
    f"For the real model run: lora-phi3 finetune --model {REAL_PHI3_MINI} --data your_chats.jsonl "
    "(or --config recipes/phi3-mini.yaml)"
)
_RUN_FILES = ("adapter", "summary.json", "metrics.jsonl", "loss_curve.png", "recipe.json")


def set_seed(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Data:
    train_rows: list[dict]
    eval_rows: list[dict]
    eval_conversations: list[list[dict]]
    report: Any


def _prepare_data(tokenizer, recipe: Recipe) -> _Data:
    t = recipe.training
    train, evals, report = load_conversations(recipe.data, on_bad_row=t.on_bad_row,
                                              eval_fraction=t.eval_fraction, seed=t.seed)
    kw = dict(train_on_prompt=t.train_on_prompt, on_bad_row=t.on_bad_row, report=report)
    train_ex = tokenize_dataset(tokenizer, train, t.max_seq_length,
                                locations=report.train_locations, source_name="train", **kw)
    eval_ex = tokenize_dataset(tokenizer, evals, t.max_seq_length,
                               locations=report.eval_locations, source_name="eval", **kw)
    if not train_ex:
        raise ValueError(f"no training example fits max_seq_length {t.max_seq_length} "
                         f"({report.summary()})")
    if t.packing:
        train_rows, eval_rows = (pack_examples(train_ex, t.max_seq_length),
                                 pack_examples(eval_ex, t.max_seq_length))
    else:
        train_rows, eval_rows = train_ex, eval_ex
    logger.info("data: %d train examples -> %d rows, %d eval examples -> %d rows (packing=%s)",
                len(train_ex), len(train_rows), len(eval_ex), len(eval_rows), t.packing)
    return _Data(train_rows, eval_rows, evals, report)


def _check_output_dir(out: Path, resume: bool | str, overwrite: bool) -> None:
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    ours = [n for n in existing if n in _RUN_FILES or n.startswith("checkpoint-")]
    if not ours or resume:
        return
    if overwrite:
        for n in ours:
            p = out / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    raise ValueError(f"--output-dir {str(out)!r} already holds a run ({', '.join(sorted(ours)[:4])}); "
                     "pass --resume to continue it, --overwrite-output-dir to replace it, or choose "
                     "another --output-dir")


def generate_answer(model: nn.Module, tokenizer, messages: list[dict], *,
                    max_new_tokens: int = 48) -> str:
    """Greedy chat-templated answer of ``model`` to ``messages`` (ending with a user turn)."""
    device = next(model.parameters()).device
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    stop = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        stop.append(end_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def finetune(recipe: Recipe, *, resume: bool | str = False, overwrite_output_dir: bool = False,
             progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Fine-tune LoRA adapters as ``recipe`` says; under torchrun, on every rank.

    Args:
        recipe: model, data, output dir, training and LoRA settings (see :func:`load_recipe`).
        resume: True continues from the newest complete checkpoint in the output dir (from scratch,
            with a warning, if there is none); a path continues from that checkpoint.
        overwrite_output_dir: delete a previous run's files in the output dir first.
        progress: show a tqdm progress bar on rank 0.
        device: "cpu", "cuda" or None (CUDA when available).

    Returns:
        The summary (also written to ``summary.json``), on every rank.

    Raises:
        ValueError: bad data (with ``on_bad_row="error"``), an output dir holding another run,
            a checkpoint from a run with another seed or global batch size, and other user errors.
    """
    t0 = time.time()
    dist = setup_distributed(device)
    try:
        return _finetune(recipe, dist, resume, overwrite_output_dir, progress, t0)
    finally:
        teardown_distributed(dist)


def _finetune(recipe: Recipe, dist: DistState, resume: bool | str, overwrite: bool,
              progress: bool, t0: float) -> dict[str, Any]:
    t = recipe.training
    out = Path(recipe.output_dir)
    if recipe.is_demo:
        logger.warning(DEMO_NOTICE)
    if dist.is_main:
        _check_output_dir(out, resume, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        clean_partial_checkpoints(out)
        write_json_atomic(out / "recipe.json", recipe.to_dict())
    barrier(dist)
    set_seed(t.seed)

    tokenizer = load_tokenizer(recipe.model)
    data = _prepare_data(tokenizer, recipe)
    use_bf16 = t.bf16 and _bf16_supported(dist.device)
    # bf16 off means fp32 weights, also for checkpoints stored in bf16 (no "auto" dtype here).
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if recipe.lora.quantize_base is not None and recipe.model is not None:
        # QLoRA on a real checkpoint: quantise projection by projection as the shards are read,
        # never holding the whole dense model and its 4-bit copy at once (it also injects LoRA).
        model = load_quantized_model(recipe.model, recipe.lora, dtype=dtype,
                                     attn_implementation="sdpa")
    else:
        model = load_model(recipe.model, dtype=dtype, tokenizer=tokenizer)
        # Inject before moving: the adapters are then initialised by the CPU generator, so a seed
        # gives the same run on CPU and GPU (the CUDA generator draws different numbers).
        inject_lora(model, recipe.lora)
    # LoRA layers fed by a norm or by SwiGLU rebuild their input in backward instead of keeping a
    # copy (docs/performance.md): saved activations stay close to the frozen model's.
    enable_input_recompute(model)
    model.to(dist.device)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    core = CausalLMLoss(model)
    wrapped = wrap_model(core, dist)
    optimizer = make_optimizer(params, t)
    plan = plan_steps(len(data.train_rows), t, dist.world_size)
    scheduler = make_scheduler(optimizer, t, plan.total_steps)
    mask_dtype = model.get_input_embeddings().weight.dtype  # the packed mask must match q's dtype
    sliding = getattr(model.config, "sliding_window", None)
    eval_kw = dict(batch_size=t.batch_size, pad_id=tokenizer.pad_token_id, packing=t.packing,
                   dist=dist, bf16=use_bf16, mask_dtype=mask_dtype, sliding_window=sliding)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main)
    logger.info("training %s trainable of %s parameters; %d steps (%d per epoch), global batch %d "
                "rows = %d x %d accumulation x %d processes", f"{count_parameters(model, True):,}",
                f"{count_parameters(model):,}", plan.total_steps, plan.steps_per_epoch,
                plan.global_batch_size, t.batch_size, t.gradient_accumulation_steps, dist.world_size)

    state = {"step": 0, "train_tokens": 0, "train_seconds": 0.0, "base_eval_loss": None}
    ckpt = _resolve_resume(out, resume)
    if ckpt is not None:
        state = _restore(ckpt, model, optimizer, scheduler, plan, t.seed, dist)
        metrics.truncate_after(state["step"])
        metrics.append({"type": "resume", "step": state["step"], "checkpoint": ckpt.name})
        logger.info("resumed from %s at step %d", ckpt, state["step"])
    else:
        metrics.truncate_after(-1)  # a fresh start drops records of an earlier (killed) attempt
        loss, n = evaluate(core, data.eval_rows, **eval_kw)
        state["base_eval_loss"] = loss
        metrics.append({"type": "eval", "step": 0, "eval_loss": loss,
                        "eval_perplexity": perplexity(loss), "eval_tokens": n, "base": True})
        logger.info("base model: eval loss %s, perplexity %s", _fmt(loss), _fmt(perplexity(loss)))

    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.total_steps, initial=state["step"], desc="finetune", unit="step",
                   dynamic_ncols=True)
    cache: dict = {}
    window = {"loss": 0.0, "tokens": 0, "labels": 0, "seconds": 0.0}
    for step in range(state["step"], plan.total_steps):
        idx = global_batch_indices(step, plan, t.seed, cache)
        n_tokens = sum(len(data.train_rows[i]["input_ids"]) for i in idx)
        micro = [collate([data.train_rows[i] for i in mb], tokenizer.pad_token_id, packing=t.packing,
                         mask_dtype=mask_dtype, sliding_window=sliding)
                 for mb in local_micro_batches(idx, dist.rank, t.batch_size,
                                               t.gradient_accumulation_steps)]
        ts = time.perf_counter()
        res = train_step(wrapped, micro, optimizer, scheduler, params, dist=dist,
                         max_grad_norm=t.max_grad_norm, bf16=use_bf16)
        dt = time.perf_counter() - ts
        done = step + 1
        state.update(step=done, train_tokens=state["train_tokens"] + n_tokens,
                     train_seconds=state["train_seconds"] + dt)
        window["loss"] += res["loss"] * res["label_tokens"]
        window["labels"] += res["label_tokens"]
        window["tokens"] += n_tokens
        window["seconds"] += dt
        tok_s = window["tokens"] / max(window["seconds"], 1e-9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{res['loss']:.4f}", lr=f"{res['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
        if done % t.logging_steps == 0 or done == plan.total_steps:
            rec = {"type": "train", "step": done, "epoch": round(done / plan.steps_per_epoch, 4),
                   "loss": window["loss"] / max(window["labels"], 1), "lr": res["lr"],
                   "grad_norm": res["grad_norm"], "tokens_per_second": tok_s,
                   "train_tokens": state["train_tokens"]}
            metrics.append(rec)
            logger.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s", done, plan.total_steps,
                        rec["loss"], res["lr"], tok_s)
            window = {"loss": 0.0, "tokens": 0, "labels": 0, "seconds": 0.0}
        if t.eval_steps and done % t.eval_steps == 0 and done < plan.total_steps:
            _eval_and_log(core, data, eval_kw, metrics, done)
        if t.save_steps and done % t.save_steps == 0 and done < plan.total_steps:
            _save(out, done, model, optimizer, scheduler, state, plan, t, dist)
    if bar is not None:
        bar.close()

    final_loss = _eval_and_log(core, data, eval_kw, metrics, plan.total_steps)
    summary = _finish(out, model, tokenizer, data, recipe, plan, state, final_loss, dist, t0)
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True
        logger.warning("bf16 requested but this GPU has no bfloat16 support; training in fp32")
        return False
    return True  # CPU autocast supports bfloat16


def _eval_and_log(core, data: _Data, eval_kw: dict, metrics: MetricsLog, step: int) -> float | None:
    loss, n = evaluate(core, data.eval_rows, **eval_kw)
    metrics.append({"type": "eval", "step": step, "eval_loss": loss,
                    "eval_perplexity": perplexity(loss), "eval_tokens": n})
    logger.info("step %d: eval loss %s, perplexity %s", step, _fmt(loss), _fmt(perplexity(loss)))
    return loss


def _resolve_resume(out: Path, resume: bool | str) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("latest", "true", "True"):
        p = Path(resume)
        if not p.is_dir():
            raise ValueError(f"--resume: checkpoint directory {resume!r} does not exist")
        return p
    found = find_latest_checkpoint(out)
    if found is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch", out)
    return found


def _restore(ckpt: Path, model, optimizer, scheduler, plan, seed: int, dist: DistState) -> dict:
    st = load_training_state(ckpt, dist.rank, map_location=dist.device)
    ts = st["trainer_state"]
    for key, have in (("seed", seed), ("global_batch_size", plan.global_batch_size),
                      ("n_rows", plan.n_rows), ("total_steps", plan.total_steps)):
        if ts.get(key) != have:
            raise ValueError(f"--resume: {ckpt} was written with {key}={ts.get(key)!r} but this run "
                             f"has {key}={have!r}; an exact resume needs the same data, seed, "
                             "global batch size and step count")
    load_adapter(model, ckpt)
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    restore_rng_state(st["rng"])
    return {k: ts[k] for k in ("step", "train_tokens", "train_seconds", "base_eval_loss")}


def _save(out: Path, step: int, model, optimizer, scheduler, state: dict, plan, t,
          dist: DistState) -> None:
    rng = all_gather_objects(capture_rng_state(), dist)  # every rank's generators, in memory
    if dist.is_main:
        epoch, pos = divmod(step, plan.steps_per_epoch)
        trainer_state = {**state, "seed": t.seed, "global_batch_size": plan.global_batch_size,
                         "n_rows": plan.n_rows, "total_steps": plan.total_steps,
                         "world_size": dist.world_size,
                         "data_position": {"epoch": epoch, "batch_in_epoch": pos}}
        save_checkpoint(out, step, write_adapter=lambda p: save_adapter(model, p),
                        optimizer=optimizer, scheduler=scheduler, rng_states=rng,
                        trainer_state=trainer_state, save_total_limit=t.save_total_limit)
    barrier(dist)


def _finish(out: Path, model, tokenizer, data: _Data, recipe: Recipe, plan, state: dict,
            final_loss: float | None, dist: DistState, t0: float) -> dict[str, Any]:
    peak, peak_kind = peak_memory_bytes(dist.device)
    peaks = all_gather_objects(peak, dist)
    report = data.report
    summary: dict[str, Any] = {
        "model": recipe.model or "embedded-tiny-phi3", "demo": recipe.is_demo,
        "base_eval_loss": state["base_eval_loss"],
        "base_eval_perplexity": perplexity(state["base_eval_loss"]),
        "final_eval_loss": final_loss, "final_eval_perplexity": perplexity(final_loss),
        "steps": state["step"], "epochs": round(state["step"] / plan.steps_per_epoch, 4),
        "global_batch_size": plan.global_batch_size, "world_size": dist.world_size,
        "train_tokens": state["train_tokens"], "train_seconds": round(state["train_seconds"], 3),
        "tokens_per_second": state["train_tokens"] / max(state["train_seconds"], 1e-9),
        "peak_memory_bytes": max(peaks), "peak_memory_kind": peak_kind,
        "seconds": round(time.time() - t0, 3),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "total_parameters": count_parameters(model),
        "data": {"source": report.source, "rows_read": report.rows_read, "kept": report.kept,
                 "skipped": report.skipped, "too_long": report.too_long,
                 "train_rows": len(data.train_rows), "eval_rows": len(data.eval_rows)},
    }
    if dist.is_main:
        save_adapter(model, out / "adapter")
        sample = _sample(model, tokenizer, data.eval_conversations)
        if sample is not None:
            summary["sample"] = sample
        plot_loss_curve(MetricsLog(out / "metrics.jsonl").read(), out / "loss_curve.png")
        write_json_atomic(out / "summary.json", summary)
        logger.info("done: eval loss %s -> %s in %d steps, %.1f s; adapter in %s",
                    _fmt(summary["base_eval_loss"]), _fmt(final_loss), state["step"],
                    summary["seconds"], out / "adapter")
    barrier(dist)
    return summary


def _sample(model, tokenizer, conversations: list[list[dict]]) -> dict[str, str] | None:
    """Answer the first held-out conversation's last user turn."""
    for conv in conversations:
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        prompt = conv[:last]
        answer = generate_answer(model, tokenizer, prompt)
        return {"prompt": prompt[-1]["content"], "reference": conv[last]["content"],
                "answer": answer}
    return None
