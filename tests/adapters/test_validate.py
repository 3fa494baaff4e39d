"""Reading adapter files safely: every malformed safetensors buffer is one clean ValueError."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save as st_save

from lora_phi3.adapters import load_adapter, read_adapter, save_adapter
from lora_phi3.adapters.validate import FLOAT_DTYPES, decode_safetensors, non_float_keys
from tiny import adapted, logits, tiny_phi3

GOOD = st_save({"a": torch.zeros(2, 3), "b": torch.ones(4)})
_N = int.from_bytes(GOOD[:8], "little")
HEADER, BODY = json.loads(GOOD[8:8 + _N]), GOOD[8 + _N:]


def with_header(changes, body=BODY):
    """GOOD with its header's entries updated (``{"b": {"dtype": "Q7"}}``) and ``body`` after it."""
    header = {k: {**v, **changes[k]} if isinstance(changes.get(k), dict) else changes.get(k, v)
              for k, v in HEADER.items()}
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


CORRUPT = {  # name: (bytes, what the message says)
    "empty": (b"", "truncated or corrupt"),
    "shorter than the length field": (b"\x05\x00\x00", "not a safetensors file"),
    "truncated body": (GOOD[:-4], "truncated or corrupt"),
    "trailing bytes": (GOOD + bytes(8), "truncated or corrupt"),
    "header length past the end": ((_N + 100).to_bytes(8, "little") + GOOD[8:], "truncated or corrupt"),
    "huge header length": ((10 ** 12).to_bytes(8, "little") + GOOD[8:], "truncated or corrupt"),
    "bad json": ((5).to_bytes(8, "little") + b"{abc}" + BODY, "header is not valid JSON"),
    "not utf-8": ((2).to_bytes(8, "little") + b"\xff\xfe", "header is not valid JSON"),
    "json list": ((6).to_bytes(8, "little") + b"[1, 2]" + BODY, "header is not valid JSON"),
    "unknown dtype": (with_header({"a": {"dtype": "Q7"}}), "header is not valid JSON"),
    "negative shape": (with_header({"a": {"shape": [-2, 3]}}), "header is not valid JSON"),
    "shape disagrees with offsets": (with_header({"a": {"shape": [2, 4]}}), "truncated or corrupt"),
    "offsets past the end": (with_header({"b": {"data_offsets": [24, 48]}}), "truncated or corrupt"),
    "overlapping tensors": (with_header({"b": {"data_offsets": [8, 24]}}), "truncated or corrupt"),
    "reversed offsets": (with_header({"b": {"data_offsets": [40, 24]}}), "truncated or corrupt"),
    "offsets as strings": (with_header({"b": {"data_offsets": ["24", "40"]}}), "header is not valid JSON"),
    "entry not an object": (with_header({"b": 5}), "header is not valid JSON"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_every_malformed_buffer_is_a_value_error_naming_the_file(name):
    data, message = CORRUPT[name]
    with pytest.raises(ValueError, match=rf"^dir/adapter\.safetensors: .*{message}"):
        decode_safetensors(data, "dir/adapter.safetensors")


def test_a_good_buffer_decodes():
    tensors = decode_safetensors(GOOD, "x")
    assert torch.equal(tensors["a"], torch.zeros(2, 3)) and torch.equal(tensors["b"], torch.ones(4))


@pytest.mark.parametrize("name", ["truncated body", "overlapping tensors", "bad json"])
def test_a_corrupt_tensor_file_with_a_matching_checksum_is_refused(tmp_path, name):
    # The checksum cannot catch a file written corrupt: the decoder must, before the model changes.
    path = save_adapter(adapted(), tmp_path / "a")
    data, message = CORRUPT[name]
    (path / "adapter.safetensors").write_bytes(data)
    doc = json.loads((path / "adapter_config.json").read_text())
    doc.update(sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
    (path / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"adapter\.safetensors: .*{message}"):
        read_adapter(path)
    model = adapted(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_decoder_accepts_integers_so_the_float_check_is_ours():
    ints = st_save({"a": torch.zeros(2, dtype=torch.int64), "b": torch.ones(2)})
    tensors = decode_safetensors(ints, "x")
    assert non_float_keys(tensors) == ["a (int64)"]
    assert torch.float32 in FLOAT_DTYPES and torch.int64 not in FLOAT_DTYPES


# -- a file that disagrees with itself is refused, whatever the model ----------------------------
DOWN = "model.layers.0.mlp.down_proj"


def _fake_module(doc):
    doc["modules"]["model.layers.0.mlp.fake"] = dict(doc["modules"][DOWN])


SELF_DISAGREEMENTS = {  # what the json says against the tensors and the model: (edit, message)
    "lora_alpha against scaling and r": (
        lambda doc: doc["modules"][DOWN].update(lora_alpha=16),
        rf"module {DOWN} differs \(file, model\): \{{'lora_alpha': \(16, 8\)\}}"),
    "in_features against lora_A": (  # an injected model, then a bare one (before injecting)
        lambda doc: doc["modules"][DOWN].update(in_features=95),
        rf"module {DOWN} differs \(file, model\): \{{'in_features': \(95, 96\)\}}"
        rf"|module {DOWN}: in_features is 96 in the model, 95 in the file"),
    "out_features against lora_B": (
        lambda doc: doc["modules"][DOWN].update(out_features=65),
        rf"module {DOWN} differs \(file, model\): \{{'out_features': \(65, 64\)\}}"
        rf"|module {DOWN}: out_features is 64 in the model, 65 in the file"),
    "a fact left out": (
        lambda doc: doc["modules"][DOWN].pop("in_features"),
        rf"module {DOWN} differs \(file, model\): \{{'in_features': \(None, 96\)\}}"),
    "a fact of another layer family": (
        lambda doc: doc["modules"][DOWN].update(split_sizes=[32, 32], enable_lora=[True, True]),
        (rf"module {DOWN} differs \(file, model\): \{{'split_sizes': \(\[32, 32\], None\), "
         rf"'enable_lora': \(\[True, True\], None\)\}}")),
    "tensors without a modules entry": (
        lambda doc: doc["modules"].pop(DOWN),
        rf"tensor {DOWN}.lora_A belongs to no entry of modules"),
    "a modules entry without tensors": (
        _fake_module, r"modules\['model.layers.0.mlp.fake'\] has no tensors"),
}


@pytest.mark.parametrize("name", list(SELF_DISAGREEMENTS))
def test_a_file_that_disagrees_with_itself_is_refused(tmp_path, name):
    edit, message = SELF_DISAGREEMENTS[name]
    path = save_adapter(adapted(), tmp_path / "a")
    doc = json.loads((path / "adapter_config.json").read_text())
    edit(doc)
    (path / "adapter_config.json").write_text(json.dumps(doc))
    for model in (adapted(seed=2), tiny_phi3()):  # into an injected and into a bare model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_saving_class_is_informational(tmp_path):
    # An adapter trained over an NF4 base (Linear4bit) loads into the same family over a dense one.
    source = adapted()
    path = save_adapter(source, tmp_path / "a")
    doc = json.loads((path / "adapter_config.json").read_text())
    doc["modules"][DOWN]["type"] = "Linear4bit"
    (path / "adapter_config.json").write_text(json.dumps(doc))
    model = load_adapter(adapted(seed=2), path)
    assert torch.equal(logits(model), logits(source))
