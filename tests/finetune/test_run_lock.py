"""One writer per output directory (``lora_phi3/finetune/run_lock.py``): the lock itself, a live
second ``finetune`` refused with the holder's PID, and a killed holder's lock taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lora_phi3.finetune.cli import main
from lora_phi3.finetune.reporting import check_output_dir
from lora_phi3.finetune.run_lock import RUN_LOCK_NAME, RunDirLocked, RunLock

from runs import bundled_subset, child_env


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this PID now (barring reuse)


# -- the lock --------------------------------------------------------------------------------------
def test_a_second_lock_on_the_same_dir_is_refused_with_the_holders_pid_and_host(tmp_path):
    with RunLock.for_run_dir(tmp_path) as lock:
        assert lock.held and (tmp_path / RUN_LOCK_NAME).is_file()
        record = json.loads((tmp_path / RUN_LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunDirLocked, match=f"in use by another lora-phi3 process \\(PID "
                                               f"{os.getpid()} on host {socket.gethostname()}"):
            RunLock.for_run_dir(tmp_path).acquire()
    assert not (tmp_path / RUN_LOCK_NAME).exists()  # released: nothing left in the run dir
    RunLock.for_run_dir(tmp_path).acquire().release()  # and free again


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    (tmp_path / RUN_LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "node7",
                                                      "started": "2026-01-01T00:00:00"}))
    with caplog.at_level("WARNING"), RunLock.for_run_dir(tmp_path):
        assert json.loads((tmp_path / RUN_LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of PID {pid} on host node7" in caplog.text


def test_the_lock_file_is_not_run_output(tmp_path):
    """``--overwrite-output-dir`` keeps the lock, and a dir holding only the lock is no run."""
    (tmp_path / "summary.json").write_text("{}")
    with RunLock.for_run_dir(tmp_path):
        check_output_dir(tmp_path, resume=False, overwrite=True)
        assert [p.name for p in tmp_path.iterdir()] == [RUN_LOCK_NAME]
        check_output_dir(tmp_path, resume=False, overwrite=False)  # no "already holds a run"


def test_merge_output_is_locked_beside_it(tmp_path, capsys):
    out = tmp_path / "merged"
    with RunLock.beside(out):
        assert (tmp_path / ".merged.lock").is_file()
        with pytest.raises(SystemExit) as e:
            main(["merge", "--adapter", str(tmp_path / "nowhere"), "--output-dir", str(out)])
    assert e.value.code == 2
    assert f"'{out}' is in use by another lora-phi3 process (PID {os.getpid()}" in capsys.readouterr().err
    assert not out.exists()


# -- two finetune processes on one run dir ---------------------------------------------------------
# The child checkpoints step 1, then blocks inside step 2 (holding the lock) until it is killed.
BLOCK_AT_STEP_2 = (
    "import sys, time\n"
    "import lora_phi3.finetune.job\n"
    "ft = sys.modules['lora_phi3.finetune.job']\n"
    "real_step, calls = ft.train_step, [0]\n"
    "def step_or_block(*a, **k):\n"
    "    calls[0] += 1\n"
    "    if calls[0] == 2:\n"
    "        open(sys.argv[1], 'w').close()\n"
    "        time.sleep(600)\n"
    "    return real_step(*a, **k)\n"
    "ft.train_step = step_or_block\n"
    "from lora_phi3.finetune.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n")


def test_a_second_finetune_is_refused_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    bundled_subset(data, 32, 8)
    run = tmp_path / "run"
    args = ["finetune", "--output-dir", str(run), "--data", str(data), "--max-steps", "3",
            "--batch-size", "2", "--max-seq-length", "64", "--save-steps", "1", "--eval-steps", "0",
            "--no-progress", "--log-level", "WARNING", "--device", "cpu"]
    blocked = tmp_path / "blocked"
    first = subprocess.Popen([sys.executable, "-c", BLOCK_AT_STEP_2, str(blocked), *args],
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not blocked.exists():
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run never reached step 2"
            time.sleep(0.1)
        with pytest.raises(SystemExit) as e:
            main([*args, "--resume"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (f"lora-phi3 finetune: error: {str(run)!r} is in use by another lora-phi3 process "
                f"(PID {first.pid} on host {socket.gethostname()}") in err, err
        # refused before touching the dir: the first run's checkpoint and files are as it left them
        assert sorted(p.name for p in run.iterdir()) == [
            RUN_LOCK_NAME, "checkpoint-1", "metrics.jsonl", "recipe.json"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()

    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of PID {first.pid} on host {socket.gethostname()}" in err, err
    assert '"checkpoint": "checkpoint-1"' in (run / "metrics.jsonl").read_text()
    assert (run / "adapter").is_dir() and not (run / RUN_LOCK_NAME).exists()
