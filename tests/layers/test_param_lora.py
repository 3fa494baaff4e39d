"""LoRA on parameters (``target_parameters``): ``ParamLoRA`` on a 2-D weight and on 3-D expert weights,
the experts host against a dense reference written expert by expert, merge exactness, PEFT's layout,
and every refusal by its message."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from lora_phi3 import (LoraConfig, add_adapter, disable_lora, inject_lora, merge_lora, mixed_batch,
                       unmerge_lora)
from lora_phi3.layers import LoRAExperts, LoRAParameters, ParamLoRA, is_experts_module, lora_layers
from lora_phi3.layers.param_lora import from_peft_factors, split_param_lora_name

from test_experts import ALPHA, E, H, I, R, S, experts, lora_experts, randomize, routing


# -- ParamLoRA: the maths ------------------------------------------------------------------------
def test_a_2d_parameter_delta_and_update_against_b_at_a():
    host = LoRAParameters(nn.Linear(6, 5), ["weight"], r=3, lora_alpha=6, init_lora_weights=False)
    lora = host.param_lora["weight"]
    assert lora.lora_A.shape == (3, 6) and lora.lora_B.shape == (5, 3) and lora.num_experts is None
    torch.testing.assert_close(lora.delta_weight(), 2.0 * lora.lora_B @ lora.lora_A)
    x = torch.randn(4, 6)
    torch.testing.assert_close(lora.lora_update(x), x @ (2.0 * lora.lora_B @ lora.lora_A).T)


def test_a_3d_parameter_has_one_pair_per_expert():
    host = randomize(lora_experts())
    for name, (out, inp) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        lora = host.param_lora[name]
        assert lora.lora_A.shape == (R, E, inp) and lora.lora_B.shape == (out, R, E)
        delta = lora.delta_weight()
        assert delta.shape == (E, out, inp)
        x = torch.randn(3, inp)
        for e in range(E):
            B_e, A_e = lora.lora_B[:, :, e], lora.lora_A[:, e]
            torch.testing.assert_close(delta[e], S * B_e @ A_e)
            torch.testing.assert_close(lora.lora_update(x, e), x @ (S * B_e @ A_e).T)


def test_peft_layout_is_expert_major_a_and_rank_major_b():
    lora = randomize(lora_experts()).param_lora["down_proj"]
    A, B = lora.peft_factors()
    assert A.shape == (E * R, I) and B.shape == (H, R * E)
    for e in range(E):  # PEFT's reshape: A (E, r, in), B (out, r, E)
        torch.testing.assert_close(A.reshape(E, R, I)[e], lora.lora_A[:, e])
        torch.testing.assert_close(B.reshape(H, R, E)[:, :, e], lora.lora_B[:, :, e])
    back = from_peft_factors(A, B, lora.weight.shape)
    assert torch.equal(back[0], lora.lora_A) and torch.equal(back[1], lora.lora_B)
    with pytest.raises(ValueError, match=r"do not fit a parameter of shape \(4, 32, 48\): PEFT's "
                                         r"pair for it is lora_A \(rank \* 4, 48\)"):
        from_peft_factors(A[:, :5], B, lora.weight.shape)


def test_init_matches_peft_s_linear_pair():
    torch.manual_seed(0)
    big = LoRAExperts(experts(), ["gate_up_proj"], r=16, lora_alpha=16, init_lora_weights=False)
    lora = big.param_lora["gate_up_proj"]
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(H) and lora.lora_A.abs().max() > 0.9 / math.sqrt(H)
    assert lora.lora_B.abs().max() <= 1 / math.sqrt(16 * E) and lora.lora_B.abs().max() > 0
    fresh = LoRAExperts(experts(), ["gate_up_proj"], r=16, lora_alpha=16)
    assert not fresh.param_lora["gate_up_proj"].lora_B.any()  # B = 0: the base function


def test_merge_unmerge_are_exact_and_idempotent():
    host = randomize(lora_experts())
    hidden, index, weights = routing()
    original = {n: p.detach().clone() for n, p in host.named_parameters()}
    with torch.no_grad():
        want = host(hidden, index, weights)
        for lora in host.param_lora.values():
            lora.merge()
            lora.merge()  # idempotent
        for name in ("gate_up_proj", "down_proj"):  # W + s * B @ A, expert by expert
            lora = host.param_lora[name]
            for e in range(E):
                torch.testing.assert_close(getattr(host, name)[e], original[name][e]
                                           + S * lora.lora_B[:, :, e] @ lora.lora_A[:, e])
        torch.testing.assert_close(host(hidden, index, weights), want, atol=1e-5, rtol=1e-5)
        for lora in host.param_lora.values():
            lora.unmerge()
    for n, p in host.named_parameters():
        assert torch.equal(p, original[n]), n  # bit for bit


def test_to_base_module_gives_back_the_module_with_its_weights():
    module = experts()
    gate_up = module.gate_up_proj
    host = LoRAExperts(module, ["down_proj"], r=R, lora_alpha=ALPHA)
    assert module.gate_up_proj is None and host.gate_up_proj is gate_up
    assert host.num_experts == E  # plain attributes read through to the module
    assert set(host.state_dict()) == {"gate_up_proj", "down_proj", "param_lora.down_proj.lora_A",
                                      "param_lora.down_proj.lora_B"}
    back = host.to_base_module()
    assert back is module and back.gate_up_proj is gate_up and not hasattr(back, "param_lora")


# -- any other module: the dense substitute ------------------------------------------------------
class ParameterLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))  # (in, out): x @ W
        self.bias = nn.Parameter(torch.randn(5))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight + self.bias) * self.scale


def test_a_plain_weight_runs_its_module_with_w_plus_s_b_a():
    torch.manual_seed(0)
    module = ParameterLinear()
    W, b = module.weight.detach().clone(), module.bias.detach().clone()
    host = randomize(LoRAParameters(module, ["weight"], r=3, lora_alpha=3))
    lora = host.param_lora["weight"]
    assert (lora.out_features, lora.in_features) == (6, 5)  # PEFT's reading of a 2-D parameter
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(host(x), (x @ (W + lora.lora_B @ lora.lora_A) + b) * 2.0)
        lora.lora_disabled = True
        torch.testing.assert_close(host(x), (x @ W + b) * 2.0)
    assert set(host.state_dict()) == {"weight", "bias", "scale", "param_lora.weight.lora_A",
                                      "param_lora.weight.lora_B"}


# -- refusals --------------------------------------------------------------------------------------
def test_layer_refusals_name_the_parameter_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"ParamLoRA needs a floating-point 2-D \(out, in\) or 3-D "
                                         r"\(experts, out, in\) parameter; Linear.bias is "
                                         r"torch.float32 of shape \(5,\)"):
        LoRAParameters(nn.Linear(6, 5), ["bias"], r=2)
    with pytest.raises(ValueError, match=r"parameter_names must name distinct direct parameters of "
                                         r"Linear \(it has \['weight', 'bias'\]\), got \['w'\]"):
        LoRAParameters(nn.Linear(6, 5), ["w"], r=2)
    with pytest.raises(ValueError, match=r"LoRAExperts needs a transformers experts module .*; "
                                         r"Linear is not one"):
        LoRAExperts(nn.Linear(6, 5), ["weight"], r=2)
    transposed = experts()
    transposed.is_transposed = True
    assert not is_experts_module(transposed)
    with pytest.raises(ValueError, match=r"stores its experts transposed \(experts, in, out\)"):
        LoRAParameters(transposed, ["down_proj"], r=2)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' is not supported by ParamLoRA"):
        LoRAExperts(experts(), ["down_proj"], r=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"use_dora=True is not supported by ParamLoRA"):
        ParamLoRA.check_variants(use_dora=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_parameters": "down_proj"}, r"target_parameters must be None or a non-empty list of "
                                         r"parameter paths .* got 'down_proj'"),
    ({"target_parameters": []}, r"target_parameters must be None or a non-empty list .* got \[\]"),
    ({"target_parameters": ["down_proj"], "quantize_base": "nf4"},
     r"target_parameters=\['down_proj'\] cannot be combined with quantize_base='nf4'"),
    ({"target_parameters": ["down_proj"], "lora_dropout": 0.1},
     r"target_parameters=\['down_proj'\] cannot be combined with lora_dropout=0.1 .* allowed "
     r"with target_parameters: 0.0"),
    ({"target_parameters": ["down_proj"], "use_dora": True}, r"cannot be combined with use_dora=True"),
    ({"target_parameters": ["down_proj"], "lora_bias": True}, r"cannot be combined with lora_bias=True"),
    ({"target_parameters": ["down_proj"], "init_lora_weights": "olora"},
     r"cannot be combined with init_lora_weights='olora'"),
])
def test_config_refusals_name_both_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = experts()
        self.fc = nn.Linear(H, H)
        self.scale = nn.Parameter(torch.ones(H))

    def forward(self, x, index, weights):
        return self.fc(self.experts(x, index, weights)) * self.scale


def test_inject_refusals_change_nothing():
    cases = [
        (LoraConfig(target_parameters=["experts.up_proj"]),
         r"target_parameters entry \['experts.up_proj'\] matched no parameter of Block .* 2-D and "
         r"3-D parameters here: experts.gate_up_proj, experts.down_proj, fc.weight"),
        (LoraConfig(target_parameters=["scale"]),
         r"matched 'scale', a parameter of the model itself \(Block\)"),
        (LoraConfig(target_parameters=["fc.bias"]),
         r"matched 'fc.bias', which cannot take an adapter: it has shape \(32,\)"),
        (LoraConfig(target_modules=["fc"], target_parameters=["fc.weight"]),
         r"\['fc'\] are adapted by target_modules=\['fc'\] and their parameters by "
         r"target_parameters=\['fc.weight'\]"),
    ]
    for config, message in cases:
        block = Block()
        before = {k: v.clone() for k, v in block.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            inject_lora(block, config)
        assert block.state_dict().keys() == before.keys()
        assert all(torch.equal(block.state_dict()[k], v) for k, v in before.items())
        assert not lora_layers(block)


def test_inject_merge_disable_and_the_model_level_refusals():
    block = inject_lora(Block(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc"],
                                            target_parameters=["experts.down_proj"]))
    assert isinstance(block.experts, LoRAExperts) and block.scale.requires_grad is False
    names = set(lora_layers(block))
    assert names == {"fc", "experts.param_lora.down_proj"}
    assert split_param_lora_name("experts.param_lora.down_proj") == ("experts", "down_proj")
    randomize(block.experts)
    args = routing()
    with torch.no_grad():
        want = block(*args)
        merge_lora(block)  # an adapter's weight held by its host is not "tied"
        torch.testing.assert_close(block(*args), want, atol=1e-5, rtol=1e-5)
    with disable_lora(block), torch.no_grad():
        base = Block()
        torch.testing.assert_close(block(*args), base(*args), atol=1e-6, rtol=0)
    unmerge_lora(block)
    with pytest.raises(ValueError, match=r"add_adapter cannot add them"):
        add_adapter(block, LoraConfig(target_modules=["fc"], target_parameters=["gate_up_proj"]),
                    "other")
    add_adapter(block, LoraConfig(target_modules=["fc"]), "other")
    with pytest.raises(ValueError, match=r"mixed_batch is not supported by adapters on parameters"):
        with mixed_batch(block, ["default", "other"] * 5), torch.no_grad():
            block(*args)


def test_a_host_deepcopies_with_its_adapters_pointing_at_the_copy():
    host = randomize(lora_experts())
    clone = copy.deepcopy(host)
    lora = clone.param_lora["gate_up_proj"]
    assert lora.host is clone and lora.weight is clone.gate_up_proj
    assert lora.weight is not host.gate_up_proj


def test_exclude_modules_and_layers_to_transform_narrow_parameter_targets():
    def stack() -> nn.Module:
        model = nn.Module()
        model.layers = nn.ModuleList([Block(), Block(), Block()])
        return model

    model = inject_lora(stack(), LoraConfig(target_parameters=["experts.down_proj"],
                                            layers_to_transform=[0, 2]))
    assert set(lora_layers(model)) == {"layers.0.experts.param_lora.down_proj",
                                       "layers.2.experts.param_lora.down_proj"}
    model = inject_lora(stack(), LoraConfig(target_parameters=["down_proj"],
                                            exclude_modules=["layers.1.experts"]))
    assert {n.split(".")[1] for n in lora_layers(model)} == {"0", "2"}
    with pytest.raises(ValueError, match=r"target_parameters=\['down_proj'\] matched, but "
                                         r"exclude_modules=\['experts'\] .* left none to adapt"):
        inject_lora(stack(), LoraConfig(target_parameters=["down_proj"], exclude_modules=["experts"]))


def test_peft_files_with_target_parameters_are_checked(tmp_path):
    import json

    from lora_phi3 import export_peft, import_peft
    model = inject_lora(Block(), LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=["down_proj"]))
    export_peft(model, tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["target_parameters"] == ["down_proj"] and cfg["target_modules"] == []
    for change, message in (
            ({"target_parameters": "down_proj"}, r"target_parameters must be a list of parameter "
                                                 r"names or null, got 'down_proj'"),
            ({"lora_dropout": 0.1}, r"target_parameters with lora_dropout=0.1, which PEFT refuses"),
            ({"target_parameters": ["up_proj"]}, r"does not fit the model \(nothing was changed\): "
                                                 r"LoraConfig.target_parameters entry \['up_proj'\] "
                                                 r"matched no parameter"),
            ({"r": 1}, r"fit the model \(nothing was changed\): experts \(adapting experts.down_proj\): "
                       r"lora_A has 8 rows, the "
                       r"config's rank 1 .* x 4 expert\(s\)")):
        cfg_path.write_text(json.dumps({**cfg, **change}))
        fresh = Block()
        with pytest.raises(ValueError, match=message):
            import_peft(fresh, tmp_path / "p")
        assert not lora_layers(fresh) and not isinstance(fresh.experts, LoRAExperts)


def test_export_refuses_what_peft_refuses_on_parameters(tmp_path):
    from transformers.pytorch_utils import Conv1D

    from lora_phi3 import export_peft
    block = Block()
    block.proj = Conv1D(H, H)  # weight (in, out): PEFT sets fan_in_fan_out for the whole adapter
    inject_lora(block, LoraConfig(target_modules=["proj"], target_parameters=["down_proj"]))
    with pytest.raises(ValueError, match=r"export_peft: PEFT's adapters on parameters "
                                         r"\(experts.param_lora.down_proj\) refuse "
                                         r"fan_in_fan_out=True"):
        export_peft(block, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_peft_file_on_one_expert_parameter_loads_into_a_host_of_both(tmp_path):
    """PEFT nests only the parameters its file targets: ``experts`` is ``down_proj``'s key when
    ``down_proj`` is the only one, whatever our host holds."""
    from lora_phi3 import export_peft, import_peft
    source = inject_lora(Block(), LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=["down_proj"]))
    randomize(source.experts)
    export_peft(source, tmp_path / "p")
    both = inject_lora(Block(), LoraConfig(r=R, lora_alpha=ALPHA,
                                           target_parameters=["gate_up_proj", "down_proj"]))
    import_peft(both, tmp_path / "p", strict=False)
    loaded, want = both.experts.param_lora["down_proj"], source.experts.param_lora["down_proj"]
    assert torch.equal(loaded.lora_A, want.lora_A) and torch.equal(loaded.lora_B, want.lora_B)
    assert not both.experts.param_lora["gate_up_proj"].lora_B.any()
