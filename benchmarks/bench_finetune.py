"""End to end: lora_phi3's ``finetune()`` against transformers + PEFT + TRL ``SFTTrainer``.

Every trainer fine-tunes LoRA adapters on the embedded tiny Phi-3 (``load_model(None)``) with the
bundled chat data (``load_conversations(None)``), tokenised once by ``lora_phi3.finetune.data`` so both get
the very same ``input_ids`` and assistant-only labels. Same LoRA (r, alpha, dropout on
qkv_proj/o_proj/gate_up_proj/down_proj), sequence length, batch size, step count, learning rate,
cosine schedule with warm-up, max grad norm, fp32, no gradient checkpointing. Runs (``--runs``):

- ``ours``: ``lora_phi3.finetune.job.finetune(recipe)``, packing on (block-diagonal attention mask);
- ``trl``: ``SFTTrainer(packing=True)`` on a ``peft.get_peft_model`` model: TRL's default "bfd"
  packing, which is padding-free (a batch is one flattened sequence with restarting
  ``position_ids``); leak-freedom is checked, not assumed (see ``leak_check``);
- ``ours-padded``, ``trl-padded``: the same with packing off (each batch padded to its longest);
- ``hf-padded``: transformers ``Trainer`` + PEFT with padded batches, the reference without TRL;
- ``ours-full``, ``ours-padded-full``: an ablation of ours: ``CausalLMLoss(skip_unlabeled=False)``,
  so the last decoder layer's ``o_proj`` and MLP also run on positions without a label.

Method (see docs/benchmarks.md, sections 4 and 5):

- every run is a fresh child process; the runs are repeated ``--rounds`` times in rotating order
  so slow drifts of a shared machine hit all of them alike; the table gives the median and the
  min-max over rounds;
- tokens/s counts real (non-pad) tokens fed to the model, prompt tokens included, the same
  definition for all. "step" time is from the batch being ready to after the optimizer step
  (ours: each ``train_step`` call; Trainer: ``on_step_begin`` to ``on_step_end``); "loop" time
  runs from the end of the last warm-up step to the end of the last step, so it also counts batch
  building and each trainer's per-step bookkeeping. The first ``--warmup`` steps are left out.
  The clock is wall time, or with ``--threads 1 --clock thread`` the CPU time of the main thread
  (which then does all the work), which other processes on a shared machine barely disturb;
- memory is the process RSS (CPU). After imports and a warm-up build of the tokenizer, data and
  model (then freed) the child reads its resting RSS (VmRSS) and resets the kernel's peak-RSS
  counter (``/proc/self/clear_refs``); "peak job" is the peak (VmHWM, the counter behind
  ``ru_maxrss``) at the end of the last step minus that baseline: everything the trainer
  allocates from the recipe to the last step. "peak loop" is reset again at the first step and
  taken relative to the RSS then: activations, gradients, optimizer state. Without clear_refs
  (not Linux) ``ru_maxrss`` minus the baseline is used and "peak loop" is left out.

Phi-3-mini width (``--width phi3-mini``, issue 11): the same comparison on a randomly initialised
2-layer Phi-3 of Phi-3-mini's width (hidden 3072, intermediate 8192, 32 heads and 32 KV heads, vocab
32064; 423 M parameters, 1.69 GB in fp32). The embedded tokenizer's ~1k vocabulary cannot feed
that, so the data is synthetic and tokenizer-independent (``synthetic_chat_rows``): Phi-3-chat-shaped rows
``<|user|>\\n PROMPT <|end|>\\n<|assistant|>\\n ANSWER <|end|>\\n<|endoftext|>`` with Phi-3's special ids,
random content ids, lengths uniform in [384, 512] and a prompt share uniform in [0.60, 0.70] of each
row; labels are on the answer, its ``<|end|>`` and the eos only (what ``tokenize_dataset`` trains).
Every trainer gets these very rows (ours through a patched ``prepare_data``, which packs them when
packing is on), pad id 0, lr 2e-4 (the Phi-3 recipe's), batch 2, 512 tokens, 4 steps of which 1 is
warm-up, 2 rounds (each default can be overridden). A step takes 12-20 s of one core here.

    python benchmarks/bench_finetune.py                   # ours vs TRL, 30 steps, 3 rounds
    python benchmarks/bench_finetune.py --quick           # smoke run
    python benchmarks/bench_finetune.py --runs ours,trl,ours-padded,trl-padded,hf-padded
    python benchmarks/bench_finetune.py --width phi3-mini --threads 1 --clock thread \
        --runs ours,trl,ours-padded,trl-padded,hf-padded
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 30
WARMUP = 3             # steps left out of the timings
ROUNDS = 3
BATCH_SIZE = 8
SEQ_LEN = 256
LEARNING_RATE = 5e-3   # the embedded demo's (lora_phi3.finetune.recipe.DEMO_TRAINING)
WARMUP_RATIO = 0.05
MAX_GRAD_NORM = 1.0
R, ALPHA, DROPOUT = 16, 32.0, 0.05
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SEED = 0
CHILD_TIMEOUT_S = 1200
RUNS = {  # name -> (trainer, packing)
    "ours": ("ours", True), "ours-padded": ("ours", False),
    "trl": ("trl", True), "trl-padded": ("trl", False), "hf-padded": ("hf", False),
    # ablation: ours with the last decoder layer on every position (CausalLMLoss skip_unlabeled off)
    "ours-full": ("ours", True), "ours-padded-full": ("ours", False),
}
NEEDS = {"ours": (), "trl": ("peft", "trl", "datasets"), "hf": ("peft",)}

# -- Phi-3-mini width (issue 11) ---------------------------------------------------------------------
#: ``Phi3Config`` fields of the wide model: Phi-3-mini's width, 2 layers, Phi-3's init scale.
PHI3_MINI_WIDTH = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "num_hidden_layers": 2, "initializer_range": 0.02}
PHI3_VOCAB = 32064
#: Defaults of the wide mode (a step costs 12-20 s of one core at this width).
WIDE_DEFAULTS = {"steps": 4, "warmup": 1, "rounds": 2, "batch_size": 2, "seq_len": 512, "lr": 2e-4}
DEMO_DEFAULTS = {"steps": STEPS, "warmup": WARMUP, "rounds": ROUNDS, "batch_size": BATCH_SIZE,
                 "seq_len": SEQ_LEN, "lr": LEARNING_RATE}
WIDE_LENGTHS = (384, 512)       # row length, uniform (clipped to --seq-len)
WIDE_PROMPT_SHARE = (0.60, 0.70)  # share of each row's tokens without a label, uniform
#: Phi-3 tokenizer ids: <|endoftext|> (eos), <|assistant|>, <|end|>, <|user|>, "\n" (<0x0A>).
EOS_ID, ASSISTANT_ID, END_ID, USER_ID, NEWLINE_ID = 32000, 32001, 32007, 32010, 13
WIDE_PAD_ID = 0  # the embedded tokenizer's pad id, which ours and TRL take from it


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- memory: the kernel's view of this process ---------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v // 1024 if sys.platform == "darwin" else v  # bytes on macOS, KiB on Linux


def rss_kib() -> int:
    v = _status_kib("VmRSS")
    return v if v is not None else _maxrss_kib()


def peak_kib() -> int:
    v = _status_kib("VmHWM")
    return v if v is not None else _maxrss_kib()


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Probe:
    """Per-step timestamps, the peak-RSS readings, and the real tokens of each batch (FIFO)."""

    def __init__(self, can_reset: bool, clock=time.perf_counter) -> None:
        self.can_reset = can_reset
        self.clock = clock
        self.begin: list[float] = []
        self.end: list[float] = []
        self.batch_tokens: list[int] = []
        self.loop_rss = self.job_peak_before_loop = self.peak_at_end = None

    def step_begin(self) -> None:
        if not self.begin:
            self.job_peak_before_loop = peak_kib()
            self.loop_rss = rss_kib()
            if self.can_reset:
                reset_peak()
        self.begin.append(self.clock())

    def step_end(self) -> None:
        self.end.append(self.clock())
        self.peak_at_end = peak_kib()


# -- the trainers (run in the child) --------------------------------------------------------------
def _tokenized(tokenizer, cfg: dict) -> list[dict]:
    from lora_phi3.finetune.data import load_conversations, tokenize_dataset
    train, _, _ = load_conversations(None)
    return tokenize_dataset(tokenizer, train, cfg["seq_len"])


def synthetic_chat_rows(n: int, seq_len: int, seed: int = SEED, vocab: int = PHI3_VOCAB,
                        lengths: tuple[int, int] = WIDE_LENGTHS,
                        prompt_share: tuple[float, float] = WIDE_PROMPT_SHARE) -> list[dict]:
    """``n`` Phi-3-chat-shaped rows ``{"input_ids", "labels"}`` of random content, from ``seed``.

    A row is ``<|user|>\\n P <|end|>\\n <|assistant|>\\n A <|end|>\\n <|endoftext|>``; its length is
    uniform in ``lengths`` (at most ``seq_len``), and the share of its tokens without a label
    (prompt and chat markup) uniform in ``prompt_share``. Labels are on ``A``, its ``<|end|>`` and
    the eos, as ``lora_phi3.finetune.data.tokenize_conversation`` labels an assistant turn.
    """
    import numpy as np
    rng = np.random.default_rng([seed, 11])
    lo, hi = min(lengths[0], seq_len), min(lengths[1], seq_len)
    if lo < 16:
        raise ValueError(f"rows need at least 16 tokens, got lengths {lo}..{hi}")
    rows = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        labeled = max(3, round(length * (1.0 - rng.uniform(*prompt_share))))  # answer + end + eos
        a = labeled - 2
        p = length - 9 - a
        if p < 1:
            raise ValueError(f"no room for a prompt in a row of {length} tokens")
        prompt = rng.integers(3, EOS_ID, p).tolist()  # ids below the special tokens
        answer = rng.integers(3, EOS_ID, a).tolist()
        head = [USER_ID, NEWLINE_ID, *prompt, END_ID, NEWLINE_ID, ASSISTANT_ID, NEWLINE_ID]
        ids = head + answer + [END_ID, NEWLINE_ID, EOS_ID]
        labels = [-100] * len(head) + answer + [END_ID, -100, EOS_ID]
        assert len(ids) == len(labels) == length and max(ids) < vocab
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _examples(tokenizer, cfg: dict) -> list[dict]:
    """The training examples every trainer gets (unpacked)."""
    if cfg["width"] == "demo":
        return _tokenized(tokenizer, cfg)
    return synthetic_chat_rows(cfg["steps"] * cfg["batch_size"], cfg["seq_len"])


#: What the wide model shares with Phi-3-mini-4k-instruct's config besides the width
#: (``sliding_window`` None: Phi-3-mini's 2047 exceeds every row here anyway).
WIDE_CONFIG = {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
               "pad_token_id": EOS_ID, "eos_token_id": EOS_ID, "bos_token_id": 1}
#: A shrunk member of the same family, for the warm-up build and the leak check.
WIDE_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 4}


def _wide_model(cfg: dict, dtype=None, **shrink):
    """The Phi-3-mini-width ``Phi3ForCausalLM``: fixed seed, SDPA, eval mode, fp32 unless ``dtype``.

    Built from ``Phi3Config`` directly (random weights, no download, no tokenizer).
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM
    config = Phi3Config(vocab_size=PHI3_VOCAB, **{**WIDE_CONFIG, **cfg["model"], **shrink})
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Phi3ForCausalLM(config)
    return model.to(dtype or torch.float32).eval()


def _patch_wide(ft, cfg: dict) -> None:
    """Make ``finetune`` build the wide model and train on the synthetic rows (ours, wide mode)."""
    from lora_phi3.finetune.conversations import DataReport
    from lora_phi3.finetune.dataset import TrainingData
    from lora_phi3.finetune.packing import pack_examples
    for name in ("load_model", "prepare_data"):
        if not hasattr(ft, name):
            raise RuntimeError(f"lora_phi3.finetune.job no longer calls {name} by that name; "
                               "update _patch_wide")

    def load_model(name_or_path, dtype=None, **kw):
        return _wide_model(cfg, dtype)

    def prepare_data(tokenizer, recipe):
        train = synthetic_chat_rows(cfg["steps"] * cfg["batch_size"], cfg["seq_len"])
        # one short held-out row: the (untimed) evaluations before and after training stay cheap
        evals = synthetic_chat_rows(1, cfg["seq_len"], seed=SEED + 1, lengths=(32, 32))
        if recipe.training.packing:
            train, evals = pack_examples(train, cfg["seq_len"]), pack_examples(evals, cfg["seq_len"])
        n = cfg["steps"] * cfg["batch_size"] + 1
        report = DataReport(source="synthetic", rows_read=n, kept=n)
        return TrainingData(train, evals, [], report)
    ft.load_model, ft.prepare_data = load_model, prepare_data


def _run_ours(cfg: dict, packing: bool, probe: Probe, out_dir: str, full: bool = False) -> dict:
    from lora_phi3.finetune.recipe import load_recipe
    # the module, not the function lora_phi3/__init__ re-exports under the same name
    ft = importlib.import_module("lora_phi3.finetune.job")
    if full:  # the ablation: no skipping of unlabeled positions in the last decoder layer
        import functools
        if not hasattr(ft, "CausalLMLoss"):
            raise RuntimeError("lora_phi3.finetune.job no longer builds CausalLMLoss by that name")
        ft.CausalLMLoss = functools.partial(ft.CausalLMLoss, skip_unlabeled=False)
    if cfg["width"] != "demo":
        _patch_wide(ft, cfg)

    if not hasattr(ft, "train_step"):
        raise RuntimeError("lora_phi3.finetune.job no longer calls train_step by that name; "
                           "update _run_ours's timing hook")
    inner = ft.train_step

    def timed_step(*a, **k):
        probe.step_begin()
        res = inner(*a, **k)
        probe.step_end()
        return res
    ft.train_step = timed_step  # times exactly what finetune times itself
    recipe = load_recipe(overrides={"output_dir": out_dir, "training": {
        "max_steps": cfg["steps"], "batch_size": cfg["batch_size"], "gradient_accumulation_steps": 1,
        "learning_rate": cfg["lr"], "warmup_ratio": WARMUP_RATIO, "lr_scheduler": "cosine",
        "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM, "max_seq_length": cfg["seq_len"],
        "packing": packing, "gradient_checkpointing": False, "bf16": False, "logging_steps": 1,
        "eval_steps": 0, "save_steps": 0, "seed": SEED,
        "eval_accuracy": False},  # generation is not what is compared
        "lora": {"r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
                 "target_modules": TARGETS}})
    summary = ft.finetune(recipe, progress=False, device="cpu")
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    train = sorted((r for r in records if r.get("type") == "train"), key=lambda r: r["step"])
    cumulative = [r["train_tokens"] for r in train]
    probe.batch_tokens = [b - a for a, b in zip([0] + cumulative, cumulative)]
    if sum(probe.batch_tokens) != summary["train_tokens"]:
        raise RuntimeError("per-step tokens in metrics.jsonl do not add up to the summary's")
    return {"mean_loss": statistics.fmean(r["loss"] for r in train)}


def _lora_model(tokenizer, cfg: dict):
    from peft import LoraConfig, get_peft_model
    from lora_phi3.finetune.models import load_model
    model = load_model(None, tokenizer=tokenizer) if cfg["width"] == "demo" else _wide_model(cfg)
    return get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"],
                                            lora_dropout=cfg["dropout"], target_modules=TARGETS,
                                            bias="none", task_type="CAUSAL_LM"))


def _pad_collate(pad_id: int):
    import torch

    def collate(rows: list[dict]) -> dict:
        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n], labels[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
            mask[b, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


def _run_trainer(kind: str, cfg: dict, packing: bool, probe: Probe, out_dir: str) -> dict:
    """TRL ``SFTTrainer`` (kind "trl") or transformers ``Trainer`` (kind "hf") with PEFT."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from lora_phi3.finetune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    examples = _examples(tokenizer, cfg)
    model = _lora_model(tokenizer, cfg)
    common = dict(output_dir=out_dir, max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch_size"],
                  gradient_accumulation_steps=1, learning_rate=cfg["lr"], lr_scheduler_type="cosine",
                  warmup_steps=math.ceil(WARMUP_RATIO * cfg["steps"]), weight_decay=0.0,
                  max_grad_norm=MAX_GRAD_NORM, report_to="none", save_strategy="no",
                  eval_strategy="no", logging_steps=cfg["steps"], use_cpu=True, bf16=False,
                  seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
                  gradient_checkpointing=False)

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            probe.step_begin()

        def on_step_end(self, args, state, control, **kw):
            probe.step_end()
    if kind == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        args = SFTConfig(**common, max_length=cfg["seq_len"], packing=packing)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=tokenizer, callbacks=[Timing()])
    else:
        args = TrainingArguments(**common, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=examples,
                          data_collator=_pad_collate(tokenizer.pad_token_id), callbacks=[Timing()])
    collator = trainer.data_collator

    def counting(rows):
        probe.batch_tokens.append(sum(len(r["input_ids"]) for r in rows))  # before any padding
        return collator(rows)
    trainer.data_collator = counting  # the train dataloader is built in train(), from this
    out = trainer.train()
    return {"mean_loss": out.training_loss}


def child(name: str, cfg: dict, result_path: str) -> None:
    """One run in this process; writes its measurements as JSON to ``result_path``."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    kind, packing = RUNS[name]
    for mod in NEEDS[kind]:  # import costs belong to the baseline
        importlib.import_module(mod)
    importlib.import_module("lora_phi3.finetune.job")
    from lora_phi3.finetune.models import load_model
    from lora_phi3.finetune.tokenizer import load_tokenizer
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    # Warm-up build, then freed: lazy initialisation (tokenizer, templates, model classes) is
    # then part of the baseline for every trainer alike.
    tok = load_tokenizer(None)
    warm = (_examples(tok, cfg), load_model(None, tokenizer=tok) if cfg["width"] == "demo"
            else _wide_model(cfg, **WIDE_SMALL))
    del tok, warm
    gc.collect()
    base_rss, base_maxrss = rss_kib(), _maxrss_kib()
    can_reset = reset_peak()
    probe = Probe(can_reset, time.thread_time if cfg["clock"] == "thread" else time.perf_counter)
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as out_dir:
        if kind == "ours":
            extra = _run_ours(cfg, packing, probe, out_dir, full=name.endswith("-full"))
        else:
            extra = _run_trainer(kind, cfg, packing, probe, out_dir)
    n = len(probe.end)
    if n != cfg["steps"] or len(probe.batch_tokens) < n:
        raise RuntimeError(f"{name}: saw {n} steps and {len(probe.batch_tokens)} batches, "
                           f"expected {cfg['steps']}")
    w = min(cfg["warmup"], n - 1)
    tokens = sum(probe.batch_tokens[w:n])
    step_s = sum(e - b for b, e in zip(probe.begin[w:], probe.end[w:]))
    loop_s = probe.end[-1] - probe.end[w - 1] if w > 0 else probe.end[-1] - probe.begin[0]
    if can_reset:
        job_peak = max(probe.job_peak_before_loop, probe.peak_at_end) - base_rss
        loop_peak = probe.peak_at_end - probe.loop_rss
    else:
        job_peak, loop_peak = probe.peak_at_end - base_rss, None
    res = {"name": name, "timed_steps": n - w, "tokens": tokens,
           "tok_s_step": tokens / step_s, "tok_s_loop": tokens / loop_s,
           "peak_job_mib": job_peak / 1024, "peak_loop_mib": None if loop_peak is None else loop_peak / 1024,
           "maxrss_delta_mib": (_maxrss_kib() - base_maxrss) / 1024, "baseline_rss_mib": base_rss / 1024,
           "peak_reset": can_reset, "threads": torch.get_num_threads(), **extra}
    with open(result_path, "w") as f:
        json.dump(res, f)


# -- leak check: do packed sequences see each other? ---------------------------------------------
def leak_check(kind: str, cfg: dict | None = None) -> float:
    """Max |logit difference| of two examples run packed in one row vs each run alone.

    Uses the trainer's own collation (ours: ``pack_examples`` + ``collate``; TRL: its padding-free
    ``DataCollatorForLanguageModeling``) and the base model in eval mode with ``use_cache=False``,
    as in training. Near 0 means leak-free. In the phi3-mini mode the model is a shrunk member of
    the wide model's family (``WIDE_SMALL``; same vocabulary, no GQA).
    """
    import torch
    from lora_phi3.finetune.packing import collate, pack_examples
    from lora_phi3.finetune.models import load_model
    from lora_phi3.finetune.tokenizer import load_tokenizer
    tok = load_tokenizer(None)
    wide = cfg is not None and cfg["width"] != "demo"
    model = _wide_model(cfg, **WIDE_SMALL) if wide else load_model(None, tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    high = EOS_ID if wide else len(tok)
    exs = [{"input_ids": torch.randint(5, high, (n,), generator=g).tolist()} for n in (23, 31)]
    for e in exs:
        e["labels"] = list(e["input_ids"])
    if kind == "ours":
        batch = collate(pack_examples(exs, 64), tok.pad_token_id, packing=True)
    else:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        row = {"input_ids": exs[0]["input_ids"] + exs[1]["input_ids"], "seq_lengths": [23, 31]}
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)([row])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
                           for e in exs])
    return float((packed - alone).abs().max())


# -- parent -----------------------------------------------------------------------------------------
def _spawn(name: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_finetune_child_") as d:
        result, log = os.path.join(d, "result.json"), os.path.join(d, "log.txt")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-config",
               json.dumps(cfg), "--child-result", result]
        with open(log, "w") as lf:
            rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT,
                                timeout=CHILD_TIMEOUT_S).returncode
        if rc != 0 or not os.path.exists(result):
            tail = open(log).read()[-3000:]
            raise RuntimeError(f"run {name!r} failed (exit {rc}):\n{tail}")
        with open(result) as f:
            return json.load(f)


def _cell(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="ours,trl",
                    help=f"comma-separated, from {list(RUNS)} (default ours,trl; a peer whose "
                         "packages are missing is skipped, trl falling back to hf-padded)")
    ap.add_argument("--width", choices=["demo", "phi3-mini"], default="demo",
                    help="demo: the embedded tiny Phi-3 and bundled chat data; phi3-mini: a 2-layer "
                         "Phi-3 of Phi-3-mini's width (random weights) on synthetic chat rows")
    ap.add_argument("--model-overrides", default=None, metavar="JSON",
                    help="phi3-mini width only: Phi3Config fields replacing the wide model's "
                         "(tests shrink it with this)")
    ap.add_argument("--steps", type=int, default=None, help=f"default {STEPS}; phi3-mini "
                    f"{WIDE_DEFAULTS['steps']}")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timings "
                    f"(default {WARMUP}; phi3-mini {WIDE_DEFAULTS['warmup']})")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repetitions (default "
                    f"{ROUNDS}; phi3-mini {WIDE_DEFAULTS['rounds']})")
    ap.add_argument("--batch-size", type=int, default=None, help=f"default {BATCH_SIZE}; "
                    f"phi3-mini {WIDE_DEFAULTS['batch_size']}")
    ap.add_argument("--seq-len", type=int, default=None, help=f"default {SEQ_LEN}; phi3-mini "
                    f"{WIDE_DEFAULTS['seq_len']}")
    ap.add_argument("--lr", type=float, default=None, help=f"default {LEARNING_RATE:g}; phi3-mini "
                    f"{WIDE_DEFAULTS['lr']:g}")
    ap.add_argument("--r", type=int, default=R)
    ap.add_argument("--lora-alpha", type=float, default=ALPHA)
    ap.add_argument("--lora-dropout", type=float, default=DROPOUT)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall time, or CPU time of the main thread (needs --threads 1: then all "
                         "the work, backward included, runs there; robust to other processes "
                         "sharing the cores)")
    ap.add_argument("--json", default=None, help="also write every run's measurements here")
    ap.add_argument("--quick", action="store_true", help="8 steps, 2 warm-up, 1 round (unless given)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.child_config), args.child_result)
        return
    wide = args.width != "demo"
    if args.model_overrides is not None and not wide:
        ap.error("--model-overrides needs --width phi3-mini")
    if args.quick:  # shrinks what was not given explicitly
        quick = (("steps", 3), ("warmup", 1), ("rounds", 1)) if wide else \
            (("steps", 8), ("warmup", 2), ("rounds", 1))
        for flag, small in quick:
            if getattr(args, flag) is None:
                setattr(args, flag, small)
    for flag, value in (WIDE_DEFAULTS if wide else DEMO_DEFAULTS).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    model_cfg = {}
    if wide:
        try:
            model_cfg = {**PHI3_MINI_WIDTH, **json.loads(args.model_overrides or "{}")}
        except (ValueError, TypeError) as e:
            ap.error(f"--model-overrides: not a JSON object: {e}")
    for flag in ("steps", "rounds", "batch_size", "seq_len", "r"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.clock == "thread" and args.threads != 1:
        ap.error(f"--clock thread needs --threads 1 (torch's worker threads would go uncounted), "
                 f"got --threads {args.threads}")
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown run(s) {unknown}; allowed: {list(RUNS)}")
    runnable = []
    for n in names:
        missing = [m for m in NEEDS[RUNS[n][0]] if not have(m)]
        if not missing:
            runnable.append(n)
            continue
        print(f"skipping {n}: not installed: {', '.join(missing)} (pip install -e .[bench])")
        if n == "trl" and have("peft") and "hf-padded" not in names:
            print("  falling back to hf-padded (transformers Trainer + PEFT, no TRL, no packing)")
            runnable.append("hf-padded")
    cfg = {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
           "seq_len": args.seq_len, "lr": args.lr, "r": args.r, "alpha": args.lora_alpha,
           "dropout": args.lora_dropout, "threads": args.threads, "clock": args.clock,
           "width": args.width, "model": model_cfg}

    from common import load, machine, markdown_table
    print(f"machine: {machine()}; load average at start {load()}")
    if wide:
        rows = synthetic_chat_rows(args.steps * args.batch_size, args.seq_len)
        n_tok = sum(len(r["input_ids"]) for r in rows)
        n_lab = sum(sum(1 for y in r["labels"] if y != -100) for r in rows)
        fields = ", ".join(f"{k} {v}" for k, v in model_cfg.items())
        print(f"Phi-3-mini width: random-init Phi3ForCausalLM ({fields}, vocab {PHI3_VOCAB}); "
              f"{len(rows)} synthetic chat rows of {min(len(r['input_ids']) for r in rows)}-"
              f"{max(len(r['input_ids']) for r in rows)} tokens ({n_tok} in all), "
              f"{1 - n_lab / n_tok:.1%} of the tokens without a label (prompt and chat markup)")
    print(f"{'synthetic rows' if wide else 'embedded tiny Phi-3 + bundled chat data'}; "
          f"{args.steps} steps x batch {args.batch_size} x "
          f"seq {args.seq_len}, lr {args.lr:g} cosine (warm-up {WARMUP_RATIO:g}), fp32, LoRA r="
          f"{args.r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on {'/'.join(TARGETS)}; "
          f"torch threads per run: {args.threads or 'default'}, {args.clock} clock, timings skip the "
          f"first {args.warmup} steps; {args.rounds} interleaved rounds, one child process per run; "
          "cells: median [min–max]\n")
    leaks = {"ours": leak_check("ours", cfg)} if any(RUNS[n] == ("ours", True) for n in runnable) else {}
    if any(RUNS[n] == ("trl", True) for n in runnable):
        leaks["trl"] = leak_check("trl", cfg)
    results: dict[str, list[dict]] = {n: [] for n in runnable}
    for i in range(args.rounds):
        order = runnable[i % len(runnable):] + runnable[:i % len(runnable)]
        for n in order:
            results[n].append(_spawn(n, cfg))
            r = results[n][-1]
            print(f"round {i + 1} {n}: {r['tok_s_step']:,.0f} tok/s (step), "
                  f"{r['tok_s_loop']:,.0f} (loop), peak job {r['peak_job_mib']:.1f} MiB", file=sys.stderr,
                  flush=True)
    rows = []
    for n in runnable:
        rs = results[n]
        kind, packing = RUNS[n]
        leak = leaks.get(kind) if packing else None
        loop_peaks = [r["peak_loop_mib"] for r in rs if r["peak_loop_mib"] is not None]
        rows.append([n, "yes" if packing else "no",
                     "n/a" if leak is None else ("yes" if leak < 1e-3 else "NO") + f" ({leak:.0e})",
                     rs[0]["tokens"], _cell([r["tok_s_step"] for r in rs], ",.0f"),
                     _cell([r["tok_s_loop"] for r in rs], ",.0f"),
                     _cell([r["peak_job_mib"] for r in rs], ".1f"),
                     _cell(loop_peaks, ".1f") if loop_peaks else "—",
                     f"{statistics.median(r['mean_loss'] for r in rs):.3f}"])
    print(markdown_table(["run", "packing", "leak-free (max Δlogit)", "timed tokens",
                          "tokens/s (step)", "tokens/s (loop)", "peak RSS Δ job MiB",
                          "peak RSS Δ loop MiB", "mean train loss"], rows))
    for ours, peer in (("ours", "trl"), ("ours-padded", "trl-padded"), ("ours", "hf-padded"),
                       ("ours-padded", "hf-padded"), ("ours-full", "trl"),
                       ("ours-padded-full", "hf-padded"), ("ours", "ours-full"),
                       ("ours-padded", "ours-padded-full")):
        if ours not in results or peer not in results:
            continue
        a, b = results[ours], results[peer]
        # the two ran back to back in each round: per-round ratios cancel slow drifts of the machine
        speed = [x["tok_s_step"] / y["tok_s_step"] for x, y in zip(a, b)]
        loop = [x["tok_s_loop"] / y["tok_s_loop"] for x, y in zip(a, b)]
        mem = [x["peak_job_mib"] / max(y["peak_job_mib"], 1e-9) for x, y in zip(a, b)]
        print(f"\n{ours} / {peer} (median [min–max] of per-round ratios): tokens/s "
              f"x{_cell(speed, '.2f')} (step), x{_cell(loop, '.2f')} (loop); "
              f"peak RSS Δ job x{_cell(mem, '.2f')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "leak_max_abs_logit_diff": leaks, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
