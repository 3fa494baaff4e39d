"""Checkpoints written by loralib 0.1.2 load into our layers and give loralib's outputs."""

import io

import pytest
import torch

import lora_phi3 as lora

loralib = pytest.importorskip("loralib")


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CASES = [
    ("Linear", lambda m: m.Linear(10, 6, r=2, lora_alpha=4), lambda: torch.randn(3, 10)),
    ("Linear-fifo", lambda m: m.Linear(10, 6, r=2, lora_alpha=4, fan_in_fan_out=True),
     lambda: torch.randn(3, 10)),
    ("Embedding", lambda m: m.Embedding(12, 5, r=3, lora_alpha=3), lambda: torch.randint(0, 12, (2, 4))),
    ("MergedLinear", lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=2, enable_lora=[True, False, True]),
     lambda: torch.randn(3, 8)),
    ("Conv2d", lambda m: m.Conv2d(3, 6, 3, r=2, lora_alpha=2), lambda: torch.randn(2, 3, 7, 7)),
]


@pytest.mark.parametrize("name,make,inputs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_loralib_checkpoint_gives_same_outputs(name, make, inputs, mode):
    torch.manual_seed(0)
    theirs = make(loralib)
    _randomize(theirs)
    x = inputs()
    pretrained = {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}
    ours = make(lora)
    # The usual two-step load: the pretrained weights, then loralib's lora_state_dict.
    first = ours.load_state_dict(_roundtrip(pretrained), strict=False)
    assert sorted(first.missing_keys) == ["lora_A", "lora_B"] and not first.unexpected_keys
    ours.load_state_dict(_roundtrip(loralib.lora_state_dict(theirs)), strict=False)
    getattr(theirs, mode)()
    getattr(ours, mode)()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    # A full loralib state dict (Conv's `conv.weight` included) also loads strictly.
    fresh = make(lora)
    fresh.load_state_dict(_roundtrip(make_full_state(theirs)), strict=True)
    getattr(fresh, mode)()
    torch.testing.assert_close(fresh(x), theirs(x), atol=1e-5, rtol=1e-5)


def make_full_state(theirs):
    was_training = theirs.training
    theirs.train()  # unmerged weights, as a checkpoint is saved during training
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    theirs.train(was_training)
    return state


# Every layer built from its constructor draws from the RNG in loralib's order: the torch module's
# init, then (after A and B exist) loralib's full reset_parameters() again: base weight, bias, A.
SEEDED = [
    ("Linear", lambda m: m.Linear(10, 6, r=2, lora_alpha=4)),
    ("Linear-r0", lambda m: m.Linear(10, 6)),
    ("Linear-fifo", lambda m: m.Linear(10, 6, r=2, fan_in_fan_out=True)),
    ("MergedLinear", lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=2, enable_lora=[True, False, True])),
    ("MergedLinear-fifo", lambda m: m.MergedLinear(8, 12, r=2, enable_lora=[False, True],
                                                    fan_in_fan_out=True)),
    ("Embedding", lambda m: m.Embedding(12, 5, r=3, lora_alpha=3, padding_idx=1)),
    ("Conv1d", lambda m: m.Conv1d(3, 6, 1, r=2)),  # kernel 1: loralib's Conv1d breaks for k > 1
    ("Conv2d", lambda m: m.Conv2d(3, 6, 3, r=2, lora_alpha=2)),
    ("Conv3d", lambda m: m.Conv3d(2, 4, 1, r=2)),
]


@pytest.mark.parametrize("name,make", SEEDED, ids=[c[0] for c in SEEDED])
def test_same_seed_gives_loralibs_initial_weights(name, make):
    torch.manual_seed(1234)
    theirs, their_next = make(loralib).state_dict(), torch.rand(())
    torch.manual_seed(1234)
    ours, our_next = make(lora).state_dict(), torch.rand(())
    theirs = {k.removeprefix("conv."): v for k, v in theirs.items()}  # loralib's Conv keys
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert our_next == their_next  # the same number of draws: the next layer's init agrees too
