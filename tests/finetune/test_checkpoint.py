"""Training checkpoints: RNG states, atomic write, rotation, discovery and resume resolution."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_phi3 import atomic
from lora_phi3.atomic import DiskFullError
from lora_phi3.finetune.checkpoint import (COMPLETE_MARKER, TMP_PREFIX, capture_rng_state,
                                           clean_partial_checkpoints, find_latest_checkpoint,
                                           list_checkpoints, load_training_state, resolve_resume,
                                           restore_rng_state, rotate_checkpoints, save_checkpoint)
from full_disk import WAYS, fill_disk


def _optimizer():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.ones(2)
    opt.step()
    return opt, sched


def _write(d: Path) -> None:
    (d / "adapter.bin").write_bytes(b"x")


def _save(root: Path, step: int, **kw) -> Path:
    opt, sched = _optimizer()
    kw.setdefault("write_adapter", _write)
    return save_checkpoint(root, step, optimizer=opt, scheduler=sched,
                           rng_states=[capture_rng_state()], trainer_state={"step": step}, **kw)


def test_rng_state_round_trip_through_weights_only_files(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_checkpoints_are_atomic_rotated_and_marked(tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.ones(2)
    opt.step()

    def write(d: Path) -> None:
        (d / "adapter.bin").write_bytes(b"x")

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, write_adapter=write, optimizer=opt, scheduler=sched,
                        rng_states=[capture_rng_state()], trainer_state={"step": step},
                        save_total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    # a half-written checkpoint (no marker) and a killed temp dir are never picked
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / ".tmp-checkpoint-10-abc").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-6"
    st = load_training_state(tmp_path / "checkpoint-6")
    assert st["trainer_state"] == {"step": 6}
    assert st["optimizer"]["state"][0]["exp_avg"].shape == (2,)

    def boom(d: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 12, write_adapter=boom, optimizer=opt, scheduler=sched,
                        rng_states=[capture_rng_state()], trainer_state={})
    assert not (tmp_path / "checkpoint-12").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_training_state(tmp_path / "checkpoint-8")


def test_resaving_a_step_replaces_it_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    first = _save(tmp_path, 3)
    (first / "stale.txt").write_text("from the first save")
    again = _save(tmp_path, 3, write_adapter=lambda d: (d / "adapter.bin").write_bytes(b"y"))
    assert again == first and not (again / "stale.txt").exists()
    assert (again / "adapter.bin").read_bytes() == b"y"

    def crash(*args):
        raise OSError("simulated crash")
    monkeypatch.setattr(atomic.os, "rename", crash)  # the rename into place fails
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 4)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]  # no temp dir left


def test_a_checkpoint_holds_every_file_and_is_complete(tmp_path):
    opt, sched = _optimizer()
    states = [capture_rng_state(), capture_rng_state()]
    path = save_checkpoint(tmp_path, 5, write_adapter=_write, optimizer=opt, scheduler=sched,
                           rng_states=states, trainer_state={"step": 5, "seed": 1})
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "adapter.bin", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt",
        "trainer_state.json", COMPLETE_MARKER])
    assert json.loads((path / "trainer_state.json").read_text()) == {"seed": 1, "step": 5}
    # a rank without its own file (a changed world size) gets rank 0's generators
    st = load_training_state(path, rank=3)
    assert torch.equal(st["rng"]["torch"], states[0]["torch"])
    assert st["scheduler"] == sched.state_dict()


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:  # the adapter goes in as save_adapter writes it: into the (existing) temp directory
        path = _save(tmp_path, 1, write_adapter=lambda d: atomic.atomic_write_dir(
            d, [("adapter.safetensors", b"t"), ("adapter_config.json", b"{}")]))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_rotation_keeps_the_newest_and_zero_keeps_all(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert rotate_checkpoints(tmp_path, 0) == [] and rotate_checkpoints(tmp_path, None) == []
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    removed = rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-2"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    # steps are ordered as numbers, not as names
    _save(tmp_path, 10)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_clean_partial_checkpoints_removes_only_temp_dirs(tmp_path):
    _save(tmp_path, 2)
    (tmp_path / f"{TMP_PREFIX}4-x").mkdir()
    (tmp_path / "checkpoint-6").mkdir()  # incomplete but not ours to delete
    (tmp_path / "notes").mkdir()
    clean_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "notes"]
    clean_partial_checkpoints(tmp_path / "missing")  # no output dir yet: nothing to do


def test_resolve_resume(tmp_path, caplog):
    assert resolve_resume(tmp_path, False) is None
    with caplog.at_level("WARNING"):
        assert resolve_resume(tmp_path, True) is None
    assert "no complete checkpoint" in caplog.text
    _save(tmp_path, 2), _save(tmp_path, 4)
    for latest in (True, "latest", "true"):
        assert resolve_resume(tmp_path, latest).name == "checkpoint-4"
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-2")) == tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match=r"--resume: checkpoint directory '.*checkpoint-9' does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-9"))


# -- a full disk -----------------------------------------------------------------------------------
def _write_like_save_adapter(d: Path) -> None:
    """What ``save_adapter`` does with a checkpoint's (existing) temp directory."""
    atomic.atomic_write_dir(d, [("adapter.safetensors", b"t" * 1000),
                                ("adapter_config.json", b"{}")])


def _contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("on, capacity", [("write", 500),    # in the adapter
                                          ("write", 1500),   # in optimizer.pt
                                          ("fsync", 0)])
def test_a_full_disk_fails_the_new_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch, on,
                                                                    capacity):
    first = _save(tmp_path, 1, write_adapter=_write_like_save_adapter, save_total_limit=1)
    before = _contents(first)
    size = sum(len(b) for b in before.values())  # checkpoint-2 holds as many bytes
    fill_disk(monkeypatch, tmp_path, capacity=capacity, on=on)
    with pytest.raises(DiskFullError, match=(
            rf"^No space left on device: writing {re.escape(repr(str(tmp_path / 'checkpoint-2')))} "
            rf"needs {size:,} bytes; its filesystem has [\d,]+ bytes.* free\. "
            "Nothing there was changed: free some space and write again$")) as info:
        _save(tmp_path, 2, write_adapter=_write_like_save_adapter, save_total_limit=1)
    assert info.value.errno == errno.ENOSPC and info.value.needed == size
    monkeypatch.undo()
    # rotation (save_total_limit=1) never ran: the old checkpoint is whole, and nothing else is left
    assert os.listdir(tmp_path) == ["checkpoint-1"] and _contents(first) == before
    assert find_latest_checkpoint(tmp_path) == first
    assert load_training_state(first)["trainer_state"] == {"step": 1}


@pytest.mark.parametrize("on", WAYS)
def test_resaving_a_step_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch, on):
    first = _save(tmp_path, 3)
    before = _contents(first)
    fill_disk(monkeypatch, tmp_path, capacity=100, on=on)
    with pytest.raises(DiskFullError, match="checkpoint-3' needs"):
        _save(tmp_path, 3)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint-3"] and _contents(first) == before
    assert load_training_state(first)["trainer_state"] == {"step": 3}
