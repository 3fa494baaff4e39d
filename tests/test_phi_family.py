"""Every Phi checkpoint of transformers, at reduced width: inject (default and per-slice targets),
a train step, merge, ``merge_and_unload`` -> ``save_pretrained`` -> ``from_pretrained``, our
adapter files, and PEFT export and import, each against a dense reference or PEFT itself.

Each tiny config keeps what makes its checkpoint different (docs/models.md has the real shapes):
the GQA ratio (Phi-3-medium and Phi-4: 40 / 10 heads -> 4 / 1), Phi-4-mini's head_dim 128 that is
not ``hidden_size // heads``, its partial rotary factor 0.75 and tied embeddings, the vocabularies
scaled by 1/256, the 128k models' longrope (with inputs longer than the original context, so the
long factors are used), and Phi-3.5-MoE's separate q/k/v with biases, LayerNorm, a router and
experts. Phi-3.5-MoE's experts are 3-D parameters, not modules: their adapters
(``target_parameters``, one A/B pair per expert) get the same checks at the end, against a dense
reference written expert by expert and against PEFT both ways. Each recipe in ``recipes/`` also
trains its model's tiny shape through the whole job. Loading a Phi-3.5-MoE checkpoint for QLoRA is
a strict xfail (a library gap, see its reason).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM, PhimoeConfig,
                          PhimoeForCausalLM)

from lora_phi3 import (LoraConfig, LoRALayer, MergedLinear, export_peft, get_lora_config,
                       import_peft, inject_lora, load_adapter, load_quantized_model, lora_modules,
                       merge_and_unload, merge_lora, save_adapter, unmerge_lora)
from lora_phi3.finetune import FinetuneJob, load_recipe
from lora_phi3.layers import LoRAExperts, ParamLoRA
from runs import bundled_subset
from tiny import randomize_lora

peft = pytest.importorskip("peft")

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LONGROPE = dict(  # rotary dims 16 -> 8 factors; original context 8, so 12-token inputs use long
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                     "short_factor": [1.0 + 0.05 * i for i in range(8)],
                     "long_factor": [1.0 + 0.5 * i for i in range(8)]},
    original_max_position_embeddings=8, max_position_embeddings=64)

#: name -> (model class, config class, tiny config). Real shapes in the comments.
SHAPES: dict[str, tuple[type, type, dict]] = {
    # Phi-3-mini-4k: 32 x 3072, ffn 8192, 32 / 32 heads (no GQA), vocab 32064
    "phi3-mini-4k": (Phi3ForCausalLM, Phi3Config, dict(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4)),
    # Phi-3-mini-128k and Phi-3.5-mini: the same, with longrope
    "phi3.5-mini": (Phi3ForCausalLM, Phi3Config, dict(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, **_LONGROPE)),
    # Phi-3-medium: 40 x 5120, ffn 17920, 40 / 10 heads
    "phi3-medium": (Phi3ForCausalLM, Phi3Config, dict(
        vocab_size=128, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1)),
    # Phi-4 (14B): Phi-3-medium's shape, vocab 100352 (/256 = 392)
    "phi4": (Phi3ForCausalLM, Phi3Config, dict(
        vocab_size=392, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1)),
    # Phi-4-mini: 32 x 3072, ffn 8192, 24 / 8 heads of head_dim 128, partial rotary 0.75,
    # tied embeddings, vocab 200064 (/256 = 782). Here head_dim 128 != hidden 96 // 3 heads.
    "phi4-mini": (Phi3ForCausalLM, Phi3Config, dict(
        vocab_size=782, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=128, partial_rotary_factor=0.75,
        tie_word_embeddings=True)),
    # Phi-3.5-MoE: 32 x 4096, 16 experts (top 2, ffn 6400), 32 / 8 heads, separate q/k/v with
    # biases, LayerNorm, a top-k router, an LM head bias, longrope
    "phi3.5-moe": (PhimoeForCausalLM, PhimoeConfig, dict(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        attention_bias=True, lm_head_bias=True, router_jitter_noise=0.0, input_jitter_noise=0.0,
        **{**_LONGROPE, "rope_parameters": {**_LONGROPE["rope_parameters"],  # the card's mscales
                                            "short_mscale": 1.243, "long_mscale": 1.243}})),
}
NAMES = list(SHAPES)
MOE_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: Per-slice targets: on Phi-3 the q, v and up slices of the fused projections; on Phi-3.5-MoE,
#: whose q/k/v are separate modules already, q and v.
PER_SLICE = {"phi3": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
             "phimoe": ["q_proj", "v_proj"]}
#: PEFT's own target names for a PEFT-trained adapter.
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "phimoe": MOE_ATTENTION}
X = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def base(name: str, seed: int = 0) -> nn.Module:
    """The tiny model of ``name``; the same weights for the same seed."""
    model_cls, config_cls, fields = SHAPES[name]
    torch.manual_seed(seed)
    config = config_cls(**_IDS, **fields)
    config._attn_implementation = "eager"  # exact, and the same in every model compared
    return model_cls(config).eval()


def kind(name: str) -> str:
    return "phimoe" if SHAPES[name][0] is PhimoeForCausalLM else "phi3"


def default_targets(name: str) -> list[str] | None:
    """What a recipe uses: Phi-3's four fused projections (None: the injector's default), and
    the attention projections of Phi-3.5-MoE (its experts take ``target_parameters``, below)."""
    return None if kind(name) == "phi3" else MOE_ATTENTION


def adapted(name: str, targets, seed: int = 1, **kw) -> tuple[nn.Module, nn.Module]:
    """(the base, an adapted copy with non-zero A and B)."""
    plain = base(name)
    model = copy.deepcopy(plain)
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **kw}))
    return plain, randomize_lora(model, seed)


def logits(model: nn.Module, ids: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def dense_reference(plain: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the base whose adapted weights are ``W + s * B_i @ A_i``, written slice by slice."""
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for module_name, m in lora_modules(model).items():
            W, s = ref.get_submodule(module_name).weight, m.scaling
            for sl in m.iter_slices():  # one slice for a plain Linear
                W[sl.out_rows] += s * m.lora_B[sl.b_rows] @ m.lora_A[sl.a_rows]
    return ref


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# -- the shapes are what they claim ------------------------------------------------------------
def test_the_tiny_configs_keep_the_structural_features():
    medium = base("phi3-medium").config
    assert medium.num_attention_heads // medium.num_key_value_heads == 40 // 10
    mini4 = base("phi4-mini")
    cfg = mini4.config
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.75
    assert mini4.model.rotary_emb.inv_freq.numel() == int(128 * 0.75) // 2
    assert mini4.lm_head.weight is mini4.model.embed_tokens.weight
    qkv = mini4.model.layers[0].self_attn.qkv_proj
    assert qkv.out_features == (3 + 2 * 1) * 128 and qkv.in_features == 96
    assert base("phi3.5-mini").config.rope_parameters["rope_type"] == "longrope"
    assert X.shape[1] > base("phi3.5-mini").config.original_max_position_embeddings
    moe = base("phi3.5-moe").model.layers[0]
    assert isinstance(moe.input_layernorm, nn.LayerNorm)
    assert moe.self_attn.q_proj.bias is not None and moe.mlp.experts.gate_up_proj.dim() == 3


# -- inject ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_inject_default_and_per_slice_targets_against_a_dense_reference(name):
    cfg = base(name).config
    for targets in (default_targets(name), PER_SLICE[kind(name)]):
        plain, model = adapted(name, targets)
        layers = lora_modules(model)
        assert layers and all(n.startswith("model.layers.") for n in layers)
        close(logits(model), logits(dense_reference(plain, model)))
        with torch.no_grad():  # B = 0 again: the adapted model computes the base exactly
            for m in layers.values():
                m.lora_B.zero_()
        close(logits(model), logits(plain))
    if kind(name) == "phi3":  # the per-slice layout: q, k, v rows from the config's head_dim
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        qkv = layers["model.layers.0.self_attn.qkv_proj"]
        assert isinstance(qkv, MergedLinear)
        assert qkv.lora_B.shape[0] == (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim
        gate_up = layers["model.layers.0.mlp.gate_up_proj"]
        assert gate_up.lora_B.shape[0] == cfg.intermediate_size  # the up slice only
    else:
        assert sorted({n.rpartition(".")[2] for n in layers}) == ["q_proj", "v_proj"]


def test_all_linear_never_adapts_the_moe_router_or_the_lm_head():
    """Phi-3.5-MoE's router is an ``nn.Linear`` subclass with its own forward (it returns routing
    weights): ``all-linear`` must leave it, and the experts are parameters, not modules."""
    plain, model = adapted("phi3.5-moe", "all-linear")
    names = {n.rpartition(".")[2] for n in lora_modules(model)}
    assert names == set(MOE_ATTENTION)
    assert type(model.model.layers[0].mlp.router).__name__ == "PhimoeTopKRouter"
    close(logits(model), logits(dense_reference(plain, model)))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.router' \(PhimoeTopKRouter\), which "
                                         r"cannot take an adapter: .*defines its own forward"):
        inject_lora(base("phi3.5-moe"), LoraConfig(target_modules=["router"]))


@pytest.mark.parametrize("name", ["phi4-mini", "phi3-medium"])
def test_all_linear_on_phi3_takes_the_fused_projections_and_keeps_the_tie(name):
    _, model = adapted(name, "all-linear")
    assert {n.rpartition(".")[2] for n in lora_modules(model)} == set(PEFT_TARGETS["phi3"])
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


# -- train -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_train_step_moves_only_the_adapters_and_lowers_the_loss(name):
    model = base(name)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=default_targets(name)))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n)
                             for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=X, labels=X).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        for layer in lora_modules(model).values():  # B starts at 0: only B has a gradient at first
            assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


# -- merge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_merge_unmerge_equal_the_adapted_model_and_the_dense_reference(name):
    plain, model = adapted(name, PER_SLICE[kind(name)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = logits(model)
    close(want, logits(dense_reference(plain, model)))
    merge_lora(model)
    merge_lora(model)  # idempotent
    close(logits(model), want)
    unmerge_lora(model)
    close(logits(model), want)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_merge_and_unload_save_pretrained_from_pretrained(name, tmp_path):
    plain, model = adapted(name, default_targets(name))
    want = logits(model)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    assert type(merged) is SHAPES[name][0]
    close(logits(merged), want)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is SHAPES[name][0]
    close(logits(loaded), want)
    vanilla = copy.deepcopy(plain)  # the merged weights load strictly into a vanilla model
    vanilla.load_state_dict(merged.state_dict(), strict=True)
    close(logits(vanilla), want)
    if plain.config.tie_word_embeddings:  # the tie survives the merge and the round trip
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        assert loaded.config.tie_word_embeddings
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# -- adapter files ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_adapter_load_adapter_into_a_bare_model(name, tmp_path):
    _, model = adapted(name, PER_SLICE[kind(name)])
    save_adapter(model, tmp_path / "a")
    again = load_adapter(base(name), tmp_path / "a")
    close(logits(again), logits(model))
    assert get_lora_config(again) == get_lora_config(model)


# -- PEFT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_peft_export_loads_in_peft_with_the_same_logits(name, tmp_path):
    for i, targets in enumerate((default_targets(name), PER_SLICE[kind(name)])):
        plain, ours = adapted(name, targets)
        export_peft(ours, tmp_path / f"p{i}")
        theirs = peft.PeftModel.from_pretrained(base(name), tmp_path / f"p{i}").eval()
        close(logits(theirs), logits(ours))
        close(logits(theirs), logits(dense_reference(plain, ours)))
        # and back: the export imports into a bare model as the same adapter
        close(logits(import_peft(base(name), tmp_path / f"p{i}")), logits(ours))


@pytest.mark.parametrize("name", NAMES)
def test_a_peft_trained_adapter_imports_with_peft_logits(name, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[kind(name)],
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base(name), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero A and B
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = import_peft(base(name), tmp_path / "peft")
    close(logits(ours), logits(theirs.eval()))
    # the same adapter imported into a per-slice model of ours (unmerge -> load -> merge)
    _, per_slice = adapted(name, PEFT_TARGETS[kind(name)], seed=9)
    merge_lora(per_slice)
    import_peft(per_slice, tmp_path / "peft")
    close(logits(per_slice), logits(theirs))


# -- Phi-3.5-MoE's experts: target_parameters ---------------------------------------------------
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def expert_adapted(targets=None, seed: int = 1, **kw) -> tuple[nn.Module, nn.Module]:
    """(the Phi-3.5-MoE base, a copy with expert adapters (and ``targets``), non-zero A and B)."""
    plain = base("phi3.5-moe")
    model = copy.deepcopy(plain)
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets,
                                     "target_parameters": EXPERTS, **kw}))
    return plain, randomize_lora(model, seed)


def dense_expert_reference(plain: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the base with ``W_e + s * B_e @ A_e`` written into every adapted expert, expert by
    expert (and ``W + s * B @ A`` into every adapted module)."""
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            if isinstance(m, ParamLoRA):
                host, _, parameter = name.partition(".param_lora.")
                W = getattr(ref.get_submodule(host), parameter)  # (E, out, in)
                for e in range(W.shape[0]):
                    W[e] += m.scaling * m.lora_B[:, :, e] @ m.lora_A[:, e]
            else:
                ref.get_submodule(name).weight += m.scaling * m.lora_B @ m.lora_A
    return ref


def test_expert_adapters_against_a_dense_reference():
    cfg = base("phi3.5-moe").config
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for targets in (None, MOE_ATTENTION):
        plain, model = expert_adapted(targets)
        experts = model.model.layers[0].mlp.experts
        assert isinstance(experts, LoRAExperts)
        gate_up, down = experts.param_lora["gate_up_proj"], experts.param_lora["down_proj"]
        assert gate_up.lora_A.shape == (4, E, H) and gate_up.lora_B.shape == (2 * I, 4, E)
        assert down.lora_A.shape == (4, E, I) and down.lora_B.shape == (H, 4, E)
        assert set(plain.state_dict()) < set(model.state_dict())  # the base keys are kept
        close(logits(model), logits(dense_expert_reference(plain, model)))
        with torch.no_grad():  # B = 0: the base model, bit for bit
            for m in lora_modules(model).values():
                m.lora_B.zero_()
        assert torch.equal(logits(model), logits(plain))


def test_all_linear_with_expert_adapters_never_adapts_the_router():
    plain, model = expert_adapted("all-linear")
    names = {n.rpartition(".")[2] for n in lora_modules(model)}
    assert names == set(MOE_ATTENTION) | {"gate_up_proj", "down_proj"}
    router = model.model.layers[0].mlp.router
    assert type(router).__name__ == "PhimoeTopKRouter" and not router.weight.requires_grad
    close(logits(model), logits(dense_expert_reference(plain, model)))


def test_a_train_step_moves_only_the_expert_adapters():
    model = base("phi3.5-moe")
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".param_lora." in n and n.endswith(("lora_A", "lora_B"))
                             for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=X, labels=X).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        for layer in lora_modules(model).values():
            assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_expert_merge_unmerge_and_merge_and_unload(tmp_path):
    plain, model = expert_adapted(MOE_ATTENTION)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = logits(model)
    merge_lora(model)
    close(logits(model), want)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit for bit
    merged = merge_and_unload(model)
    assert type(merged.model.layers[0].mlp.experts).__name__ == "PhimoeExperts"
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    close(logits(merged), want)
    vanilla = copy.deepcopy(plain)
    vanilla.load_state_dict(merged.state_dict(), strict=True)
    close(logits(vanilla), want)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    close(logits(loaded), want)


def test_expert_adapter_files_load_into_a_bare_model(tmp_path):
    _, model = expert_adapted(MOE_ATTENTION)
    save_adapter(model, tmp_path / "a")
    again = load_adapter(base("phi3.5-moe"), tmp_path / "a")
    close(logits(again), logits(model))
    assert get_lora_config(again) == get_lora_config(model)


def test_expert_export_loads_in_peft_with_the_same_logits(tmp_path):
    from safetensors.torch import load_file
    for i, targets in enumerate((None, MOE_ATTENTION)):
        plain, ours = expert_adapted(targets)
        export_peft(ours, tmp_path / f"p{i}")
        st = load_file(str(tmp_path / f"p{i}" / "adapter_model.safetensors"))
        key = "base_model.model.model.layers.0.mlp.experts.{}lora_{}.weight"
        cfg = ours.config
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        # PEFT nests one wrapper per parameter: gate_up_proj (registered first) is the inner one
        assert st[key.format("base_layer.", "A")].shape == (4 * E, H)
        assert st[key.format("base_layer.", "B")].shape == (2 * I, 4 * E)
        assert st[key.format("", "A")].shape == (4 * E, I) and st[key.format("", "B")].shape == (H, 4 * E)
        theirs = peft.PeftModel.from_pretrained(base("phi3.5-moe"), tmp_path / f"p{i}").eval()
        close(logits(theirs), logits(ours))
        close(logits(theirs), logits(dense_expert_reference(plain, ours)))
        close(logits(import_peft(base("phi3.5-moe"), tmp_path / f"p{i}")), logits(ours))


def test_a_peft_trained_expert_adapter_imports_with_peft_logits(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MOE_ATTENTION,
                             target_parameters=EXPERTS, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base("phi3.5-moe"), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero A and B
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()
    ours = import_peft(base("phi3.5-moe"), tmp_path / "peft")
    assert isinstance(ours.model.layers[1].mlp.experts, LoRAExperts)
    close(logits(ours), logits(theirs))
    # into an injected model of ours with a higher rank and alpha: padded, the scaling folded in
    _, wider = expert_adapted(MOE_ATTENTION, seed=9, r=8, lora_alpha=4)
    merge_lora(wider)
    import_peft(wider, tmp_path / "peft")
    close(logits(wider), logits(theirs))


# -- QLoRA (not in the family's list of checks; recorded because the MoE recipe would need it) ---
@pytest.mark.xfail(strict=True, reason=(
    "load_quantized_model (lora_phi3/inject/qlora_model.py) reads checkpoint tensors by name, "
    "without transformers' weight conversion: a Phimoe checkpoint stores the router as "
    "block_sparse_moe.gate and each expert as block_sparse_moe.experts.N.w1/w2/w3, which "
    "transformers 5 renames and fuses into mlp.router and mlp.experts.gate_up_proj/down_proj on "
    "load, so the load fails with 'lacks [...mlp.router.weight, ...mlp.experts.gate_up_proj...]'"))
def test_qlora_loads_a_phi35_moe_checkpoint(tmp_path):
    plain = base("phi3.5-moe")
    plain.save_pretrained(tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=MOE_ATTENTION, quantize_base="nf4")
    model = load_quantized_model(tmp_path, config, dtype=torch.float32, attn_implementation="eager")
    got, want = model.model.layers[0].mlp, plain.model.layers[0].mlp
    assert torch.equal(got.router.weight, want.router.weight)
    assert torch.equal(got.experts.gate_up_proj, want.experts.gate_up_proj)


# -- the recipes -------------------------------------------------------------------------------
#: recipe file -> the tiny shape of its model
RECIPES = {"phi3-mini.yaml": "phi3-mini-4k", "phi3-mini-128k.yaml": "phi3.5-mini",
           "phi3.5-mini.yaml": "phi3.5-mini", "phi3-medium.yaml": "phi3-medium",
           "phi4.yaml": "phi4", "phi4-mini.yaml": "phi4-mini", "phi3.5-moe.yaml": "phi3.5-moe"}
REPO = Path(__file__).resolve().parents[1]


def test_there_is_one_recipe_per_model_and_docs_models_lists_each_command():
    assert sorted(p.name for p in (REPO / "recipes").glob("*.yaml")) == sorted(RECIPES)
    table = (REPO / "docs" / "models.md").read_text()
    for name in RECIPES:
        assert f"lora-phi3 finetune --config recipes/{name}" in table, name
        assert "huggingface.co/microsoft/" in (REPO / "recipes" / name).read_text(), name


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_trains_its_model_shape_through_the_job(recipe, tok, tmp_path):
    """``lora-phi3 finetune --config recipes/<model>.yaml`` on a local checkpoint of the model's tiny
    shape (the embedded tokenizer's vocabulary): the recipe's targets inject, two steps train, and
    the model is loaded as the recipe's model_kwargs say."""
    name = RECIPES[recipe]
    model_cls, config_cls, fields = SHAPES[name]
    torch.manual_seed(0)
    config = config_cls(**{**fields, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                           "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id})
    model_cls(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    r = load_recipe(REPO / "recipes" / recipe, overrides={
        "model": str(tmp_path / "model"), "data": bundled_subset(data, 64, 4),
        "output_dir": str(tmp_path / "out"),
        "training": {"max_steps": 2, "batch_size": 2, "bf16": False, "max_seq_length": 128,
                     "eval_steps": 0, "save_steps": 0}})
    job = FinetuneJob(r, progress=False, device="cpu")
    summary = job.run()
    assert summary["steps"] == 2 and math.isfinite(summary["final_eval_loss"])
    cfg = job.model.config
    assert cfg._attn_implementation == "sdpa" and cfg.use_cache is False
    adapted_names = {n.rpartition(".")[2] for n in lora_modules(job.model)}
    assert adapted_names == set(PEFT_TARGETS[kind(name)])
    assert any(p.abs().sum() > 0 for n, p in job.model.named_parameters() if "lora_B" in n)
    if cfg.tie_word_embeddings:
        assert job.model.lm_head.weight is job.model.model.embed_tokens.weight
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
