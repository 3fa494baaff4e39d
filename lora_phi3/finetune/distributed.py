"""Process-group setup for ``torchrun`` and the one place where the model gets wrapped.

``torchrun --nproc_per_node N`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them the
run is a single process and nothing here touches ``torch.distributed``. Backend: NCCL when CUDA
is available, gloo otherwise. Only the main process (rank 0) writes files.

:func:`wrap_model` is the single wrapping point: DDP today; FSDP can replace it without touching
the training loop, which only calls the wrapped module and ``no_sync``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["DistState", "setup_distributed", "teardown_distributed", "wrap_model", "unwrap_model",
           "all_reduce_sum", "all_reduce_max", "no_sync", "all_gather_objects", "barrier"]


@dataclass(frozen=True)
class DistState:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup_distributed(device: str | None = None) -> DistState:
    """Join the ``torchrun`` process group if there is one, and pick the device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun with CUDA
            each process takes ``cuda:<LOCAL_RANK>``.

    Returns:
        The :class:`DistState`. Single process when ``WORLD_SIZE`` is unset or 1.

    Raises:
        ValueError: ``device`` is not one of None/"cpu"/"cuda", or "cuda" without CUDA.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistState(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend}
        if use_cuda:
            kwargs["device_id"] = dev  # binds NCCL to this GPU at init
        dist.init_process_group(**kwargs)
    logger.info("rank %d/%d joined the %s process group on %s", rank, world, backend, dev)
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def teardown_distributed(state: DistState) -> None:
    """Leave the process group (no-op for a single process)."""
    if state.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, state: DistState) -> nn.Module:
    """Wrap ``module`` for data-parallel training: DDP when distributed, unchanged otherwise.

    DDP only synchronises parameters with ``requires_grad``, i.e. the LoRA parameters here, and
    averages their gradients over ranks (the loop scales the loss by ``world_size`` to get a sum).
    """
    if not state.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [state.device.index] if state.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids)


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or future FSDP) wrapper."""
    return getattr(module, "module", module)


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` when ``skip`` (accumulation micro-batches before the last one)."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (returned for chaining); no-op for one process."""
    if state.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks in place (returned for chaining); no-op for one process."""
    if state.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any, state: DistState) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (in-memory, never written to disk)."""
    if not state.distributed:
        return [obj]
    out: list[Any] = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(state: DistState) -> None:
    if state.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(state: DistState) -> Iterator[None]:
    """Let rank 0 run the block first (e.g. a download into a shared cache), then the others."""
    if not state.is_main:
        barrier(state)
    yield
    if state.is_main:
        barrier(state)
