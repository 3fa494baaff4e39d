"""Loading and validating chat data: files, directories, HF datasets, bad rows and splits."""

import importlib.util
import json

import pytest

from lora_phi3.finetune.conversations import load_conversations
from lora_phi3.finetune.data import tokenize_dataset


def _write(path, lines):
    path.write_bytes(b"".join(l if isinstance(l, bytes) else (l + "\n").encode() for l in lines))
    return path


# --------------------------------------------------------------------------- loading

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})

BAD_ROWS = [  # (line content, expected message)
    ('{"messages": [', "invalid JSON: Expecting value at column 15"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
     "message 1 is missing field 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     "message 2 has unknown role 'bot' (allowed: system, user, assistant)"),
    ('{"messages": []}', "empty conversation ('messages' is empty)"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "conversation has no assistant message"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
     "line is not valid UTF-8 (byte 0xe9 at column 47)"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]}',
     "message 2 content must be a string, got int"),
    ('{"instruction": "x"}', "Alpaca row is missing field 'output'"),
    ('{"instruction": "x", "output": ["y"]}', "Alpaca field 'output' must be a string, got list"),
    ('[1, 2]', "row must be a JSON object, got list"),
    ('{"prompt": "x", "completion": "y"}',
     "row has neither 'messages' nor Alpaca 'instruction'/'output' fields (keys: ['completion', 'prompt'])"),
    ('{"messages": [{"role": "user", "content": "\\udc80"}, {"role": "assistant", "content": "b"}]}',
     "message 1 content is not valid UTF-8 text"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_each_bad_row_kind_error_mode(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(ValueError) as err:
        load_conversations(str(path), on_bad_row="error", eval_fraction=0.0)
    assert str(err.value) == f"bad.jsonl:2: {message}"


def test_bad_rows_skip_mode_counts_and_locations(tmp_path, caplog):
    lines = [GOOD]
    for line, _ in BAD_ROWS:
        lines.append(line)
    lines += ["", GOOD]  # a blank line is not a row
    path = _write(tmp_path / "bad.jsonl", lines)
    with caplog.at_level("WARNING", logger="lora_phi3.finetune.conversations"):
        train, evals, rep = load_conversations(str(path), eval_fraction=0.0)
    n_bad = len(BAD_ROWS)
    assert len(train) == 2 and evals == []
    assert (rep.rows_read, rep.kept, rep.skipped, rep.too_long) == (n_bad + 2, 2, n_bad, 0)
    assert rep.problems == [f"bad.jsonl:{i + 2}: {msg}" for i, (_, msg) in enumerate(BAD_ROWS)]
    assert rep.train_locations == ["bad.jsonl:1", f"bad.jsonl:{n_bad + 3}"]
    assert sum("row skipped" in r.getMessage() for r in caplog.records) == n_bad


def test_argument_errors(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match=r"on_bad_row must be one of \('skip', 'error'\), got 'warn'"):
        load_conversations(str(path), on_bad_row="warn")
    with pytest.raises(ValueError, match=r"eval_fraction must be a number in \[0, 1\), got 1.5"):
        load_conversations(str(path), eval_fraction=1.5)
    with pytest.raises(ValueError, match="data file '.*missing.jsonl' does not exist"):
        load_conversations(str(tmp_path / "missing.jsonl"))
    bad_only = _write(tmp_path / "b.jsonl", ['{"messages": []}'])
    with pytest.raises(ValueError, match="has no usable training conversations"):
        load_conversations(str(bad_only))


def test_hf_name_needs_datasets():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    with pytest.raises(ValueError, match="pip install datasets"):
        load_conversations("someuser/some_dataset")


def test_alpaca_rows_and_messages_mix(tmp_path):
    path = _write(tmp_path / "a.jsonl", [
        json.dumps({"instruction": "Translate", "input": "chat", "output": "cat"}),
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}),
        json.dumps({"instruction": "Say yo", "output": "yo"}),
        GOOD,
    ])
    train, _, _ = load_conversations(str(path), eval_fraction=0.0)
    assert train == [
        [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "yo"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    ]


def test_json_list_equals_jsonl_and_locates_rows_by_line(tmp_path):
    rows = [json.loads(GOOD), {"instruction": "Say yo", "output": "yo"},
            {"messages": [{"role": "bot", "content": "x"}]}, json.loads(GOOD)]
    jl = _write(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows, indent=2))  # pretty-printed: rows start on lines 2, 14, 18, 26
    a = load_conversations(str(jl), eval_fraction=0.0)
    b = load_conversations(str(js), eval_fraction=0.0)
    assert a[0] == b[0] and len(a[0]) == 3
    assert b[2].train_locations == ["d.json:2", "d.json:14", "d.json:26"]
    assert b[2].problems == ["d.json:18: message 1 has unknown role 'bot' (allowed: system, user, assistant)"]
    # undecodable bytes inside a JSON list are a per-row problem
    js.write_bytes(b'[\n' + GOOD.encode() + b',\n{"instruction": "caf\xe9", "output": "x"}\n]')
    train, _, rep = load_conversations(str(js), eval_fraction=0.0)
    assert len(train) == 1
    assert rep.problems == ["d.json:3: Alpaca field 'instruction' is not valid UTF-8 text"]
    # a syntax error makes the whole document unreadable: always an error, with its line
    js.write_text('[\n' + GOOD + ',\n{"instruction": \n]')
    with pytest.raises(ValueError, match=r"d.json:4: invalid JSON: Expecting value at column 1"):
        load_conversations(str(js))


def test_random_split_depends_on_seed_only(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(20)]
    path = _write(tmp_path / "d.jsonl", lines)
    tr1, ev1, rep = load_conversations(str(path), eval_fraction=0.1, seed=3)
    tr2, ev2, _ = load_conversations(str(path), eval_fraction=0.1, seed=3)
    _, ev3, _ = load_conversations(str(path), eval_fraction=0.1, seed=4)
    assert (tr1, ev1) == (tr2, ev2) and ev1 != ev3
    assert len(ev1) == 2 and len(tr1) == 18
    qs = sorted(c[0]["content"] for c in tr1 + ev1)
    assert qs == sorted(f"q{i}" for i in range(20))
    assert len(rep.train_locations) == 18 and len(rep.eval_locations) == 2


def test_directory_with_train_and_eval_files(tmp_path):
    _write(tmp_path / "train.jsonl", [GOOD, GOOD, GOOD])
    _write(tmp_path / "validation.jsonl", [json.dumps({"instruction": "q", "output": "a"})])
    train, evals, rep = load_conversations(str(tmp_path), eval_fraction=0.5)
    assert len(train) == 3 and len(evals) == 1  # the file's split wins over eval_fraction
    assert rep.eval_locations == ["validation.jsonl:1"]


def test_bundled_dataset(tok):
    train, evals, rep = load_conversations(None)
    assert len(train) == 2000 and len(evals) == 200 and rep.skipped == 0
    as_key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    assert not {as_key(c) for c in evals} & {as_key(c) for c in train}
    assert any(c[0]["role"] == "system" for c in train)
    assert any(sum(m["role"] == "assistant" for m in c) >= 2 for c in train)
    lengths = [len(e["input_ids"]) for e in tokenize_dataset(tok, train + evals, 256)]
    assert sum(n < 64 for n in lengths) / len(lengths) > 0.95 and max(lengths) <= 128


def test_hf_dataset_directory_with_bad_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "bot", "content": "x"}]}
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([good, bad]),
        "test": datasets.Dataset.from_list([{"instruction": "a", "output": "b"}]),  # Alpaca
    }).save_to_disk(str(tmp_path))
    train, evals, report = load_conversations(str(tmp_path))
    assert train == [good["messages"]]
    assert evals == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    assert (report.rows_read, report.kept, report.skipped) == (3, 2, 1)
    assert report.problems == [f"{tmp_path}[train]:row 1: message 1 has unknown role 'bot' "
                               "(allowed: system, user, assistant)"]
