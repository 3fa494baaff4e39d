"""mark_only_lora_as_trainable and lora_state_dict, in each bias mode."""

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora

from tiny import MagnitudeLinear


def _model():
    return nn.Sequential(lora.Linear(4, 4, r=2), nn.Linear(4, 4), lora.Linear(4, 4, r=0),
                         nn.LayerNorm(4))


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_mark_only_lora_as_trainable_modes():
    model = _model()
    model.requires_grad_(False)  # loralib would leave LoRA frozen after this; we re-enable it
    lora.mark_only_lora_as_trainable(model)
    assert _trainable(model) == ["0.lora_A", "0.lora_B"]
    lora.mark_only_lora_as_trainable(model, bias="all")
    assert _trainable(model) == ["0.bias", "0.lora_A", "0.lora_B", "1.bias", "2.bias", "3.bias"]
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert _trainable(model) == ["0.bias", "0.lora_A", "0.lora_B"]


def test_lora_state_dict_modes():
    model = _model()
    assert sorted(lora.lora_state_dict(model)) == ["0.lora_A", "0.lora_B"]
    assert sorted(lora.lora_state_dict(model, bias="all")) == [
        "0.bias", "0.lora_A", "0.lora_B", "1.bias", "2.bias", "3.bias"]
    assert sorted(lora.lora_state_dict(model, bias="lora_only")) == ["0.bias", "0.lora_A", "0.lora_B"]


@pytest.mark.parametrize("fn", [lora.mark_only_lora_as_trainable, lora.lora_state_dict])
def test_unknown_bias_mode_is_a_value_error(fn):
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), "
                                         r"got 'some'"):
        fn(_model(), bias="some")


def test_helpers_ask_the_layers_which_parameters_are_the_adapters():
    model = nn.Sequential(MagnitudeLinear(4, 4, r=2), nn.Linear(4, 4))
    model[1].lora_like = nn.Parameter(torch.zeros(1))  # a "lora_" name on no LoRA layer
    lora.mark_only_lora_as_trainable(model)
    assert _trainable(model) == ["0.lora_A", "0.lora_B", "0.magnitude"]
    assert sorted(lora.lora_state_dict(model)) == ["0.lora_A", "0.lora_B", "0.magnitude"]
    assert sorted(lora.lora_state_dict(model, bias="lora_only")) == [
        "0.bias", "0.lora_A", "0.lora_B", "0.magnitude"]


def test_shared_layer_keys_follow_state_dict():
    shared = lora.Linear(4, 4, r=2)
    model = nn.ModuleDict({"a": shared, "b": shared})
    assert sorted(lora.lora_state_dict(model)) == ["a.lora_A", "a.lora_B", "b.lora_A", "b.lora_B"]
    assert lora.lora_state_dict(shared).keys() == {"lora_A", "lora_B"}


# -- the divergence guard --------------------------------------------------------------------------
def test_check_finite_step_passes_finite_values_as_floats_or_tensors():
    lora.check_finite_step(3, 2.5, 0.7)
    lora.check_finite_step(3, torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.7))
    lora.check_finite_step(3, 2.5)  # no gradient norm: the loss alone is checked


@pytest.mark.parametrize("loss,grad_norm,reason", [
    (float("nan"), 1.0, "loss nan, gradient norm 1"),
    (2.5, float("inf"), "loss 2.5, gradient norm inf"),
    (torch.tensor(float("-inf")), None, "loss -inf"),
])
def test_check_finite_step_raises_naming_the_step_and_the_value(loss, grad_norm, reason):
    message = rf"^training diverged at step 7: {reason}; lower the learning rate$"
    with pytest.raises(lora.TrainingDiverged, match=message) as e:
        lora.check_finite_step(7, loss, grad_norm)
    assert isinstance(e.value, ValueError) and e.value.step == 7 and e.value.reason == reason
    assert (e.value.grad_norm is None) == (grad_norm is None)


def test_training_diverged_carries_its_fields_and_pickles_whole():
    import pickle

    err = lora.TrainingDiverged(4, "loss nan", float("nan"), None, "use --learning-rate 1e-5")
    assert str(err) == "training diverged at step 4: loss nan; use --learning-rate 1e-5"
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.step == 4 and back.advice == err.advice
    assert "TrainingDiverged" in lora.__all__ and "check_finite_step" in lora.__all__
