"""HF PEFT's small-model LoRA cases, both ways: PEFT builds an adapter with random weights, we import
it and give PEFT's outputs, we export it and PEFT gives the same outputs again (with the same
tensors). All 37 round-trip, ``target_parameters`` on a plain weight included.

The cases are the 37 LoRA entries of ``TEST_CASES`` in PEFT's ``tests/test_custom_models.py`` (as of
PEFT 0.21); the small models are written here with the same module types and shapes. The table of
results is in ``docs/adapters.md`` ("PEFT's model zoo").
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from lora_phi3.adapters import export_peft, import_peft
from lora_phi3.layers import MultiheadAttention, ParamLoRA, lora_layers

peft = pytest.importorskip("peft")


# -- the small models: a body, then a flattening linear head (as PEFT's) ---------------------------
class Classifier(nn.Module):
    """``head(flatten(relu(body(x))))`` with a log-softmax, where ``body`` is the modules given."""

    def __init__(self, head_in: int, **body: nn.Module) -> None:
        super().__init__()
        self.names = list(body)
        for name, module in body.items():
            setattr(self, name, module)
        self.lin0 = nn.Linear(head_in, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return F.log_softmax(self.lin0(torch.relu(x).flatten(1)), dim=-1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class ParameterLinear(nn.Module):
    """A linear layer holding its weight as a bare ``nn.Parameter`` ``(in, out)`` (no nn.Linear)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class ParameterMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = ParameterLinear(10, 20), ParameterLinear(20, 2)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, 10), sequence first
        return F.log_softmax(self.lin0(self.mha(x, x, x)[0]), dim=-1)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens() -> torch.Tensor:
    ids = torch.randint(0, 100, (4, 10), generator=_gen())
    ids[0, :3] = torch.tensor([0, 10, 0])  # the trainable tokens of the trainable-tokens case
    return ids


# model name -> (builder, input builder)
MODELS = {
    "MLP": (MLP, lambda: torch.randn(4, 10, generator=_gen())),
    "MlpUsingParameters": (ParameterMLP, lambda: torch.randn(4, 10, generator=_gen())),
    "EmbConv1D": (lambda: Classifier(10, emb=nn.Embedding(100, 5), conv1d=Conv1D(1, 5)), _tokens),
    "Conv1d": (lambda: Classifier(9, conv1d=nn.Conv1d(1, 1, 2)),
               lambda: torch.randn(4, 1, 10, generator=_gen())),
    "Conv2d": (lambda: Classifier(10, conv2d=nn.Conv2d(5, 10, 3)),
               lambda: torch.randn(4, 5, 3, 3, generator=_gen())),
    "Conv2dGroups": (lambda: Classifier(16, conv2d=nn.Conv2d(16, 16, 3, groups=8)),
                     lambda: torch.randn(2, 16, 3, 3, generator=_gen())),
    "Conv2dGroups2": (lambda: Classifier(32 * 25, conv2d=nn.Conv2d(16, 32, 3, padding=1, groups=2)),
                      lambda: torch.randn(2, 16, 5, 5, generator=_gen())),
    "Conv3d": (lambda: Classifier(10, conv3d=nn.Conv3d(5, 10, 3)),
               lambda: torch.randn(2, 5, 3, 3, 3, generator=_gen())),
    "MHA": (Attention, lambda: torch.randn(5, 3, 10, generator=_gen())),
}

# (PEFT's case name, model, LoraConfig arguments)
CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP",
     {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D",
     {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D",
     {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D",
     {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2",
     {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP",
     {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d",
     {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d",
     {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP",
     {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
]


def test_the_case_list_is_peft_s_37():
    assert len(CASES) == 37 and len({name for name, *_ in CASES}) == 37


def base_model(model_name: str) -> nn.Module:
    torch.manual_seed(0)  # the same "pretrained" weights every time
    return MODELS[model_name][0]().eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def peft_adapter(model_name: str, config: dict, path) -> nn.Module:
    """PEFT's adapter with random weights (B, DoRA magnitudes, trainable tokens, saved modules),
    written to ``path``; returns the PeftModel in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out, merging groups, ...
        model = peft.get_peft_model(base_model(model_name),
                                    peft.LoraConfig(init_lora_weights=False, **config))
        g = _gen(7)
        with torch.no_grad():  # trained-looking values where PEFT's init leaves a no-op or a copy
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(0.5 + torch.rand(p.shape, generator=g))
                elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                    p.add_(torch.randn(p.shape, generator=g))
        model.save_pretrained(path)  # and that lora_bias's 1-D tensors look like ZeRO-3 shards
    return model.eval()


def peft_doubles_mha_out_proj() -> bool:
    """True while PEFT's MultiheadAttention adds its out_proj update twice (PEFT <= 0.21 merges it
    by hand and then again through ``out_proj.merge``; huggingface/peft#3774)."""
    model = peft.get_peft_model(Attention(), peft.LoraConfig(target_modules=["mha"],
                                                             init_lora_weights=False))
    layer = model.base_model.model.mha
    before = layer.base_layer.out_proj.base_layer.weight.detach().clone()
    delta = layer.base_layer.out_proj.get_delta_weight("default")
    layer.merge()
    return bool(torch.allclose(layer.base_layer.out_proj.base_layer.weight, before + 2 * delta))


def assert_outputs(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    """Our outputs are PEFT's; for an MHA adapter, PEFT's are those of our layer with its out_proj
    update doubled as long as PEFT's bug lasts."""
    want = outputs(theirs, x)
    mhas = [m for m in ours.modules() if isinstance(m, MultiheadAttention)]
    if mhas and peft_doubles_mha_out_proj():
        doubled = copy.deepcopy(ours)
        for m in doubled.modules():
            if isinstance(m, MultiheadAttention):
                m.out_proj.lora_B.data *= 2
        torch.testing.assert_close(outputs(doubled, x), want, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(outputs(ours, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, model_name, config", CASES, ids=[c[0] for c in CASES])
def test_peft_case(tmp_path, name, model_name, config):
    theirs = peft_adapter(model_name, config, tmp_path / "peft")
    x = MODELS[model_name][1]()
    ours = import_peft(base_model(model_name), tmp_path / "peft").eval()
    assert lora_layers(ours)
    assert not torch.allclose(outputs(ours, x), outputs(base_model(model_name), x))  # it acts
    assert_outputs(ours, theirs, x)
    export_peft(ours, tmp_path / "ours")
    exported = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    original = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(exported) == set(original)
    for key, tensor in original.items():  # the very tensors PEFT wrote
        assert torch.equal(exported[key], tensor), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(base_model(model_name), tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(again, x), outputs(theirs, x), atol=1e-5, rtol=0)
    if "target_parameters" in config:  # the same mechanism as expert weights: a ParamLoRA
        params = {n for n, m in lora_layers(ours).items() if isinstance(m, ParamLoRA)}
        assert params == {f"{p.rpartition('.')[0]}.param_lora.weight"
                          for p in config["target_parameters"]}


def test_target_parameters_on_a_plain_weight_is_the_dense_update(tmp_path):
    """``lin0.weight`` of the parameter MLP (stored ``(in, out)``, used as ``x @ W + b``): PEFT's
    ``W + s * B @ A`` with ``A`` ``(r, 20)`` and ``B`` ``(10, r)``, in the module's own forward."""
    peft_adapter("MlpUsingParameters", {"target_parameters": ["lin0.weight"]}, tmp_path / "peft")
    ours = import_peft(base_model("MlpUsingParameters"), tmp_path / "peft").eval()
    st, base = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), base_model(
        "MlpUsingParameters")
    A, B = st["base_model.model.lin0.lora_A.weight"], st["base_model.model.lin0.lora_B.weight"]
    assert A.shape == (8, 20) and B.shape == (10, 8)
    W = base.lin0.weight + (8 / 8) * B @ A  # lora_alpha 8, r 8
    x = MODELS["MlpUsingParameters"][1]()
    want = F.log_softmax(base.lin1(torch.relu(x @ W + base.lin0.bias)), dim=-1)
    torch.testing.assert_close(outputs(ours, x), want, atol=1e-5, rtol=0)


def test_mha_import_is_the_dense_update_of_both_projections(tmp_path):
    """What our MHA layer computes from PEFT's tensors: attention with ``W + s * B @ A`` on the
    in-projection and on out_proj, each once."""
    theirs = peft_adapter("MHA", {"target_modules": ["mha"], "lora_alpha": 4}, tmp_path / "peft")
    ours = import_peft(base_model("MHA"), tmp_path / "peft")
    st, base, s = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), base_model("MHA"), 0.5
    key = "base_model.model.mha.{}lora_{}.weight"
    w_in = base.mha.in_proj_weight + s * st[key.format("", "B")] @ st[key.format("", "A")]
    w_out = base.mha.out_proj.weight + s * (st[key.format("base_layer.out_proj.", "B")]
                                           @ st[key.format("base_layer.out_proj.", "A")])
    x = MODELS["MHA"][1]()
    with torch.no_grad():
        attended, _ = F.multi_head_attention_forward(
            x, x, x, 10, 2, w_in, base.mha.in_proj_bias, None, None, False, 0.0, w_out,
            base.mha.out_proj.bias, training=False)
        want = F.log_softmax(base.lin0(attended), dim=-1)
    torch.testing.assert_close(outputs(ours, x), want, atol=1e-5, rtol=0)
    assert theirs is not None


# -- conv adapters beyond the zoo: other ranks, an injected model, loralib's layout ---------------
def test_grouped_conv_pads_per_group_to_a_larger_rank(tmp_path):
    """A grouped conv's B reads the rank channels in blocks, one per group: padding to the file's
    rank adds zero channels at the end of every block, and PEFT still gives our outputs."""
    from lora_phi3.layers import Conv2d, Linear
    torch.manual_seed(0)
    model = base_model("Conv2dGroups2")
    model.conv2d = Conv2d.from_conv(model.conv2d, r=2, lora_alpha=4, lora_layout="peft",
                                    merge_weights=False, init_lora_weights=False)
    model.lin0 = Linear.from_linear(model.lin0, r=6, lora_alpha=12, init_lora_weights=False)
    export_peft(model, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    A, B = st["base_model.model.conv2d.lora_A.weight"], st["base_model.model.conv2d.lora_B.weight"]
    assert A.shape == (6, 16, 3, 3) and B.shape == (32, 3, 1, 1)
    assert not A[[1, 2, 4, 5]].any() and not B[:, 1:].any()  # one live channel per group of 3
    x = MODELS["Conv2dGroups2"][1]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: groups > 1 cannot merge
        theirs = peft.PeftModel.from_pretrained(base_model("Conv2dGroups2"), tmp_path / "p").eval()
    torch.testing.assert_close(outputs(theirs, x), outputs(model.eval(), x), atol=1e-5, rtol=0)


def test_peft_conv_adapter_loads_into_an_injected_model_of_higher_rank(tmp_path):
    from lora_phi3 import LoraConfig, inject_lora
    theirs = peft_adapter("Conv3d", {"target_modules": ["conv3d"], "r": 4, "lora_alpha": 8},
                          tmp_path / "peft")
    ours = inject_lora(base_model("Conv3d"), LoraConfig(r=8, lora_alpha=4, target_modules=["conv3d"]))
    import_peft(ours, tmp_path / "peft")
    assert ours.conv3d.lora_A.shape == (8, 5, 3, 3, 3) and not ours.conv3d.lora_A[4:].any()
    x = MODELS["Conv3d"][1]()
    torch.testing.assert_close(outputs(ours.eval(), x), outputs(theirs, x), atol=1e-5, rtol=0)


def test_a_loralib_layout_conv_refuses_peft_tensors(tmp_path):
    from lora_phi3.layers import Conv2d
    peft_adapter("Conv2d", {"target_modules": ["conv2d"]}, tmp_path / "peft")
    model = base_model("Conv2d")
    model.conv2d = Conv2d.from_conv(model.conv2d, r=8)  # loralib's layout, the class default
    before = model.conv2d.lora_A.clone()
    with pytest.raises(ValueError, match=r"conv2d: the model's Conv2d uses lora_layout='loralib'"):
        import_peft(model, tmp_path / "peft")
    assert torch.equal(model.conv2d.lora_A, before)
