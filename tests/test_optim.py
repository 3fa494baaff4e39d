"""LoRA+ parameter groups (``lora_plus_param_groups``): which parameter goes where, and the same
groups and the same training as PEFT's ``create_loraplus_optimizer``."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora
from lora_phi3.config import LoraConfig
from lora_phi3.inject import inject_lora, lora_modules
from tiny import PER_SLICE, tiny_phi3

LR, RATIO, WD = 1e-3, 16.0, 0.05


def _groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def _assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, and nothing else."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["params"] for g in groups), "empty groups are left out"


def _ids(params) -> set[int]:
    return {id(p) for p in params}


# -- the tiny Phi-3, injected --------------------------------------------------------------------
def test_phi3_groups_partition_the_trainable_parameters():
    model = tiny_phi3()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=PER_SLICE,
                                  modules_to_save=["norm", "lm_head"]))
    groups = lora.lora_plus_param_groups(model, lr=LR, ratio=RATIO, weight_decay=WD)
    _assert_partition(model, groups)
    by = _groups_by_name(groups)
    assert list(by) == ["groupA", "groupB"]  # no embedding adapter, no bias, no LayerNorm
    layers = lora_modules(model).values()
    assert len(layers) == 2 * 4  # per layer: qkv_proj, o_proj, gate_up_proj, down_proj
    # A at lr; lm_head (a saved 2-D weight) goes with A, as in PEFT
    assert _ids(by["groupA"]["params"]) == _ids(m.lora_A for m in layers) | {id(model.lm_head.weight)}
    # B at ratio x lr; the final RMSNorm's weight (1-D, not a LayerNorm) goes with B, decayed
    assert _ids(by["groupB"]["params"]) == _ids(m.lora_B for m in layers) | {id(model.model.norm.weight)}
    assert (by["groupA"]["lr"], by["groupA"]["weight_decay"]) == (LR, WD)
    assert (by["groupB"]["lr"], by["groupB"]["weight_decay"]) == (RATIO * LR, WD)


def test_the_scheduler_keeps_the_ratio():
    model = tiny_phi3()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj"]))
    opt = torch.optim.AdamW(lora.lora_plus_param_groups(model, lr=LR))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        opt.step()
        sched.step()
    a, b = opt.param_groups
    assert a["lr"] == pytest.approx(LR / 8) and b["lr"] == pytest.approx(RATIO * LR / 8)


# -- a small model with an embedding adapter, biases and a LayerNorm -----------------------------
class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = lora.Embedding(20, 8, r=2, lora_alpha=4)
        self.fc = lora.Linear(8, 8, r=2, lora_alpha=4)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)


def test_embedding_adapters_biases_and_layernorm_go_where_peft_puts_them():
    model = EmbedNet()
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    model.ln.requires_grad_(True)
    model.out.weight.requires_grad_(True)
    groups = lora.lora_plus_param_groups(model, lr=LR, ratio=4.0, weight_decay=WD, lr_embedding=3e-5)
    _assert_partition(model, groups)
    by = _groups_by_name(groups)
    assert list(by) == ["groupA", "embedding", "groupB", "groupB_no_decay"]
    assert _ids(by["groupA"]["params"]) == _ids([model.fc.lora_A, model.out.weight])
    assert _ids(by["embedding"]["params"]) == _ids([model.emb.lora_A, model.emb.lora_B])
    assert _ids(by["groupB"]["params"]) == _ids([model.fc.lora_B])
    assert _ids(by["groupB_no_decay"]["params"]) == _ids([model.fc.bias, model.ln.weight,
                                                          model.ln.bias])
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [
        (LR, WD), (3e-5, WD), (4.0 * LR, WD), (4.0 * LR, 0.0)]
    # PEFT's default for embedding adapters, whatever lr is
    assert _groups_by_name(lora.lora_plus_param_groups(model, lr=LR))["embedding"]["lr"] == 1e-6


def test_a_trainable_embedding_table_goes_with_its_adapter():
    # PEFT: base_layer.weight of a lora.Embedding is in the "embedding" group
    model = EmbedNet()
    lora.mark_only_lora_as_trainable(model)
    model.emb.weight.requires_grad_(True)
    by = _groups_by_name(lora.lora_plus_param_groups(model, lr=LR))
    assert _ids(by["embedding"]["params"]) == _ids([model.emb.weight, model.emb.lora_A,
                                                    model.emb.lora_B])


def test_frozen_parameters_are_left_out():
    model = EmbedNet()
    lora.mark_only_lora_as_trainable(model)
    model.fc.lora_A.requires_grad_(False)
    groups = lora.lora_plus_param_groups(model, lr=LR)
    _assert_partition(model, groups)
    assert id(model.fc.lora_A) not in {id(p) for g in groups for p in g["params"]}


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, r"lr must be a finite number > 0, got 0.0"),
    ({"lr": -1e-3}, r"lr must be a finite number > 0, got -0.001"),
    ({"lr": math.nan}, r"lr must be a finite number > 0, got nan"),
    ({"lr": True}, r"lr must be a finite number > 0, got True"),
    ({"lr": "2e-4"}, r"lr must be a finite number > 0, got '2e-4'"),
    ({"ratio": 0}, r"ratio must be a finite number > 0, got 0"),
    ({"ratio": -16.0}, r"ratio must be a finite number > 0, got -16.0"),
    ({"ratio": math.inf}, r"ratio must be a finite number > 0, got inf"),
    ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0, got -0.1"),
    ({"weight_decay": math.nan}, r"weight_decay must be a finite number >= 0, got nan"),
    ({"lr_embedding": 0.0}, r"lr_embedding must be a finite number > 0, got 0.0"),
])
def test_bad_arguments_name_the_field_the_value_and_what_is_allowed(kwargs, match):
    model = EmbedNet()
    with pytest.raises(ValueError, match=match):
        lora.lora_plus_param_groups(model, **{"lr": LR, **kwargs})


def test_a_model_without_trainable_adapters_is_refused():
    with pytest.raises(ValueError, match=r"Sequential has no trainable LoRA adapter parameter"):
        lora.lora_plus_param_groups(nn.Sequential(nn.Linear(4, 4)), lr=LR)
    frozen = EmbedNet().requires_grad_(False)
    frozen.out.requires_grad_(True)  # trainable, but no adapter among them
    with pytest.raises(ValueError, match=r"EmbedNet has no trainable LoRA adapter parameter"):
        lora.lora_plus_param_groups(frozen, lr=LR)
    table_only = EmbedNet().requires_grad_(False)
    table_only.emb.weight.requires_grad_(True)  # an adapted embedding's table is no adapter
    with pytest.raises(ValueError, match=r"EmbedNet has no trainable LoRA adapter parameter"):
        lora.lora_plus_param_groups(table_only, lr=LR)
    with pytest.raises(TypeError, match=r"needs an nn.Module, got dict"):
        lora.lora_plus_param_groups({}, lr=LR)


# -- against PEFT's create_loraplus_optimizer --------------------------------------------------------
try:
    import peft
    from peft.optimizers import create_loraplus_optimizer
except ImportError:  # the tests above still run
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs peft")


class Net(nn.Module):
    """An embedding, two Linear layers with biases, a LayerNorm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 24)
        self.ln = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.ln(torch.relu(self.fc1(self.emb(x))))))


def _canonical(peft_name: str) -> str:
    """PEFT's parameter name -> ours (``base_layer``, the adapter name and the saved copy dropped)."""
    name = peft_name.removeprefix("base_model.model.")
    for theirs, ours in ((".base_layer.", "."), (".modules_to_save.default.", "."),
                         ("lora_A.default.weight", "lora_A"), ("lora_B.default.weight", "lora_B"),
                         ("lora_embedding_A.default", "lora_A"),
                         ("lora_embedding_B.default", "lora_B")):
        name = name.replace(theirs, ours)
    return name


def _twins(targets, bias, modules_to_save):
    """The same fp64 ``Net`` adapted by us and by PEFT, with equal non-zero trainable values."""
    torch.manual_seed(0)
    base = Net().double()
    ours, theirs = base, copy.deepcopy(base)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias=bias,
                                 modules_to_save=modules_to_save))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias=bias,
        modules_to_save=modules_to_save))
    g = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                q = mine[_canonical(name)]
                assert q.requires_grad and q.shape == p.shape, name
                q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) * 0.3)
                p.copy_(q)
    assert {_canonical(n) for n, p in theirs.named_parameters() if p.requires_grad} == \
        {n for n, p in ours.named_parameters() if p.requires_grad}
    return ours, theirs


CASES = {
    "linear": (["fc1", "fc2"], "lora_only", ["ln", "head"]),
    "linear-all-biases": (["fc1", "fc2"], "all", ["ln"]),
    "with-embedding": (["emb", "fc1", "fc2"], "none", ["ln", "head"]),
}


@needs_peft
@pytest.mark.parametrize("case", list(CASES))
def test_same_groups_and_same_training_as_peft(case):
    ours, theirs = _twins(*CASES[case])
    lr, ratio, lr_emb = 1e-2, 16.0, 1e-3  # an embedding lr that visibly moves its adapter
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                           loraplus_weight_decay=WD, loraplus_lr_embedding=lr_emb)
    groups = lora.lora_plus_param_groups(ours, lr=lr, ratio=ratio, weight_decay=WD,
                                         lr_embedding=lr_emb)
    opt_ours = torch.optim.AdamW(groups, lr=lr)

    # the same (lr, weight decay, parameters) per group, in PEFT's group order
    names_theirs = {id(p): _canonical(n) for n, p in theirs.named_parameters()}
    names_ours = {id(p): n for n, p in ours.named_parameters()}
    peft_groups = [(g["lr"], g["weight_decay"], {names_theirs[id(p)] for p in g["params"]})
                   for g in opt_theirs.param_groups if g["params"]]
    our_groups = [(g["lr"], g["weight_decay"], {names_ours[id(p)] for p in g["params"]})
                  for g in opt_ours.param_groups]
    assert our_groups == peft_groups

    # five AdamW steps on the same batches: the same trainable values
    x = [torch.randint(0, 30, (4, 5), generator=torch.Generator().manual_seed(10 + i))
         for i in range(5)]
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        model.train()
        for batch in x:
            opt.zero_grad()
            model(batch).pow(2).mean().backward()
            opt.step()
    trained = {_canonical(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    moved = 0
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[n], atol=1e-12, rtol=0, msg=n)
            moved += 1
    assert moved == len(trained)


@needs_peft
def test_the_comparison_with_peft_can_fail():
    ours, theirs = _twins(*CASES["linear"])
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0)
    opt_ours = torch.optim.AdamW(lora.lora_plus_param_groups(ours, lr=1e-2, ratio=8.0))
    x = torch.randint(0, 30, (4, 5), generator=torch.Generator().manual_seed(0))
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        model(x).pow(2).mean().backward()
        opt.step()
    trained = {_canonical(n): p for n, p in theirs.named_parameters()}
    assert not torch.allclose(ours.fc1.lora_B, trained["fc1.lora_B"], atol=1e-6)
    torch.testing.assert_close(ours.fc1.lora_A, trained["fc1.lora_A"], atol=1e-12, rtol=0)


@needs_peft
def test_peft_puts_dora_magnitudes_with_b():
    # Pins PEFT's rule for the hook in lora_phi3.optim._role: a 1-D adapter parameter (DoRA's
    # magnitude vector, lora_magnitude_vector.<adapter>.weight) trains at ratio x lr, with decay.
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                    loraplus_weight_decay=WD)
    where = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
             for n, q in model.named_parameters() if q is p}
    magnitude = [n for n in where if "lora_magnitude_vector" in n]
    assert magnitude and all(where[n] == (16.0 * 1e-3, WD) for n in magnitude)


@needs_peft
def test_conv_dora_magnitudes_go_where_peft_puts_them():
    # PEFT keeps a conv's DoRA magnitude as (1, out, 1, 1), so its LoRA+ puts it with A at lr;
    # ours is (out,), and optim._role follows PEFT for it; a linear layer's goes with B.
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    theirs = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, target_modules=["conv", "fc"],
                                                           use_dora=True))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    lr_theirs = {n: g["lr"] for g in opt.param_groups for p in g["params"]
                 for n, q in theirs.named_parameters() if q is p and "magnitude" in n}
    ours = ConvNet()
    lora.inject_lora(ours, lora.LoraConfig(r=2, target_modules=["conv", "fc"], use_dora=True))
    lr_ours = {n: g["lr"] for g in lora.lora_plus_param_groups(ours, lr=1e-3, ratio=16.0)
               for p in g["params"] for n, q in ours.named_parameters() if q is p and "magnitude" in n}
    assert sorted(lr_theirs.values()) == sorted(lr_ours.values()) == [1e-3, 16e-3]
    assert lr_ours["conv.lora_magnitude"] == 1e-3 and lr_ours["fc.lora_magnitude"] == 16e-3
