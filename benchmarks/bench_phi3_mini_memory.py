"""Device check: a random-init model with Phi-3-mini's exact shapes, the real recipe's settings.

Measures weights memory, LoRA parameter count, peak memory and tokens/s of train_step with
batch 4 x 2048 packed tokens, bf16 base + fp32 adapters, with and without gradient checkpointing.
SCALE=small shrinks it for a CPU dry run.
"""
import json, os, time
import torch
from transformers import Phi3Config, Phi3ForCausalLM
from lora_phi3.config import LoraConfig
from lora_phi3.inject.injector import inject_lora
from lora_phi3.finetune.train import CausalLMLoss, train_step, make_optimizer, make_scheduler, enable_gradient_checkpointing
from lora_phi3.finetune.recipe import TrainingConfig
from lora_phi3.finetune.packing import collate, pack_examples
from lora_phi3.finetune.distributed import DistState

small = os.environ.get("SCALE") == "small"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
shape = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)
if small:
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
T = 256 if small else 2048
cfg = Phi3Config(vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096,
                 sliding_window=2047, rms_norm_eps=1e-5, pad_token_id=32000, eos_token_id=32000,
                 bos_token_id=1, tie_word_embeddings=False, **shape)
cfg._attn_implementation = "sdpa"
results = {}
for gc in (True, False):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = Phi3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    n_base = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize(); weights = torch.cuda.memory_allocated()
    else:
        weights = n_base * 2
    inject_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    if gc:
        enable_gradient_checkpointing(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    examples = []
    while sum(len(e["input_ids"]) for e in examples) < 6 * T:
        n = int(torch.randint(T // 10, T // 3, (1,), generator=g))
        ids = torch.randint(0, 32000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    rows = [r for r in pack_examples(examples, T)][:4]
    tcfg = TrainingConfig(learning_rate=2e-4, warmup_ratio=0.0)
    opt = make_optimizer(params, tcfg); sched = make_scheduler(opt, tcfg, 100)
    core = CausalLMLoss(model)
    batch = collate(rows, 32000, packing=True, mask_dtype=torch.bfloat16, sliding_window=2047)
    ntok = sum(len(r["input_ids"]) for r in rows)
    dist = DistState(device=dev)
    losses = []
    for i in range(7):
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = train_step(core, [batch], opt, sched, params, dist=dist, max_grad_norm=1.0, bf16=True)
        losses.append(round(out["loss"], 4))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = 0
    dt = (time.perf_counter() - t0) / 5
    results["gradient_checkpointing" if gc else "no_checkpointing"] = dict(
        base_params=n_base, lora_params=n_lora, weights_bytes=weights, peak_bytes=peak,
        seconds_per_step=round(dt, 4), tokens_per_step=ntok, tokens_per_second=round(ntok / dt),
        losses=losses, lora_dtype=str(params[0].dtype))
    print(json.dumps(results, indent=1), flush=True)
    del model, opt, sched, core, params, batch
    if dev.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
out = os.environ.get("OUT")
if out:
    json.dump(results, open(os.path.join(out, "phi3_mini_memory.json"), "w"), indent=1)
