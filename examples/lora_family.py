"""The LoRA family on a tiny Phi-3, offline: DoRA, rsLoRA, PiSSA, LoRA+, and several adapters.

Two adapters are trained on one model for a few steps each (a LoRA adapter on the attention
slices with LoRA+ optimizer groups, and a DoRA + rsLoRA adapter on the MLP), then one mixed batch
runs both plus the base model, row by row. Last, a PiSSA adapter is trained on a second copy and
saved for the ORIGINAL base weights, with no conversion step.

    python examples/lora_family.py
"""

import torch
from transformers import Phi3Config, Phi3ForCausalLM

import lora_phi3 as lora

torch.manual_seed(0)
config = Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)
model = Phi3ForCausalLM(config)
batch = torch.randint(1, 64, (4, 12))


def train(steps: int, groups) -> float:
    optimizer = torch.optim.AdamW(groups)
    model.train()
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


# 1. LoRA on q and v (slices of the fused qkv_proj), trained with LoRA+ groups (B at 16x lr).
lora.inject_lora(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                 adapter_name="attn")
print("attn (LoRA + LoRA+) loss:", round(train(10, lora.lora_plus_param_groups(model, lr=1e-3)), 3))

# 2. A second adapter: DoRA with rank-stabilised scaling on the MLP.
lora.add_adapter(model, lora.LoraConfig(r=8, lora_alpha=8, target_modules=["gate_up_proj", "down_proj"],
                                        use_dora=True, use_rslora=True), "mlp")
lora.set_adapter(model, "mlp")
print("mlp (DoRA + rsLoRA) loss:", round(train(10, [{"params": [p for p in model.parameters()
                                                                 if p.requires_grad], "lr": 1e-3}]), 3))

# 3. One batch, three behaviours: row 0 the attention adapter, row 1 the MLP one, row 2 the base.
model.eval()
with torch.no_grad():
    singles = {}
    for name in ("attn", "mlp"):
        lora.set_adapter(model, name)
        singles[name] = model(batch[:3]).logits
    with lora.disable_lora(model):
        singles[None] = model(batch[:3]).logits
    with lora.mixed_batch(model, ["attn", "mlp", None]):
        mixed = model(batch[:3]).logits
for i, name in enumerate(["attn", "mlp", None]):
    assert torch.allclose(mixed[i], singles[name][i], atol=1e-5), name
print("mixed batch rows match single-adapter runs")

# 4. Save each adapter as a file of its own.
lora.save_adapter(model, "attn_adapter", adapter_name="attn")
lora.save_adapter(model, "mlp_adapter", adapter_name="mlp")

# 5. PiSSA: the adapter starts from the top singular vectors of W and the base keeps the residual.
#    Saving writes the equivalent adapter for the ORIGINAL weights (rank 2r), so it loads into a
#    fresh copy of the pretrained model with no conversion step.
torch.manual_seed(0)
pissa = Phi3ForCausalLM(config)  # the same "pretrained" weights as `model` had at the start
lora.inject_lora(pissa, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights="pissa"))
model = pissa
print("PiSSA loss:", round(train(10, [{"params": [p for p in pissa.parameters() if p.requires_grad],
                                       "lr": 1e-3}]), 3))
pissa.eval()
lora.save_adapter(pissa, "pissa_adapter")
torch.manual_seed(0)
fresh = Phi3ForCausalLM(config).eval()
lora.load_adapter(fresh, "pissa_adapter")
with torch.no_grad():
    assert torch.allclose(fresh(batch).logits, pissa(batch).logits, atol=1e-4)
print("the PiSSA adapter reproduces the tuned model on the original base")
