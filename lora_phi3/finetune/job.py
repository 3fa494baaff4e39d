"""``finetune(recipe)``: the whole job: model, data, LoRA, training, evaluation, outputs.

This is what ``lora-phi3 finetune`` runs, and the Python API equivalent of it. The job is a
:class:`FinetuneJob` whose steps are separate methods (``setup``, ``train``, ``evaluate``,
``save_checkpoint``, ``finish``, ``cleanup``) and whose state lives in its attributes; the loop's
running totals are one :class:`TrainState`, which is what a checkpoint stores.

Outputs in ``recipe.output_dir`` (written by rank 0 only): ``checkpoint-<step>/``, ``adapter/``,
``metrics.jsonl``, ``loss_curve.png`` (with matplotlib), ``summary.json`` and ``recipe.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

# The library through its public face only (``lora_phi3/__init__``): never through its internals.
from .. import (inject_lora, load_adapter, load_quantized_model,
                save_adapter)
from ..atomic import write_json_atomic
from . import checkpoint as ckpt
from .dataset import TrainingData, prepare_data
from .distributed import (DistState, all_gather_objects, barrier, setup_distributed,
                          teardown_distributed, wrap_model)
from .generate import sample_answer
from .models import REAL_PHI3_MINI, count_parameters, load_model
from .packing import collate
from .recipe import Recipe
from .reporting import MetricsLog, check_output_dir, peak_memory_bytes, perplexity, plot_loss_curve
from .tokenizer import load_tokenizer
from .train import (CausalLMLoss, StepPlan, bf16_supported, enable_gradient_checkpointing,
                    evaluate, global_batch_indices, local_micro_batches, make_optimizer,
                    make_scheduler, plan_steps, train_step)

logger = logging.getLogger(__name__)

__all__ = ["finetune", "FinetuneJob", "TrainState", "DEMO_NOTICE", "set_seed"]

DEMO_NOTICE = (
    "This is the embedded TINY DEMONSTRATION model (a randomly initialised 2-layer Phi-3 on toy "
    "tasks), not Phi-3-mini: it shows the pipeline end to end, offline, in under a minute. "
    f"For the real model run: lora-phi3 finetune --model {REAL_PHI3_MINI} --data your_chats.jsonl "
    "(or --config recipes/phi3-mini.yaml)"
)


def set_seed(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """The loop's position and running totals: saved in every checkpoint, restored on resume."""

    step: int = 0                        # optimizer steps done
    train_tokens: int = 0                # tokens (labels or not) of every global batch so far
    train_seconds: float = 0.0           # time inside train_step, summed
    base_eval_loss: float | None = None  # eval loss before training (None: no eval data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        """The fields of ``data`` (a checkpoint's ``trainer_state``, which holds more keys)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass
class _LogWindow:
    """Training records since the last logged step (the logged loss is their token mean)."""

    loss_sum: float = 0.0
    label_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class FinetuneJob:
    """One fine-tuning run of ``recipe``; under torchrun, one per rank.

    ``run()`` is ``setup(); train(); finish()``, then ``cleanup()`` whatever happened. The
    arguments are those of :func:`finetune`.
    """

    def __init__(self, recipe: Recipe, *, resume: bool | str = False,
                 overwrite_output_dir: bool = False, progress: bool = True,
                 device: str | None = None) -> None:
        self.recipe = recipe
        self.cfg = recipe.training
        self.out = Path(recipe.output_dir)
        self.resume = resume
        self.overwrite_output_dir = overwrite_output_dir
        self.progress = progress
        self.requested_device = device  # "cpu", "cuda" or None; the one used is dist.device
        self.t0 = time.time()
        self.dist: DistState | None = None
        self.state = TrainState()

    def run(self) -> dict[str, Any]:
        """Set up, train, evaluate and write the outputs. Returns the summary (every rank)."""
        try:
            self.setup()
            self.train()
            return self.finish()
        finally:
            self.cleanup()

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Join the process group, prepare the output dir, data, model, optimizer and schedule,
        then restore a checkpoint (``resume``) or evaluate the base model."""
        t = self.cfg
        self.dist = dist = setup_distributed(self.requested_device)
        if self.recipe.is_demo:
            logger.warning(DEMO_NOTICE)
        if dist.is_main:
            self._prepare_output_dir()
        barrier(dist)
        set_seed(t.seed)

        self.tokenizer = load_tokenizer(self.recipe.model)
        self.data: TrainingData = prepare_data(self.tokenizer, self.recipe)
        self.use_bf16 = t.bf16 and bf16_supported(dist.device)
        self.model = model = self._load_model()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_module = CausalLMLoss(model)
        self.wrapped = wrap_model(self.loss_module, dist)
        self.optimizer = make_optimizer(self.params, t)
        self.plan: StepPlan = plan_steps(len(self.data.train_rows), t, dist.world_size)
        self.scheduler = make_scheduler(self.optimizer, t, self.plan.total_steps)
        self.mask_dtype = model.get_input_embeddings().weight.dtype  # packed mask: q's dtype
        self.sliding_window = getattr(model.config, "sliding_window", None)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=dist.is_main)
        plan = self.plan
        logger.info("training %s trainable of %s parameters; %d steps (%d per epoch), global batch "
                    "%d rows = %d x %d accumulation x %d processes",
                    f"{count_parameters(model, True):,}", f"{count_parameters(model):,}",
                    plan.total_steps, plan.steps_per_epoch, plan.global_batch_size, t.batch_size,
                    t.gradient_accumulation_steps, dist.world_size)
        self._resume_or_evaluate_base()

    def _prepare_output_dir(self) -> None:
        """Rank 0: refuse or clear another run's files, drop killed checkpoint writes, and record
        the recipe."""
        check_output_dir(self.out, self.resume, self.overwrite_output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial_checkpoints(self.out)
        write_json_atomic(self.out / "recipe.json", self.recipe.to_dict())

    def _resume_or_evaluate_base(self) -> None:
        """Continue from the checkpoint ``resume`` names, or start fresh with the base eval loss."""
        found = ckpt.resolve_resume(self.out, self.resume)
        if found is None:
            self.metrics.truncate_after(-1)  # a fresh start drops records of a killed attempt
            self.state.base_eval_loss = self.evaluate(0, base=True)
            return
        self._restore(found)
        self.metrics.truncate_after(self.state.step)
        self.metrics.append({"type": "resume", "step": self.state.step, "checkpoint": found.name})
        logger.info("resumed from %s at step %d", found, self.state.step)

    def _load_model(self) -> nn.Module:
        recipe, dist = self.recipe, self.dist
        # bf16 off means fp32 weights, also for checkpoints stored in bf16 (no "auto" dtype here).
        dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        if recipe.lora.quantize_base is not None and recipe.model is not None:
            # QLoRA on a real checkpoint: quantise projection by projection as the shards are read,
            # never holding the whole dense model and its 4-bit copy at once (it also injects LoRA).
            model = load_quantized_model(recipe.model, recipe.lora, dtype=dtype,
                                         attn_implementation="sdpa")
        else:
            model = load_model(recipe.model, dtype=dtype, tokenizer=self.tokenizer)
            # Inject before moving: the adapters are then initialised by the CPU generator, so a
            # seed gives the same run on CPU and GPU (the CUDA generator draws other numbers).
            # inject_lora also turns input recompute on (docs/performance.md): LoRA layers fed by
            # a norm or by SwiGLU rebuild their input in backward instead of keeping a copy.
            inject_lora(model, recipe.lora)
        model.to(dist.device)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        return model

    def _restore(self, path: Path) -> None:
        """Load adapter, optimizer, scheduler and RNG states; refuse a checkpoint of another run."""
        dist, plan = self.dist, self.plan
        st = ckpt.load_training_state(path, dist.rank, map_location=dist.device)
        ts = st["trainer_state"]
        for key, have in (("seed", self.cfg.seed), ("global_batch_size", plan.global_batch_size),
                          ("n_rows", plan.n_rows), ("total_steps", plan.total_steps)):
            if ts.get(key) != have:
                raise ValueError(f"--resume: {path} was written with {key}={ts.get(key)!r} but "
                                 f"this run has {key}={have!r}; an exact resume needs the same "
                                 "data, seed, global batch size and step count")
        load_adapter(self.model, path)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        ckpt.restore_rng_state(st["rng"])
        self.state = TrainState.from_dict(ts)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> None:
        """Optimizer steps from ``state.step`` to the plan's total, with logging, periodic
        evaluation and checkpoints."""
        t, plan = self.cfg, self.plan
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=plan.total_steps, initial=self.state.step, desc="finetune",
                       unit="step", dynamic_ncols=True)
        window = _LogWindow()
        order_cache: dict = {}
        try:
            for step in range(self.state.step, plan.total_steps):
                res, n_tokens, seconds = self._step(step, order_cache)
                done = self.state.step
                window.loss_sum += res["loss"] * res["label_tokens"]
                window.label_tokens += res["label_tokens"]
                window.tokens += n_tokens
                window.seconds += seconds
                tok_s = window.tokens_per_second()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{res['loss']:.4f}", lr=f"{res['lr']:.2e}",
                                    tok_s=f"{tok_s:,.0f}")
                if done % t.logging_steps == 0 or done == plan.total_steps:
                    self._log_train(res, window)
                    window = _LogWindow()
                if t.eval_steps and done % t.eval_steps == 0 and done < plan.total_steps:
                    self.evaluate(done)
                if t.save_steps and done % t.save_steps == 0 and done < plan.total_steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()

    def _step(self, step: int, order_cache: dict) -> tuple[dict[str, float], int, float]:
        """Optimizer step ``step`` (0-based) on this rank's share of its global batch.

        Returns:
            ``train_step``'s result, the global batch's token count and the seconds it took.
        """
        t, rows = self.cfg, self.data.train_rows
        idx = global_batch_indices(step, self.plan, t.seed, order_cache)
        n_tokens = sum(len(rows[i]["input_ids"]) for i in idx)
        micro = [collate([rows[i] for i in mb], self.tokenizer.pad_token_id, packing=t.packing,
                         mask_dtype=self.mask_dtype, sliding_window=self.sliding_window)
                 for mb in local_micro_batches(idx, self.dist.rank, t.batch_size,
                                               t.gradient_accumulation_steps)]
        start = time.perf_counter()
        # train_step is looked up in this module at each call (a test patches it to kill the run).
        res = train_step(self.wrapped, micro, self.optimizer, self.scheduler, self.params,
                         dist=self.dist, max_grad_norm=t.max_grad_norm, bf16=self.use_bf16)
        seconds = time.perf_counter() - start
        self.state.step = step + 1
        self.state.train_tokens += n_tokens
        self.state.train_seconds += seconds
        return res, n_tokens, seconds

    def _log_train(self, res: dict[str, float], window: _LogWindow) -> None:
        done, plan = self.state.step, self.plan
        rec = {"type": "train", "step": done, "epoch": round(done / plan.steps_per_epoch, 4),
               "loss": window.loss_sum / max(window.label_tokens, 1), "lr": res["lr"],
               "grad_norm": res["grad_norm"], "tokens_per_second": window.tokens_per_second(),
               "train_tokens": self.state.train_tokens}
        self.metrics.append(rec)
        logger.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s", done, plan.total_steps,
                    rec["loss"], res["lr"], rec["tokens_per_second"])

    # -- evaluation, checkpoints, outputs --------------------------------------------------------
    def evaluate(self, step: int, *, base: bool = False) -> float | None:
        """Token-mean loss on the held-out rows (all ranks), recorded in ``metrics.jsonl``."""
        t = self.cfg
        loss, n = evaluate(self.loss_module, self.data.eval_rows, batch_size=t.batch_size,
                           pad_id=self.tokenizer.pad_token_id, packing=t.packing, dist=self.dist,
                           bf16=self.use_bf16, mask_dtype=self.mask_dtype,
                           sliding_window=self.sliding_window)
        rec = {"type": "eval", "step": step, "eval_loss": loss, "eval_perplexity": perplexity(loss),
               "eval_tokens": n}
        if base:
            rec["base"] = True
        self.metrics.append(rec)
        logger.info("%s: eval loss %s, perplexity %s", "base model" if base else f"step {step}",
                    _fmt(loss), _fmt(perplexity(loss)))
        return loss

    def save_checkpoint(self) -> None:
        """Write ``checkpoint-<step>`` (rank 0), with every rank's RNG states."""
        dist, plan, t, step = self.dist, self.plan, self.cfg, self.state.step
        rng = all_gather_objects(ckpt.capture_rng_state(), dist)  # every rank's, in memory
        if dist.is_main:
            epoch, pos = divmod(step, plan.steps_per_epoch)
            trainer_state = {**self.state.to_dict(), "seed": t.seed,
                             "global_batch_size": plan.global_batch_size, "n_rows": plan.n_rows,
                             "total_steps": plan.total_steps, "world_size": dist.world_size,
                             "data_position": {"epoch": epoch, "batch_in_epoch": pos}}
            ckpt.save_checkpoint(self.out, step,
                                 write_adapter=lambda p: save_adapter(self.model, p),
                                 optimizer=self.optimizer, scheduler=self.scheduler,
                                 rng_states=rng, trainer_state=trainer_state,
                                 save_total_limit=t.save_total_limit)
        barrier(dist)

    def finish(self) -> dict[str, Any]:
        """Final evaluation; rank 0 writes the adapter, a sample answer, the loss curve and
        ``summary.json``. Returns the summary."""
        final_loss = self.evaluate(self.plan.total_steps)
        summary = self._summary(final_loss)
        if self.dist.is_main:
            out = self.out
            save_adapter(self.model, out / "adapter")
            sample = sample_answer(self.model, self.tokenizer, self.data.eval_conversations)
            if sample is not None:
                summary["sample"] = sample
            plot_loss_curve(self.metrics.read(), out / "loss_curve.png")
            write_json_atomic(out / "summary.json", summary)
            logger.info("done: eval loss %s -> %s in %d steps, %.1f s; adapter in %s",
                        _fmt(summary["base_eval_loss"]), _fmt(final_loss), self.state.step,
                        summary["seconds"], out / "adapter")
        barrier(self.dist)
        return summary

    def _summary(self, final_loss: float | None) -> dict[str, Any]:
        state, plan, dist, data = self.state, self.plan, self.dist, self.data
        peak, peak_kind = peak_memory_bytes(dist.device)
        peaks = all_gather_objects(peak, dist)
        report = data.report
        return {
            "model": self.recipe.model or "embedded-tiny-phi3", "demo": self.recipe.is_demo,
            "base_eval_loss": state.base_eval_loss,
            "base_eval_perplexity": perplexity(state.base_eval_loss),
            "final_eval_loss": final_loss, "final_eval_perplexity": perplexity(final_loss),
            "steps": state.step, "epochs": round(state.step / plan.steps_per_epoch, 4),
            "global_batch_size": plan.global_batch_size, "world_size": dist.world_size,
            "train_tokens": state.train_tokens, "train_seconds": round(state.train_seconds, 3),
            "tokens_per_second": state.train_tokens / max(state.train_seconds, 1e-9),
            "peak_memory_bytes": max(peaks), "peak_memory_kind": peak_kind,
            "seconds": round(time.time() - self.t0, 3),
            "trainable_parameters": count_parameters(self.model, trainable_only=True),
            "total_parameters": count_parameters(self.model),
            "data": {"source": report.source, "rows_read": report.rows_read, "kept": report.kept,
                     "skipped": report.skipped, "too_long": report.too_long,
                     "train_rows": len(data.train_rows), "eval_rows": len(data.eval_rows)},
        }

    def cleanup(self) -> None:
        """Leave the process group (safe to call after a failed ``setup``)."""
        if self.dist is not None:
            teardown_distributed(self.dist)


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
    return FinetuneJob(recipe, resume=resume, overwrite_output_dir=overwrite_output_dir,
                       progress=progress, device=device).run()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
