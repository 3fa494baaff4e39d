"""Process-group setup and the collective helpers: single process (no torch.distributed at all)
and two real gloo processes under torchrun."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from lora_phi3.finetune.distributed import (DistState, all_gather_objects, all_reduce_sum, barrier,
                                            main_process_first, no_sync, setup_distributed,
                                            teardown_distributed, unwrap_model, wrap_model)
from runs import child_env



@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_touches_no_process_group(no_torchrun_env):
    state = setup_distributed("cpu")
    assert state == DistState() and state.is_main and not state.distributed
    assert not torch.distributed.is_initialized()
    t = torch.tensor([2.0])
    assert all_reduce_sum(t, state) is t and t.item() == 2.0
    assert all_gather_objects({"a": 1}, state) == [{"a": 1}]
    barrier(state)
    with main_process_first(state):
        pass
    module = nn.Linear(2, 2)
    assert wrap_model(module, state) is module and unwrap_model(module) is module
    with no_sync(module, skip=True):  # a plain module has no no_sync: nothing to skip
        pass
    teardown_distributed(state)


def test_bad_device_and_environment_are_named(no_torchrun_env):
    with pytest.raises(ValueError, match="device must be None, 'cpu' or 'cuda', got 'tpu'"):
        setup_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was requested but CUDA is not available"):
            setup_distributed("cuda")
    no_torchrun_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE must be an integer, got 'two'"):
        setup_distributed("cpu")


WORKER = textwrap.dedent("""
    import json, os, pathlib, sys, time
    import torch, torch.nn as nn
    from lora_phi3.finetune.distributed import (all_gather_objects, all_reduce_sum, barrier,
        main_process_first, no_sync, setup_distributed, teardown_distributed, unwrap_model,
        wrap_model)

    state = setup_distributed("cpu")
    out = {"rank": state.rank, "world": state.world_size, "backend": state.backend}
    out["sum"] = all_reduce_sum(torch.tensor([float(state.rank + 1)]), state).item()
    out["gathered"] = all_gather_objects({"r": state.rank}, state)
    events = []
    with main_process_first(state):
        events.append(time.monotonic())
    out["first_time"] = all_gather_objects(events[0], state)
    module = nn.Linear(2, 1)
    wrapped = wrap_model(module, state)
    out["wrapped"] = type(wrapped).__name__
    out["unwrapped_is_module"] = unwrap_model(wrapped) is module
    with no_sync(wrapped, skip=True):  # accumulate locally: gradients stay per rank
        wrapped(torch.full((1, 2), float(state.rank + 1))).sum().backward()
    out["local_grad"] = module.weight.grad.tolist()
    barrier(state)
    teardown_distributed(state)
    # one file per rank: two ranks printing to one pipe can interleave their lines
    pathlib.Path(os.environ["RESULT_DIR"], f"rank{state.rank}.json").write_text(json.dumps(out))
""")


def test_two_gloo_processes(tmp_path):
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**child_env(), "OMP_NUM_THREADS": "1", "RESULT_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["backend"] == "gloo"
        assert r["sum"] == 3.0  # 1 + 2
        assert r["gathered"] == [{"r": 0}, {"r": 1}]
        assert r["wrapped"] == "DistributedDataParallel" and r["unwrapped_is_module"]
        assert r["first_time"][0] <= r["first_time"][1]  # rank 0 ran the block first
    # under no_sync each rank keeps its own gradient (its input was rank + 1)
    assert results[0]["local_grad"] == [[1.0, 1.0]] and results[1]["local_grad"] == [[2.0, 2.0]]
