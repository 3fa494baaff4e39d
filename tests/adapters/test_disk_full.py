"""Adapter files on a full disk: save_adapter and export_peft fail with a DiskFullError that names
the directory and its size, leave no temp file, and keep an adapter already there loadable."""

import errno
import os
import re

import pytest
import torch

import lora_phi3
from lora_phi3.atomic import DiskFullError
from full_disk import WAYS, fill_disk
from tiny import logits, randomize, tiny_phi3


def _adapted(seed: int):
    model = tiny_phi3()
    lora_phi3.inject_lora(model, lora_phi3.LoraConfig(r=2))
    return randomize(model, seed, only=lambda name: "lora_" in name)


def _contents(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _message(path, size: int) -> str:
    return (rf"^No space left on device: writing {re.escape(repr(str(path)))} needs {size:,} bytes"
            rf"( \([\d.]+ MB\))?; its filesystem has [\d,]+ bytes.* free\. "
            "Nothing there was changed: free some space and write again$")


@pytest.mark.parametrize("on", WAYS)
def test_save_adapter_into_a_new_directory_on_a_full_disk(tmp_path, monkeypatch, on):
    model = _adapted(seed=1)
    size = sum(len(b) for b in _contents(lora_phi3.save_adapter(model, tmp_path / "ref")).values())
    runs = tmp_path / "runs"
    runs.mkdir()
    fill_disk(monkeypatch, runs, capacity=size // 2, on=on)
    with pytest.raises(DiskFullError, match=_message(runs / "adapter", size)) as info:
        lora_phi3.save_adapter(model, runs / "adapter")
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(runs) == []  # neither the adapter nor its temp directory


@pytest.mark.parametrize("on, part", [("write", 0.5),    # in the tensor file
                                      ("write", 1.0),    # in the json: the tensor file went in
                                      ("fsync", 0.0)])
def test_save_adapter_over_an_existing_one_on_a_full_disk_keeps_it(tmp_path, monkeypatch, on,
                                                                   part):
    runs = tmp_path / "runs"
    first = _adapted(seed=1)
    path = lora_phi3.save_adapter(first, runs / "adapter")
    before = _contents(path)
    size = sum(len(b) for b in before.values())  # the second save writes as many bytes
    fill_disk(monkeypatch, runs, capacity=int(part * len(before["adapter.safetensors"])), on=on)
    with pytest.raises(DiskFullError, match=_message(path, size)):
        lora_phi3.save_adapter(_adapted(seed=2), path)
    monkeypatch.undo()
    assert os.listdir(runs) == ["adapter"] and _contents(path) == before  # no temp file in either
    fresh = tiny_phi3()
    lora_phi3.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), logits(first))


def test_export_peft_on_a_full_disk(tmp_path, monkeypatch):
    fill_disk(monkeypatch, tmp_path, capacity=100)
    with pytest.raises(DiskFullError, match=rf"writing {re.escape(repr(str(tmp_path / 'peft')))} "
                                            r"needs [\d,]+ bytes"):
        lora_phi3.export_peft(_adapted(seed=1), tmp_path / "peft")
    assert os.listdir(tmp_path) == []
