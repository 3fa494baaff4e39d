"""``finetune(recipe)``: the whole job: model, data, LoRA, training, evaluation, outputs.

This is what ``lora-phi3 finetune`` runs, and the Python API equivalent of it. The job is a
:class:`FinetuneJob` whose steps are separate methods (``setup``, ``train``, ``evaluate``,
``save_checkpoint``, ``finish``, ``cleanup``) and whose state lives in its attributes; the loop's
running totals are one :class:`~.run_state.TrainState`, which is what a checkpoint stores.

Outputs in ``recipe.output_dir`` (written by rank 0 only): ``checkpoint-<step>/``, ``adapter/``,
``metrics.jsonl``, ``loss_curve.svg`` (loss and accuracy against the step), ``summary.json`` and
``recipe.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

# The library through its public face only (``lora_phi3/__init__``): never through its internals.
from .. import TrainingDiverged, load_adapter, save_adapter
from . import checkpoint as ckpt
from .dataset import TrainingData, prepare_data
from .distributed import (DistState, all_gather_objects, barrier, check_fsdp,
                          full_optimizer_state, gathered, setup_distributed, shard_optimizer_state,
                          teardown_distributed, wrap_model)
from .evaluation import Evaluator
from .generate import sample_answer
from .models import DEMO_NOTICE, count_parameters, load_model, load_training_model
from .packing import collate
from .preemption import StopSignals, TrainingInterrupted
from .recipe import Recipe
from .plot import write_training_plot
from .reporting import (MetricsLog, check_output_dir, fmt_accuracy, fmt_loss, json_safe,
                        perplexity, write_json)
from .run_lock import RunLock
from .run_state import LogWindow, TrainState, set_seed
from .summary import run_summary
from .tokenizer import load_tokenizer
from .train import (CausalLMLoss, StepPlan, bf16_supported, global_batch_indices,
                    local_micro_batches, make_optimizer, make_scheduler, plan_steps, train_step)

logger = logging.getLogger(__name__)

#: Held-out answers shown in the summary and the final report.
N_SAMPLES = 5

__all__ = ["finetune", "FinetuneJob", "TrainState", "TrainingInterrupted", "DEMO_NOTICE", "set_seed"]


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
        self.lock = RunLock.for_run_dir(self.out)  # taken by rank 0 in setup, released in cleanup
        self.stop_signals = StopSignals()  # SIGTERM/SIGINT stop at a step boundary while installed
        self._saved_step = -1  # step of the last checkpoint written

    def run(self) -> dict[str, Any]:
        """Set up, train, evaluate and write the outputs. Returns the summary (every rank)."""
        try:
            self.setup()
            with self.stop_signals:
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
        if t.fsdp:
            check_fsdp(dist)  # before any data is read
        if self.recipe.is_demo:
            logger.warning(DEMO_NOTICE)
        self.recipe.model_kwargs.check_available()  # before any data is read
        if dist.is_main:
            self.lock.acquire()  # before anything reads or cleans the directory
            self._prepare_output_dir()
        barrier(dist)
        set_seed(t.seed)

        self.tokenizer = load_tokenizer(self.recipe.model,
                                        trust_remote_code=self.recipe.model_kwargs.trust_remote_code)
        self.data: TrainingData = prepare_data(self.tokenizer, self.recipe)
        self.use_bf16 = t.bf16 and bf16_supported(dist.device)
        self.model = model = self._load_model()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_module = CausalLMLoss(model)
        found = ckpt.resolve_resume(self.out, self.resume)
        if found is not None and t.fsdp:  # into the whole model, before it is sharded
            load_adapter(model, found)
        self.wrapped = wrap_model(self.loss_module, dist, fsdp=t.fsdp)
        if t.fsdp:  # fully_shard replaced every parameter by its shard
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, t, model)
        self.plan: StepPlan = plan_steps(len(self.data.train_rows), t, dist.world_size)
        self.scheduler = make_scheduler(self.optimizer, t, self.plan.total_steps)
        self.mask_dtype = model.get_input_embeddings().weight.dtype  # packed mask: q's dtype
        self.sliding_window = getattr(model.config, "sliding_window", None)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=dist.is_main)
        self.evaluator = Evaluator(self.loss_module, model, self.tokenizer, self.data, t, dist,
                                   use_bf16=self.use_bf16, mask_dtype=self.mask_dtype,
                                   sliding_window=self.sliding_window)
        self.accuracy = None  # the latest evaluation's AccuracyReport (None: not scored)
        plan = self.plan
        logger.info("training %s trainable of %s parameters; %d steps (%d per epoch), global batch "
                    "%d rows = %d x %d accumulation x %d processes",
                    f"{count_parameters(model, True):,}", f"{count_parameters(model):,}",
                    plan.total_steps, plan.steps_per_epoch, plan.global_batch_size, t.batch_size,
                    t.gradient_accumulation_steps, dist.world_size)
        self._resume_or_evaluate_base(found)

    def _prepare_output_dir(self) -> None:
        """Rank 0: refuse or clear another run's files, drop killed checkpoint writes, and record
        the recipe."""
        check_output_dir(self.out, self.resume, self.overwrite_output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial_checkpoints(self.out)
        write_json(self.out / "recipe.json", self.recipe.to_dict())

    def _whole(self):
        """Whole tensors on every process while inside (FSDP2; all ranks enter), else nothing."""
        return gathered(self.wrapped) if self.cfg.fsdp else contextlib.nullcontext()

    def _resume_or_evaluate_base(self, found: Path | None) -> None:
        """Continue from checkpoint ``found`` (``resume``), or start fresh with the base eval loss."""
        if found is None:
            self.metrics.truncate_after(-1)  # a fresh start drops records of a killed attempt
            self.evaluate(0, base=True)
            return
        self._restore(found)
        self.metrics.truncate_after(self.state.step)
        self.metrics.append({"type": "resume", "step": self.state.step, "checkpoint": found.name})
        logger.info("resumed from %s at step %d", found, self.state.step)

    def _load_model(self) -> nn.Module:
        # load_model is looked up in this module at each call (benchmarks/bench_finetune.py
        # patches it to train its wide model).
        return load_training_model(self.recipe, self.tokenizer, use_bf16=self.use_bf16,
                                   device=self.dist.device, loader=load_model)

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
        optimizer_state = st["optimizer"]
        if self.cfg.fsdp:  # the adapter went in before sharding; the optimizer state shards now
            optimizer_state = shard_optimizer_state(self.optimizer, optimizer_state)
        else:
            load_adapter(self.model, path)
        ckpt.load_optimizer_state(self.optimizer, optimizer_state, path)
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
        window = LogWindow()
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
                    window = LogWindow()
                if t.eval_steps and done % t.eval_steps == 0 and done < plan.total_steps:
                    self.evaluate(done)
                if t.save_steps and done % t.save_steps == 0 and done < plan.total_steps:
                    self.save_checkpoint()
                signum = self.stop_signals.agreed(self.dist)  # the same step on every rank
                if signum is not None:
                    self._stop(signum, res, window)
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
        try:
            res = train_step(self.wrapped, micro, self.optimizer, self.scheduler, self.params,
                             dist=self.dist, max_grad_norm=t.max_grad_norm, bf16=self.use_bf16,
                             step=step + 1)
        except TrainingDiverged as e:  # raised before the update, on every rank at this step
            raise self._diverged(e.step, f"{e.reason} (the update was not applied)",
                                 e.loss, e.grad_norm) from None
        seconds = time.perf_counter() - start
        self.state.step = step + 1
        self.state.train_tokens += n_tokens
        self.state.train_seconds += seconds
        return res, n_tokens, seconds

    def _stop(self, signum: int, res: dict[str, float], window: LogWindow) -> None:
        """Log the open window, checkpoint the steps done (unless just saved) and raise."""
        if window.tokens:
            self._log_train(res, window)
        if self._saved_step != self.state.step:
            self.save_checkpoint()
        raise TrainingInterrupted(signum, self.state.step, self.plan.total_steps,
                                  self.out / f"checkpoint-{self.state.step}")

    def _log_train(self, res: dict[str, float], window: LogWindow) -> None:
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
        """Token-mean loss on the held-out rows and, with ``eval_accuracy``, exact match of greedy
        answers (all ranks), recorded in ``metrics.jsonl``. Returns the loss."""
        with self._whole():  # FSDP2: each rank runs its own rows, so no collective per forward
            loss, n = self.evaluator.loss()
            self.accuracy = acc = self.evaluator.accuracy()
        rec = {"type": "eval", "step": step, "eval_loss": loss, "eval_perplexity": perplexity(loss),
               "eval_tokens": n}
        if acc is not None:
            rec.update(eval_accuracy=acc.accuracy, eval_accuracy_per_task=acc.per_task,
                       eval_accuracy_rows=acc.total)
        if base:
            rec["base"] = True
            self.state.base_eval_loss = loss
            if acc is not None:
                self.state.base_eval_accuracy = acc.accuracy
                self.state.base_eval_accuracy_per_task = acc.per_task
        self.metrics.append(rec)
        logger.info("%s: eval loss %s, perplexity %s%s", "base model" if base else f"step {step}",
                    fmt_loss(loss), fmt_loss(perplexity(loss)),
                    "" if acc is None else f", exact match {fmt_accuracy(acc)}")
        if not base and loss is not None and not math.isfinite(loss):  # all-reduced: every rank
            raise self._diverged(step, f"eval loss {loss:.4g}")
        return loss

    def save_checkpoint(self) -> None:
        """Write ``checkpoint-<step>`` (rank 0), with every rank's RNG states."""
        dist, plan, t, step = self.dist, self.plan, self.cfg, self.state.step
        self._check_weights_finite(step)  # a checkpoint is always one a run can go on from
        rng = all_gather_objects(ckpt.capture_rng_state(), dist)  # every rank's, in memory
        optimizer_state = full_optimizer_state(self.optimizer)  # whole tensors (collective)
        with self._whole():
            self._write_checkpoint(step, rng, optimizer_state)
        self._saved_step = step
        barrier(dist)

    def _write_checkpoint(self, step: int, rng: list, optimizer_state: dict) -> None:
        dist, plan, t = self.dist, self.plan, self.cfg
        if dist.is_main:
            epoch, pos = divmod(step, plan.steps_per_epoch)
            trainer_state = {**self.state.to_dict(), "seed": t.seed,
                             "global_batch_size": plan.global_batch_size, "n_rows": plan.n_rows,
                             "total_steps": plan.total_steps, "world_size": dist.world_size,
                             "data_position": {"epoch": epoch, "batch_in_epoch": pos}}
            ckpt.save_checkpoint(self.out, step,
                                 write_adapter=lambda p: save_adapter(self.model, p),
                                 optimizer=optimizer_state, scheduler=self.scheduler,
                                 rng_states=rng, trainer_state=json_safe(trainer_state),
                                 save_total_limit=t.save_total_limit)

    def _check_weights_finite(self, step: int) -> None:
        """Raise before NaN/inf trainable weights are saved (DDP keeps them equal on all ranks)."""
        bad = [n for n, p in self.model.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(p).all())]
        if not bad:
            return
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise self._diverged(step, f"{len(bad)} trainable tensors hold NaN or inf ({names})")

    def _diverged(self, step: int, reason: str, loss: float | None = None,
                  grad_norm: float | None = None) -> TrainingDiverged:
        """Record a divergence in ``metrics.jsonl`` and build the job's error: the step, what to
        change, and what is kept (the final adapter is never written after this)."""
        self.metrics.append({"type": "diverged", "step": step, "reason": reason, "loss": loss,
                             "grad_norm": grad_norm})
        lr = self.cfg.learning_rate
        last = ckpt.find_latest_checkpoint(self.out)
        kept = (f"the last good checkpoint is kept: {last}" if last is not None
                else "no checkpoint had been saved")
        advice = (f"lower the learning rate (--learning-rate, {lr:g} in this run; try {lr / 10:g}) "
                  f"and start a new run. No final adapter was written; {kept}")
        return TrainingDiverged(step, reason, loss, grad_norm, advice)

    def finish(self) -> dict[str, Any]:
        """Final evaluation; rank 0 writes the adapter, a sample answer, the loss curve and
        ``summary.json``. Returns the summary."""
        self._check_weights_finite(self.state.step)  # never a non-finite final adapter
        final_loss = self.evaluate(self.plan.total_steps)
        summary = run_summary(self, final_loss)
        with self._whole():
            self._write_outputs(summary, final_loss)
        return summary

    def _write_outputs(self, summary: dict[str, Any], final_loss: float | None) -> None:
        if self.dist.is_main:
            out = self.out
            save_adapter(self.model, out / "adapter")
            if self.accuracy is not None:  # held-out answers already generated: show a few
                summary["samples"] = [{k: s[k] for k in ("prompt", "reference", "answer", "correct")}
                                      for s in self.accuracy.samples[:N_SAMPLES]]
            else:
                sample = sample_answer(self.model, self.tokenizer, self.data.eval_conversations)
                summary["samples"] = [] if sample is None else [sample]
            if summary["samples"]:
                summary["sample"] = summary["samples"][0]  # the key before accuracy existed
            write_training_plot(self.metrics.read(), out / "loss_curve.svg")
            write_json(out / "summary.json", summary)  # null for NaN/inf, as in every file
            logger.info("done: eval loss %s -> %s in %d steps, %.1f s; adapter in %s",
                        fmt_loss(summary["base_eval_loss"]), fmt_loss(final_loss), self.state.step,
                        summary["seconds"], out / "adapter")
        barrier(self.dist)

    def cleanup(self) -> None:
        """Release the run dir and leave the process group (safe after a failed ``setup``)."""
        self.lock.release()
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
        TrainingDiverged: (a ``ValueError``, ``lora_phi3.TrainingDiverged``) a NaN or infinite
            loss, gradient norm or weight; ``.step`` names the step. Nothing non-finite is saved:
            no final adapter, and the checkpoints written before it are kept.
        RunDirLocked: another live process is writing the output dir.
        TrainingInterrupted: SIGTERM or SIGINT stopped training; its checkpoint resumes exactly.
    """
    return FinetuneJob(recipe, resume=resume, overwrite_output_dir=overwrite_output_dir,
                       progress=progress, device=device).run()
