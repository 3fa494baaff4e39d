"""Shared helpers for the benchmarks: machine description, interleaved timing, peers, tables.

Timing is interleaved: every candidate runs once per round, in a rotating order, so slow drifts
(other processes, frequency changes) hit all candidates alike; a candidate's ratio to a baseline is
the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["machine", "load", "interleaved", "paired_ratio", "markdown_table", "peft_wrap",
           "have", "sync"]


def have(module: str) -> bool:
    """True if ``module`` is importable (the peers are optional)."""
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def machine() -> str:
    """One line: CPU model (lscpu), core count, torch threads, torch version, accelerator."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    acc = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){acc}")


def load() -> str:
    """The 1-minute load average (other processes on a shared machine skew CPU timings)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run each function ``warmup`` times, then ``repeats`` rounds in rotating order.

    Args:
        clock: ``time.perf_counter`` (wall time) or ``time.thread_time`` (CPU time of the calling
            thread: with ``torch.set_num_threads(1)`` on CPU all the work runs there, so this
            is insensitive to other processes competing for the cores).

    Returns:
        name -> list of ``repeats`` times in seconds (round ``i`` at index ``i``).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            sync()
            t0 = clock()
            fns[n]()
            sync()
            times[n].append(clock() - t0)
    return times


def train_step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One training step of ``model`` on ``x`` (forward, backward with ``grad``), grads reset.

    Each step also touches the trainable parameters in place (``add_(0)``, values unchanged), as
    an optimizer step would: anything cached on them (e.g. DoRA's weight norm, cached until A or B
    change) is then recomputed every step, as in training, instead of measured once."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        with torch.no_grad():
            for p in params:
                p.grad = None
                p.add_(0)  # bumps the version counter, like optimizer.step()
        model(x).backward(grad)
    return step


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``times[name][i] / times[base][i]``."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_wrap(linear: nn.Linear, r: int, lora_alpha: float, dropout: float) -> nn.Module:
    """HF PEFT's LoRA layer around ``linear`` (through ``inject_adapter_in_model``), B non-zero."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["proj"]),
        _Holder(linear))
    with torch.no_grad():
        for name, p in holder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return holder


# Each projection of a Phi-3-mini decoder layer: name, in, out, enable_lora (None: a Linear), split sizes.
PHI3_MINI_PROJECTIONS = [
    ("qkv (q,k,v)", 3072, 9216, [True, True, True], [3072, 3072, 3072]),
    ("qkv (q,v)", 3072, 9216, [True, False, True], [3072, 3072, 3072]),
    ("gate_up", 3072, 16384, [True, True], [8192, 8192]),
    ("down", 8192, 3072, None, None),
    ("o", 3072, 3072, None, None),
]


def saved_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the storages autograd keeps for backward while ``fn()`` runs, each storage counted
    once (by data pointer); storages whose data pointer is in ``exclude`` (parameters) left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    del out
    return total
