"""Process-group setup for ``torchrun`` and the one place where the model gets wrapped.

``torchrun --nproc_per_node N`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them the
run is a single process and nothing here touches ``torch.distributed``. Backend: NCCL when CUDA
is available, gloo otherwise. Only the main process (rank 0) writes files.

:func:`wrap_model` is the single wrapping point: DDP, or FSDP2 (``fully_shard``) with ``fsdp=True``;
the training loop only calls the wrapped module and :func:`no_sync`. Under FSDP2 the frozen base and
the adapters are sharded per decoder layer and at the root; :func:`gathered` gives every process
whole tensors for a while (saving, evaluation), and :func:`full_optimizer_state` /
:func:`shard_optimizer_state` turn the optimizer's state into the whole-tensor form a checkpoint
holds, which resumes on any number of processes (see ``docs/distributed.md``).
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
           "all_reduce_sum", "all_reduce_max", "no_sync", "all_gather_objects", "barrier",
           "is_fsdp", "gathered", "decoder_layers", "full_optimizer_state", "shard_optimizer_state",
           "check_fsdp"]


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


def check_fsdp(state: DistState) -> None:
    """Refuse an ``--fsdp`` run that cannot shard, before any data or model is loaded.

    Raises:
        ValueError: a single process (no ``torchrun``, or ``--nproc_per_node 1``).
    """
    if not state.distributed:
        raise ValueError("training.fsdp (--fsdp) shards the model over processes, but this run "
                         f"has WORLD_SIZE={state.world_size}: launch it with torchrun "
                         "--nproc_per_node N (N >= 2), or drop --fsdp")


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (classes named ``*DecoderLayer``), each
    sharded on its own so only one block is gathered at a time."""
    return [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]


def wrap_model(module: nn.Module, state: DistState, fsdp: bool = False) -> nn.Module:
    """Wrap ``module`` for data-parallel training: DDP (or FSDP2 with ``fsdp``) when distributed,
    unchanged otherwise.

    DDP only synchronises parameters with ``requires_grad``, i.e. the LoRA parameters here, and
    averages their gradients over ranks (the loop scales the loss by ``world_size`` to get a sum).
    FSDP2 (``fully_shard`` on every decoder layer, then the root) shards every parameter, frozen
    or not, in its own dtype (an NF4 base's 4-bit storage too, registered as frozen parameters
    for it): a bf16 base stays bf16 and fp32 adapters stay fp32
    (``MixedPrecisionPolicy(param_dtype=None)``), and gradients are reduce-scattered in fp32 and
    averaged over ranks as DDP's are. The module is sharded in place and returned.
    """
    if fsdp:
        check_fsdp(state)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from ..quant import NF4Weight

        for m in module.modules():  # FSDP2 shards parameters only: the 4-bit storage becomes some
            if isinstance(m, NF4Weight):
                m.storage_as_parameters()
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for layer in decoder_layers(module):
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    if not state.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [state.device.index] if state.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids)


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or future FSDP) wrapper."""
    return getattr(module, "module", module)


def is_fsdp(module: nn.Module) -> bool:
    """True if ``module`` was sharded by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """No gradient synchronisation when ``skip`` (accumulation micro-batches before the last one):
    DDP's ``no_sync``, or FSDP2's ``set_requires_gradient_sync(False)``."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    if skip and is_fsdp(module):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Context in which an FSDP2-sharded ``module`` holds whole tensors on every process.

    Every process must enter it (the gather is collective); inside, forwards need no collective,
    so each process may evaluate its own rows, and ``save_adapter`` sees ordinary tensors.
    Writes to parameters inside are not kept. No-op for a module that is not sharded.
    """
    mods = _fsdp_modules(module)
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield module
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded (DTensor) state gathered whole, on CPU:
    the same form a single process writes, so it resumes on any number of processes. Collective
    under FSDP2: every process calls it."""
    from torch.distributed.tensor import DTensor
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy them
    return {**state, "state": {
        index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                for key, value in per_param.items()}
        for index, per_param in state["state"].items()}}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The whole-tensor ``state`` (:func:`full_optimizer_state`, or a single process's) laid out
    like this optimizer's FSDP2 parameters: each state tensor shaped like its parameter becomes a
    DTensor with the parameter's mesh and placements, sliced locally (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {**state, "state": {}}
    for index, per_param in state["state"].items():
        param = params[int(index)] if int(index) < len(params) else None
        new = {}
        for key, value in per_param.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) \
                    and tuple(value.shape) == tuple(param.shape):
                value = distribute_tensor(value.to(param.device), param.device_mesh,
                                          param.placements, src_data_rank=None)
            new[key] = value
        out["state"][index] = new
    return out


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
