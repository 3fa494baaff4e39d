"""Seeded fuzzing of both adapter formats: every mutated file either loads exactly what it holds or
is refused with ValueError/TypeError, the model bit-identical.

One adapter is saved per format (ours via ``save_adapter``, PEFT via ``export_peft``), once per
module. Each case mutates a copy: a JSON field dropped, retyped or changed at any depth (per-module
entries and ``lora_config`` fields included); a safetensors header rewritten (dtype, shape, offsets,
a key renamed, two tensors' offsets swapped) with our json's ``sha256``/``num_bytes`` recomputed so
the checksum passes; a file truncated; two tensors swapped. A file that still loads must give the
logits of the adapter it holds: for ours the saved model with the file's tensors loaded directly
(the saver itself unless tensors were swapped); for PEFT a dense model ``W + s * B @ A`` built
from the file's own pairs and scaling rules, as PEFT reads them.
"""

import copy
import hashlib
import json
import math
import random
import re

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lora_phi3.adapters import export_peft, import_peft, load_adapter, save_adapter
from lora_phi3.inject import get_lora_config
from tiny import adapted, logits, tiny_phi3

SEED = 20261202
CASES = {"ours": 300, "peft": 200}
VALUES = [None, True, False, 0, -1, 3, 2.5, float("nan"), "x", "", [], [1], {}, {"a": 1}]
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}
FILES = {"ours": ("adapter_config.json", "adapter.safetensors"),
         "peft": ("adapter_config.json", "adapter_model.safetensors")}
LOAD = {"ours": load_adapter, "peft": import_peft}


# -- what a mutation does to the files -------------------------------------------------------------
def json_paths(node, path=()):
    """Every path into a JSON value (dict keys and list indices), the root excluded."""
    items = (node.items() if isinstance(node, dict)
             else enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield path + (key,)
        yield from json_paths(child, path + (key,))


def changed(rng, value):
    """A value of the same type, changed."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, 0, 2 * value, -value, 10 ** 12])
    if isinstance(value, float):
        return rng.choice([2 * value, -value, 0.0, value + 0.5, math.inf])
    if isinstance(value, str):
        # never "nf4": a file asking for a 4-bit base legitimately loads as one
        return rng.choice(["", value + "x", value[:-1], value.upper() + "_"])
    if isinstance(value, list):
        return rng.choice([value[:-1], value + value[-1:] if value else [1], value[::-1], []])
    if isinstance(value, dict):
        extra = dict(value)
        extra["unexpected_field"] = 1
        return extra
    return rng.choice(VALUES)


def mutate_json(rng, doc):
    top = rng.choice(sorted(doc))
    paths = [p for p in json_paths(doc) if p[0] == top]
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    op = rng.choice(["drop", "retype", "change"])
    if op == "drop":
        del parent[key]
    elif op == "retype":
        parent[key] = rng.choice([v for v in VALUES if type(v) is not type(old)])
    else:
        parent[key] = changed(rng, old)
    new = "<dropped>" if op == "drop" else repr(parent[key])
    return f"json {op} {'/'.join(map(str, path))}: {repr(old)[:40]} -> {new[:40]}"


def split(blob):
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, body):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def mutate_header(rng, blob):
    header, body = split(blob)
    keys = sorted(k for k in header if k != "__metadata__")
    key = rng.choice(keys)
    entry = header[key]
    op = rng.choice(["dtype", "shape", "offsets", "swap_offsets", "rename", "drop", "metadata"])
    if op == "dtype":
        entry["dtype"] = rng.choice(list(ST_DTYPES) + ["F8_E4M3", "X9"])
    elif op == "shape":
        s = entry["shape"]
        entry["shape"] = rng.choice([s[::-1], [math.prod(s)], s + [1], [2 * s[0]] + s[1:],
                                     [s[0] // 2, 2 * s[1]]])
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[a + 4, b + 4], [a, b + 4], [b, a], [0, b - a],
                                            [a - 4, b - 4]])
    elif op == "swap_offsets":  # same-size tensors: the data of two tensors trade places
        def size(k):
            return header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
        other = header[rng.choice([k for k in keys if size(k) == size(key)])]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "rename":
        new = rng.choice([key.replace("layers.0", "layers.7"), key + "x",
                          key.replace("lora_A", "lora_B")])
        header[new] = header.pop(key)
    elif op == "drop":
        del header[key]
    else:
        header["__metadata__"] = rng.choice([{"format": 5}, {"format": "pt", "x": "y"}, []])
    return join(header, body), f"header {op} {key}"


def swap_tensors(rng, blob):
    tensors = st_load(blob)
    a, b = rng.sample(sorted(tensors), 2)
    tensors[a], tensors[b] = tensors[b], tensors[a]
    return st_save(tensors), f"swap tensors {a} <-> {b}"


def mutated_files(rng, fmt, files):
    """``(json text, tensor bytes, description)`` of one mutation of a saved adapter."""
    doc, blob = json.loads(files[0]), files[1]
    kind = rng.choice(["json", "json", "json", "header", "header", "truncate", "swap"])
    if kind == "json":
        what = mutate_json(rng, doc)
        return json.dumps(doc), blob, what
    if kind == "truncate" and rng.random() < 0.3:
        text = files[0]
        return text[:rng.randrange(len(text))], blob, "truncate json"
    if kind == "truncate":
        blob, what = blob[:rng.randrange(len(blob))], "truncate tensors"
    elif kind == "header":
        blob, what = mutate_header(rng, blob)
    else:
        blob, what = swap_tensors(rng, blob)
    if fmt == "ours" and rng.random() < 0.8:  # make the tensor file look authentic
        doc.update(sha256=hashlib.sha256(blob).hexdigest(), num_bytes=len(blob))
        what += " (checksum recomputed)"
        if kind != "truncate" and rng.random() < 0.5:  # and the tensor list agree with the header
            header, _ = split(blob)
            doc["tensors"] = {k: {"shape": v.get("shape"),
                                  "dtype": ST_DTYPES.get(v.get("dtype"), v.get("dtype"))}
                              for k, v in header.items()
                              if k != "__metadata__" and isinstance(v, dict)}
            what += " (tensor list rewritten)"
    return json.dumps(doc), blob, what


# -- the saved adapters and the models loaded into -------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The saving model and its files in both formats, written once for the whole module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide matrices: a second thread only adds contention
    root = tmp_path_factory.mktemp("fuzz")
    source = adapted()  # per-slice q/v on qkv_proj, gate_up_proj, o_proj, down_proj; r=4
    save_adapter(source, root / "ours")
    export_peft(source, root / "peft")
    files = {fmt: ((root / fmt / names[0]).read_text(), (root / fmt / names[1]).read_bytes())
             for fmt, names in FILES.items()}
    targets = {"bare": tiny_phi3(), "injected": adapted(seed=7)}
    yield source, files, targets
    torch.set_num_threads(threads)


def snapshot(model):
    """Everything a refused load must leave as it was: every parameter and buffer (values, dtype,
    requires_grad), the module tree, the stored LoraConfig."""
    tensors = {("p", n): (t.detach().clone(), t.requires_grad)
               for n, t in model.named_parameters(remove_duplicate=False)}
    tensors.update({("b", n): (t.clone(), False)
                    for n, t in model.named_buffers(remove_duplicate=False)})
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    return tensors, tree, get_lora_config(model)


def same(a, b):
    (ta, tree_a, cfg_a), (tb, tree_b, cfg_b) = a, b
    return (tree_a == tree_b and cfg_a == cfg_b and ta.keys() == tb.keys()
            and all(x[1] == y[1] and x[0].dtype == y[0].dtype and torch.equal(x[0], y[0])
                    for x, y in ((ta[k], tb[k]) for k in ta)))


_REFERENCES: dict = {}  # the same file contents mean the same logits: computed once


def cached(key, compute):
    if key not in _REFERENCES:
        _REFERENCES[key] = compute()
    return _REFERENCES[key]


def ours_reference(source, blob):
    """The saving model with the file's tensors loaded as they are (no checks)."""
    return cached(("ours", hashlib.sha256(blob).hexdigest()), lambda: _ours_reference(source, blob))


def _ours_reference(source, blob):
    ref = copy.deepcopy(source)
    with torch.no_grad():
        ref.load_state_dict(st_load(blob), strict=False)
    return logits(ref)


_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<mod>.+)\.lora_(?P<which>[AB])\.weight$")


def peft_reference(cfg, blob, base):
    """A plain tiny Phi-3 with ``W += s * B @ A`` for each of the file's pairs, ``s`` by PEFT's
    rules (``rank_pattern``/``alpha_pattern`` matched at the end of the path, ``use_rslora``)."""
    scaling = json.dumps([cfg.get(k) for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                               "use_rslora")])
    return cached(("peft", hashlib.sha256(blob).hexdigest(), scaling),
                  lambda: _peft_reference(cfg, blob, base))


def _peft_reference(cfg, blob, base):
    def pattern(name, field, default):
        for key, value in (cfg.get(field) or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default
    pairs = {}
    for key, t in st_load(blob).items():
        m = _PEFT_KEY.match(key)
        assert m, f"import accepted a key PEFT's LoRA would not load: {key}"
        pairs.setdefault(m["mod"], {})[m["which"]] = t
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in pairs.items():
            r = pattern(name, "rank_pattern", cfg["r"])
            alpha = pattern(name, "alpha_pattern", cfg["lora_alpha"])
            assert p["A"].shape[0] == r, f"{name}: rank {p['A'].shape[0]} loaded with r={r}"
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            ref.get_submodule(name).weight += s * p["B"].float() @ p["A"].float()
    return logits(ref)


def write_dir(path, fmt, text, blob):
    path.mkdir()
    (path / FILES[fmt][0]).write_text(text)
    (path / FILES[fmt][1]).write_bytes(blob)
    return path


def run_case(fmt, case, saved, tmp_path):
    """One mutated file loaded into one model: None if the outcome is allowed, else why not."""
    source, files, targets = saved
    rng = random.Random(f"{SEED}-{fmt}-{case}")
    text, blob, what = mutated_files(rng, fmt, files[fmt])
    path = write_dir(tmp_path / f"{fmt}-{case}", fmt, text, blob)
    which = "bare" if case % 2 == 0 else "injected"
    what = f"{what} into {which}"
    model = copy.deepcopy(targets[which])
    before = snapshot(model)
    try:
        LOAD[fmt](model, path)
    except (ValueError, TypeError) as e:
        return None if same(before, snapshot(model)) else f"{what}: refused ({e}), model changed"
    except Exception as e:  # noqa: BLE001 - the point of the fuzz: any other exception is a bug
        return f"{what}: {type(e).__name__}: {e}"
    try:
        want = (ours_reference(source, blob) if fmt == "ours"
                else peft_reference(json.loads(text), blob, targets["bare"]))
    except Exception as e:  # noqa: BLE001
        return f"{what}: loaded, but the file cannot mean that ({type(e).__name__}: {e})"
    got = logits(model)
    ok = torch.equal(got, want) if fmt == "ours" else torch.allclose(got, want, atol=1e-5, rtol=0)
    return None if ok else f"{what}: loaded, other logits (max diff {(got - want).abs().max():.3g})"


@pytest.mark.parametrize("fmt", list(CASES))
def test_every_mutated_file_loads_exactly_or_is_refused_cleanly(fmt, saved, tmp_path):
    source, files, targets = saved
    for which, target in targets.items():  # the unmutated files load exactly, into both
        model = LOAD[fmt](copy.deepcopy(target), write_dir(tmp_path / which, fmt, *files[fmt]))
        atol = 1e-5 if fmt == "peft" else 0
        torch.testing.assert_close(logits(model), logits(source), atol=atol, rtol=0)
    failures = [f for f in (run_case(fmt, c, saved, tmp_path) for c in range(CASES[fmt])) if f]
    assert not failures, f"{len(failures)} of {CASES[fmt]} cases:\n" + "\n".join(failures[:15])
