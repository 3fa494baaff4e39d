"""The training loop: AdamW on the LoRA parameters, global-batch token-mean loss, DDP, resume.

Loss. Each optimizer step consumes one *global batch*: ``batch_size`` rows x
``gradient_accumulation_steps`` micro-batches x ``world_size`` processes. Its loss is the mean
over all label tokens of the global batch: the label tokens of every micro-batch on every rank
are counted (and all-reduced) *before* any backward, and each micro-batch backpropagates
``loss_sum / global_count``. DDP averages gradients over ranks, so the loss is also multiplied by
``world_size``. Hence accumulation 2 x batch 2 == batch 4, and N ranks x batch b == 1 rank x N*b.

Data order. Step ``s`` uses global batch ``s % steps_per_epoch`` of a permutation drawn from
``(seed, epoch)`` (``data.batches``); rank ``r`` takes its contiguous share of that global batch
and splits it into micro-batches. The order therefore depends only on the seed and the global
batch size, never on how the global batch is split.

Divergence. A NaN or infinite global loss or gradient norm raises ``TrainingDiverged`` before the
optimizer step, on every rank at the same step (:func:`lora_phi3.check_finite_step`): the run
stops rather than skipping the step, and the weights stay finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from .. import TrainingDiverged, check_finite_step, lora_plus_param_groups
from .distributed import DistState, all_reduce_sum, no_sync
from .losses import IGNORE_INDEX, lm_loss_sum
from .packing import batches, collate
from .recipe import TrainingConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainingConfig", "CausalLMLoss", "StepPlan", "make_optimizer", "make_scheduler",
           "lr_factor", "train_step", "evaluate", "plan_steps", "global_batch_indices",
           "autocast_context", "bf16_supported", "local_micro_batches", "enable_gradient_checkpointing"]


#: Decoder layers computing ``h = x + attn(norm(x))``, then
#: ``h + mlp(post_attention_layernorm(h))``, with ``self_attn.o_proj`` as the attention's last
#: step: the last one of these can skip unlabeled positions (see :class:`CausalLMLoss`).
_PRUNABLE_LAYERS = ("Phi3DecoderLayer",)


class _LastLayerRows:
    """Hooks that run the last decoder layer's ``o_proj`` and MLP on selected positions only.

    ``rows`` (flat indices into ``B * T``) is set by :class:`CausalLMLoss` for the duration of one
    forward; while it is None every hook passes its tensor through unchanged. The selected rows go
    in (``o_proj``'s input, ``post_attention_layernorm``'s input) and come back scattered into zeros
    of the full shape: the other positions' outputs are then wrong, and nothing may read them.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.rows: torch.Tensor | None = None
        o_proj, norm, mlp = layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp
        self.handles = [o_proj.register_forward_pre_hook(self._gather),
                        o_proj.register_forward_hook(self._scatter),
                        norm.register_forward_pre_hook(self._gather),
                        mlp.register_forward_hook(self._scatter)]

    @classmethod
    def of(cls, layer: nn.Module) -> "_LastLayerRows":
        """The layer's hooks, added on first use (a second loss module on the model shares them)."""
        if not isinstance(getattr(layer, "_lora_phi3_rows", None), cls):
            layer._lora_phi3_rows = cls(layer)
        return layer._lora_phi3_rows

    def remove(self) -> None:
        """Take the hooks off the layer."""
        for h in self.handles:
            h.remove()
        if getattr(self.layer, "_lora_phi3_rows", None) is self:
            del self.layer._lora_phi3_rows

    def _gather(self, module, args):
        if self.rows is None:
            return None
        x, *rest = args
        self._shape = x.shape[:-1]
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.rows).unsqueeze(0), *rest)

    def _scatter(self, module, args, out):
        if self.rows is None:
            return None
        y = out.reshape(-1, out.shape[-1])
        full = y.new_zeros(math.prod(self._shape), y.shape[-1])
        return full.index_copy(0, self.rows, y).view(*self._shape, y.shape[-1])


class CausalLMLoss(nn.Module):
    """``(input_ids, labels, ...) -> (loss_sum, n_label_tokens)`` for a causal LM.

    Runs the decoder for hidden states and :func:`~lora_phi3.losses.lm_loss_sum` with the LM head,
    so the full ``(tokens, vocab)`` logits never exist. This is the module that DDP wraps: its
    forward must go through the wrapper for gradient synchronisation.

    Unlabeled positions (prompts, padding: no label at ``t + 1``) need no output from the last
    decoder layer: only its keys and values reach the other positions. With ``skip_unlabeled``
    (default) the last layer's ``o_proj``, post-attention norm and MLP therefore run on the
    labeled positions only (Phi-3 decoder layers; exact, same loss and gradients), as the LM head
    already does. That saves about 0.75 x the unlabeled share of one layer's work: much on a
    2-layer model, ~1.5% of a 32-layer Phi-3-mini at 65% prompt tokens. Off under gradient
    checkpointing (the replay in backward would not see the selection).
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = 1024,
                 skip_unlabeled: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self._last = None  # _LastLayerRows of the last decoder layer, when it can skip positions
        if skip_unlabeled:
            decoder = self._decoder()
            layers = getattr(decoder, "layers", None)
            if layers is not None and len(layers) and type(layers[-1]).__name__ in _PRUNABLE_LAYERS:
                self._last = _LastLayerRows.of(layers[-1])

    def _decoder(self) -> nn.Module:
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self._decoder()
        last = self._last
        if last is not None and not (getattr(last.layer, "gradient_checkpointing", False)
                                     and last.layer.training):
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts label t + 1
            rows = keep.view(-1).nonzero().squeeze(1)
            if 0 < rows.numel() < keep.numel():
                last.rows = rows
        try:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False)
        finally:
            if last is not None:
                last.rows = None
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return lm_loss_sum(hidden, self.model.get_output_embeddings(), labels, self.chunk_size)


# -- optimizer and schedule ----------------------------------------------------------------------
def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainingConfig,
                   model: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over ``params`` (the trainable ones) with the config's lr and weight decay.

    With ``cfg.loraplus_lr_ratio`` set, the parameters are split into LoRA+ groups
    (:func:`lora_phi3.lora_plus_param_groups` of ``model``: ``lora_B`` at ratio x lr); the
    scheduler scales every group's lr by the same factor.

    Raises:
        ValueError: if ``params`` is empty (nothing to train); with LoRA+, if ``model`` is missing
            or its trainable parameters are not ``params``.
    """
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: did inject_lora match any target_modules?")
    if cfg.loraplus_lr_ratio is None:
        groups: list[Any] = params
    else:
        if model is None:
            raise ValueError("training.loraplus_lr_ratio (--loraplus-lr-ratio) needs the model "
                             "to find each adapter's A and B: pass make_optimizer(..., model)")
        groups = lora_plus_param_groups(model, lr=cfg.learning_rate, ratio=cfg.loraplus_lr_ratio,
                                        weight_decay=cfg.weight_decay)
        grouped = {id(p) for g in groups for p in g["params"]}
        if grouped != {id(p) for p in params}:
            raise ValueError("LoRA+ groups do not cover exactly the trainable parameters given")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warm-up is linear and reaches the peak at step ``warmup_steps - 1`` (the first step already
    moves: ``1 / warmup_steps``). Afterwards: cosine or linear decay towards 0 at ``total_steps``,
    or constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; ``warmup_steps = ceil(warmup_ratio * total)``."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    kind = cfg.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, kind))


# -- data positions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """How many steps, and the global batch geometry."""

    global_batch_size: int
    steps_per_epoch: int
    total_steps: int
    n_rows: int


def plan_steps(n_rows: int, cfg: TrainingConfig, world_size: int) -> StepPlan:
    """Steps per epoch (full global batches only) and total steps.

    Raises:
        ValueError: fewer training rows than one global batch.
    """
    g = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    spe = n_rows // g
    if spe == 0:
        raise ValueError(
            f"the global batch (batch_size {cfg.batch_size} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} x {world_size} processes = {g} rows) is larger than "
            f"the {n_rows} training rows; lower --batch-size or add data")
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * spe))
    return StepPlan(global_batch_size=g, steps_per_epoch=spe, total_steps=total, n_rows=n_rows)


def global_batch_indices(step: int, plan: StepPlan, seed: int,
                         _cache: dict | None = None) -> list[int]:
    """Row indices of the global batch of optimizer step ``step`` (0-based)."""
    epoch, pos = divmod(step, plan.steps_per_epoch)
    key = (plan.n_rows, plan.global_batch_size, seed, epoch)
    if _cache is not None and key in _cache:
        order = _cache[key]
    else:
        order = batches(plan.n_rows, plan.global_batch_size, seed=seed, epoch=epoch, drop_last=True)
        if _cache is not None:
            _cache.clear()
            _cache[key] = order
    return order[pos]


def local_micro_batches(indices: Sequence[int], rank: int, batch_size: int,
                        accumulation: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, split into micro-batches."""
    share = batch_size * accumulation
    mine = list(indices[rank * share:(rank + 1) * share])
    return [mine[k * batch_size:(k + 1) * batch_size] for k in range(accumulation)]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model.

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``;
    whichever exists is used.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no "
                         "gradient_checkpointing_enable(); set gradient_checkpointing: false")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 weights and autocast work on ``device`` (logs a warning on a GPU without)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True
        logger.warning("bf16 requested but this GPU has no bfloat16 support; training in fp32")
        return False
    return True  # CPU autocast supports bfloat16


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``bf16``, else a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -- one optimizer step --------------------------------------------------------------------------
def train_step(wrapped: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scheduler: Any, params: Sequence[nn.Parameter],
               *, dist: DistState, max_grad_norm: float = 0.0,
               bf16: bool = False, step: int | None = None) -> dict[str, float]:
    """Accumulate gradients over ``micro_batches`` and take one optimizer step.

    A non-finite global loss or gradient norm stops the run before the update
    (:func:`lora_phi3.check_finite_step`): the weights stay as they were, the gradients are
    cleared, and every rank raises at the same step, since both values are all-reduced.

    Args:
        wrapped: the (possibly DDP-wrapped) :class:`CausalLMLoss`.
        micro_batches: this rank's collated micro-batches (``collate`` output).
        params: the trainable parameters (clipped together).
        max_grad_norm: clip to this global norm; 0 disables clipping (the norm is still reported).
        step: this step's number in messages (default: the scheduler's count + 1, i.e. 1-based).

    Returns:
        ``{"loss": global token-mean loss, "label_tokens": global count, "grad_norm", "lr"}``
        (``lr`` is the one used by this step).

    Raises:
        TrainingDiverged: the loss or the gradient norm is NaN or infinite (nothing was applied).
    """
    device = dist.device
    local = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    count_t = all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64, device=device), dist)
    count = int(count_t.item())
    scale = dist.world_size / max(count, 1)  # DDP averages over ranks; we want the global sum
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    lr = optimizer.param_groups[0]["lr"]
    for k, mb in enumerate(micro_batches):
        with no_sync(wrapped, k < len(micro_batches) - 1):
            with autocast_context(device, bf16):
                loss_sum, _ = wrapped(**_to(mb, device))
            (loss_sum * scale).backward()
        loss_total += loss_sum.detach().double()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: the global norm of sharded gradients, as a DTensor
        norm = norm.full_tensor()
    # One all-reduce carries the loss sum and how many ranks saw a non-finite gradient norm, so
    # the divergence check below decides on the same numbers on every rank.
    bad_norm = (~torch.isfinite(norm)).to(loss_total.device, torch.float64)
    totals = torch.stack([loss_total, bad_norm])
    all_reduce_sum(totals, dist)
    loss = float(totals[0]) / max(count, 1)
    grad_norm = float(norm) if float(totals[1]) == 0 else math.nan
    try:
        check_finite_step(step if step is not None else scheduler.last_epoch + 1, loss, grad_norm)
    except TrainingDiverged:
        optimizer.zero_grad(set_to_none=True)  # the step is dropped whole: no update, no grads
        raise
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "label_tokens": count, "grad_norm": grad_norm, "lr": lr}


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(module: nn.Module, rows: Sequence[dict], *, batch_size: int, pad_id: int,
             packing: bool, dist: DistState, bf16: bool = False,
             mask_dtype: torch.dtype = torch.float32,
             sliding_window: int | None = None) -> tuple[float | None, int]:
    """Token-mean loss of ``module`` (a :class:`CausalLMLoss`, unwrapped) over ``rows``.

    Each rank evaluates ``rows[rank::world_size]``; sums and counts are all-reduced.

    Returns:
        ``(loss, label_tokens)``; loss is None when there are no label tokens.
    """
    was_training = module.training
    module.eval()
    mine = list(rows)[dist.rank::dist.world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    try:
        for i in range(0, len(mine), batch_size):
            batch = collate(mine[i:i + batch_size], pad_id, packing=packing, mask_dtype=mask_dtype,
                            sliding_window=sliding_window)
            with autocast_context(dist.device, bf16):
                loss_sum, n = module(**_to(batch, dist.device))
            totals[0] += loss_sum.double()
            totals[1] += n.double()
    finally:
        module.train(was_training)  # also after an error: the caller's mode is never lost
    all_reduce_sum(totals, dist)
    count = int(totals[1].item())
    return (float(totals[0]) / count if count else None), count
