"""What an adapter is inside a model: the layers declare their parameters, the state dict follows."""

import torch.nn as nn

from lora_phi3 import layers as L
from lora_phi3.adapters import adapter_state_dict
from lora_phi3.adapters.state import adapter_param_keys, injected_preview, is_bare
from lora_phi3.config import LoraConfig
from lora_phi3.inject import inject_lora, lora_modules
from tiny import MagnitudeLinear, tiny_phi3


def test_the_state_dict_holds_what_each_layer_declares():
    model = nn.Sequential(MagnitudeLinear(4, 3, r=2), L.Linear(3, 2, r=1), L.Linear(2, 2, r=0))
    assert lora_modules(model) == L.lora_layers(model) and set(lora_modules(model)) == {"0", "1"}
    sd = adapter_state_dict(model)
    assert list(sd) == ["0.lora_A", "0.lora_B", "0.magnitude", "1.lora_A", "1.lora_B"]
    assert sd["0.magnitude"].data_ptr() == model[0].magnitude.data_ptr()  # shared, not copied
    assert adapter_param_keys(model) == set(sd)


def test_biases_and_modules_to_save_travel_with_the_adapter_params():
    model = inject_lora(tiny_phi3(), LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]))
    own = {f"model.layers.{i}.self_attn.o_proj.lora_{ab}" for i in range(2) for ab in "AB"}
    assert adapter_param_keys(model) == own
    assert set(adapter_state_dict(model)) == own | {"lm_head.weight"}


def test_the_preview_is_weightless_and_leaves_the_model_bare():
    model = tiny_phi3()
    preview = injected_preview(model, LoraConfig(r=2))
    assert is_bare(model) and not is_bare(preview)
    assert all(t.is_meta for t in adapter_state_dict(preview).values())
    assert sum(len(m._forward_hooks) for m in preview.modules()) == 1  # input grad hook only
