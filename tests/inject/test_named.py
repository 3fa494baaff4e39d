"""Several named adapters in one model: each computes what it would alone (against a model holding
only that adapter, and against dense references), mixed batches equal single runs, and a
one-adapter model keeps its keys. Hot swap: tests/adapters/test_hotswap.py."""

import pytest
import torch

import lora_phi3 as lora
from lora_phi3 import LoraConfig
from tiny import (NAMED_CFG_A as CFG_A, NAMED_CFG_B as CFG_B, NAMED_CFG_C as CFG_C, X,
                  alone as _alone, dense_reference, logits, tiny_phi3, two_adapters as _two)


def test_one_adapter_keeps_the_keys_and_a_second_one_adds_its_own():
    plain = tiny_phi3()
    lora.inject_lora(plain, CFG_A)
    named = tiny_phi3()
    lora.inject_lora(named, CFG_A, adapter_name="default")
    assert list(plain.state_dict()) == list(named.state_dict())
    assert lora.adapter_names(named) == ["default"] and lora.active_adapter(named) == "default"
    lora.add_adapter(named, CFG_B, "b")
    extra = set(named.state_dict()) - set(plain.state_dict())
    assert extra and all(".lora_adapters.b." in k for k in extra)
    lora.delete_adapter(named, "b")
    assert list(plain.state_dict()) == list(named.state_dict())


def test_each_adapter_computes_what_it_would_alone():
    model = _two(c=True)
    for name, cfg in [("default", CFG_A), ("b", CFG_B), ("c", CFG_C)]:
        lora.set_adapter(model, name)
        torch.testing.assert_close(logits(model), logits(_alone(model, name, cfg)), atol=1e-6, rtol=0)
    lora.set_adapter(model, "b")
    torch.testing.assert_close(logits(model), logits(dense_reference(model)), atol=1e-4, rtol=0)
    with lora.disable_lora(model):
        torch.testing.assert_close(logits(model), logits(tiny_phi3()), atol=0, rtol=0)


def test_only_the_active_adapter_trains():
    model = _two()
    lora.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.lora_state_dict(model)) and trainable
    assert not any(".lora_adapters." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(X, labels=X).loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable


def test_merging_merges_the_active_adapter_only():
    model = _two()
    lora.set_adapter(model, "b")
    want = logits(model)
    lora.merge_lora(model)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unmerge_lora\\(model\\) first"):
        lora.set_adapter(model, "default")
    lora.unmerge_lora(model)
    lora.set_adapter(model, "default")
    torch.testing.assert_close(logits(model), logits(_alone(model, "default", CFG_A)), atol=1e-6, rtol=0)


def test_mixed_batch_rows_equal_single_runs():
    model = _two(c=True)
    ids = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(9))
    names = ["b", None, "default", "c", "b"]
    single = {}
    for name in {"default", "b", "c"}:
        lora.set_adapter(model, name)
        single[name] = logits(model, ids)
    lora.set_adapter(model, "default")
    with lora.disable_lora(model):
        single[None] = logits(model, ids)
    with lora.mixed_batch(model, names):
        mixed = logits(model, ids)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=0)
    assert lora.active_adapter(model) == "default"
    torch.testing.assert_close(logits(model, ids), single["default"], atol=0, rtol=0)


def test_mixed_batch_holds_under_generate():
    model = _two()
    prompt = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(5))
    names = ["default", "b", None]
    outs = {}
    for name in ["default", "b"]:
        lora.set_adapter(model, name)
        outs[name] = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with lora.disable_lora(model):
        outs[None] = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    lora.set_adapter(model, "default")
    with lora.mixed_batch(model, names):
        mixed = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        assert torch.equal(mixed[i], outs[name][i])


@pytest.mark.parametrize("names, message", [
    (["default", "nope"], r"mixed_batch: unknown adapter\(s\) 'nope'; the model has \['default', 'b'\]"),
    ([], r"mixed_batch needs a non-empty list"),
    ("b", r"mixed_batch needs a non-empty list"),
])
def test_mixed_batch_bad_names_are_refused(names, message):
    model = _two()
    with pytest.raises(ValueError, match=message):
        with lora.mixed_batch(model, names):
            pass
    assert all(m.mixed_groups is None for m in model.modules() if isinstance(m, lora.LoRALayer))


def test_mixed_batch_with_a_wrong_row_count_is_refused_and_leaves_the_model_as_it_was():
    model = _two()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mixed_batch got 3 adapter names for a batch of 2 rows"):
        with lora.mixed_batch(model, ["b", "default", None]):
            logits(model)
    assert lora.active_adapter(model) == "default"
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.mixed_groups is None for m in model.modules() if isinstance(m, lora.LoRALayer))


@pytest.mark.parametrize("call, message", [
    (lambda m: lora.add_adapter(m, CFG_B, "b"), r"already has an adapter 'b'"),
    (lambda m: lora.add_adapter(m, CFG_B, "x.y"), r"adapter_name must be a non-empty string"),
    (lambda m: lora.add_adapter(m, LoraConfig(r=2, target_modules=["o_proj"],
                                              init_lora_weights="pissa"), "p"),
     r"LoraConfig.init_lora_weights='pissa' is not allowed for a second adapter"),
    (lambda m: lora.add_adapter(m, LoraConfig(r=2, target_modules=["o_proj"],
                                              quantize_base="nf4"), "q"),
     r"LoraConfig.quantize_base='nf4' is not allowed"),
    (lambda m: lora.add_adapter(m, LoraConfig(r=2, target_modules=["nope"]), "q"),
     r"matched no module"),
    (lambda m: lora.set_adapter(m, "zzz"), r"set_adapter: unknown adapter 'zzz'"),
    (lambda m: lora.delete_adapter(m, "default"), r"'default' is the active adapter"),
])
def test_bad_adapter_operations_are_refused_and_change_nothing(call, message):
    model = _two()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model)
    assert lora.adapter_names(model) == ["default", "b"] and lora.active_adapter(model) == "default"
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_pissa_model_takes_no_second_adapter():
    model = tiny_phi3()
    lora.inject_lora(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="base weights are its residuals"):
        lora.add_adapter(model, CFG_B, "b")
    assert lora.adapter_names(model) == ["default"]


def test_delete_adapter_frees_its_parameters():
    model = _two()
    n_before = sum(p.numel() for p in model.parameters())
    b_size = sum(p.numel() for n, p in model.named_parameters() if ".lora_adapters.b." in n)
    lora.delete_adapter(model, "b")
    assert sum(p.numel() for p in model.parameters()) == n_before - b_size and b_size > 0
    assert lora.adapter_names(model) == ["default"]


def test_files_take_adapter_name(tmp_path):
    model = _two()
    lora.save_adapter(model, tmp_path / "b", adapter_name="b")
    lora.set_adapter(model, "b")
    want = logits(model)
    lora.set_adapter(model, "default")
    fresh = lora.load_adapter(tiny_phi3(), tmp_path / "b", adapter_name="b")  # bare: injected as b
    assert lora.adapter_names(fresh) == ["b"] and lora.active_adapter(fresh) == "b"
    torch.testing.assert_close(logits(fresh), want, atol=0, rtol=0)
    other = tiny_phi3()
    lora.inject_lora(other, CFG_A)
    lora.load_adapter(other, tmp_path / "b", adapter_name="b")  # added beside default, inactive
    assert lora.adapter_names(other) == ["default", "b"] and lora.active_adapter(other) == "default"
    lora.set_adapter(other, "b")
    torch.testing.assert_close(logits(other), want, atol=0, rtol=0)
