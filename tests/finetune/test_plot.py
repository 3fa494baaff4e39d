"""The SVG training plot: valid XML, one point per finite record at the right pixel, the accuracy
panel only when accuracy was measured, non-finite values skipped, nothing written when empty."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from lora_phi3.finetune import plot
from lora_phi3.finetune.plot import Panel, nice_ticks, write_training_plot

NS = "{http://www.w3.org/2000/svg}"


def _records(accuracy: bool = False) -> list[dict]:
    recs = [{"type": "eval", "step": 0, "eval_loss": 2.6, "base": True}]
    for step in range(10, 101, 10):
        recs.append({"type": "train", "step": step, "loss": 3.0 - step / 100})
        if step % 50 == 0:
            recs.append({"type": "eval", "step": step, "eval_loss": 2.5 - step / 200,
                         **({"eval_accuracy": step / 200} if accuracy else {})})
    return recs


def _render(tmp_path, records, **kw) -> ET.Element:
    path = tmp_path / "plot.svg"
    assert write_training_plot(records, path, **kw) is True
    return ET.fromstring(path.read_bytes())  # raises on invalid XML


def _points(root: ET.Element, cls: str) -> list[tuple[float, float]]:
    line = root.find(f"{NS}polyline[@class='{cls}']")
    return [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]


def _areas(root: ET.Element) -> list[dict]:
    return [{k: float(r.get(k)) for k in ("x", "y", "width", "height")}
            for r in root.iter(f"{NS}rect") if r.get("class") == "plot-area"]


def test_valid_svg_with_one_point_per_record(tmp_path):
    root = _render(tmp_path, _records())
    assert root.tag == f"{NS}svg"
    assert len(_points(root, "train-loss")) == 10
    assert len(_points(root, "eval-loss")) == 3
    assert len(root.findall(f"{NS}circle[@class='eval-loss']")) == 3
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "train loss" in texts and "eval loss" in texts and "optimizer step" in texts
    assert len(_areas(root)) == 1 and root.find(f"{NS}polyline[@class='eval-accuracy']") is None


def test_points_map_to_the_plot_area(tmp_path):
    root = _render(tmp_path, _records())
    (area,) = _areas(root)
    train = _points(root, "train-loss")
    evals = _points(root, "eval-loss")
    assert evals[0][0] == pytest.approx(area["x"])  # step 0: left edge
    assert train[-1][0] == pytest.approx(area["x"] + area["width"])  # last step: right edge
    ticks = nice_ticks(2.0, 2.9)  # the loss range: min 2.0 (step 100), max 2.9 (step 10)
    panel = Panel(area["x"], area["y"], area["width"], area["height"], 0, 100,
                  ticks[0], ticks[-1])
    assert train[0] == pytest.approx(panel.px(10, 2.9), abs=0.01)  # the max loss
    assert area["y"] <= train[0][1] == min(y for _, y in train + evals)  # highest on screen
    assert train[-1] == pytest.approx(panel.px(100, 2.0), abs=0.01)


def test_accuracy_panel_only_when_measured(tmp_path):
    recs = _records(accuracy=True)
    recs[0]["eval_accuracy"] = None  # the base eval was not measured
    root = _render(tmp_path, recs)
    loss_area, acc_area = _areas(root)
    assert acc_area["y"] > loss_area["y"] + loss_area["height"]  # below the loss panel
    acc = _points(root, "eval-accuracy")
    assert len(acc) == 2 == len(root.findall(f"{NS}circle[@class='eval-accuracy']"))
    bottom = acc_area["y"] + acc_area["height"]
    assert acc[-1][1] == pytest.approx(bottom - 0.5 * acc_area["height"])  # 50% at step 100
    assert {"0%", "50%", "100%"} <= {t.text for t in root.iter(f"{NS}text")}
    assert float(root.get("height")) > 340


def test_non_finite_values_are_skipped(tmp_path):
    recs = _records() + [{"type": "train", "step": 110, "loss": float("nan")},
                         {"type": "train", "step": 120, "loss": float("inf")},
                         {"type": "train", "step": 130, "loss": None},
                         {"type": "train", "step": None, "loss": 1.0},
                         {"type": "train", "loss": 1.0},
                         {"type": "eval", "step": 140, "eval_loss": -math.inf,
                          "eval_accuracy": float("nan")}]
    root = _render(tmp_path, recs)
    assert len(_points(root, "train-loss")) == 10 and len(_points(root, "eval-loss")) == 3
    assert len(_areas(root)) == 1  # a NaN accuracy is no accuracy


@pytest.mark.parametrize("records", [[], [{"type": "train", "step": 1, "loss": float("nan")}],
                                     [{"type": "eval", "step": 0, "eval_loss": None}],
                                     [{"type": "summary", "loss": 1.0}]])
def test_nothing_finite_writes_nothing(tmp_path, records):
    path = tmp_path / "plot.svg"
    assert write_training_plot(records, path) is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("records", [
    [{"type": "eval", "step": 0, "eval_loss": 2.0, "base": True}],  # one point, step 0
    [{"type": "train", "step": s, "loss": 1.5} for s in (5, 10, 15)],  # all equal
    [{"type": "train", "step": 0, "loss": v} for v in (1.0, 2.0)],  # steps all 0
    [{"type": "train", "step": 0, "loss": 0.0}, {"type": "eval", "step": 0, "eval_accuracy": 1.0}],
])
def test_degenerate_ranges(tmp_path, records):
    root = _render(tmp_path, records)
    circles = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(f"{NS}circle")
               if c.get("class")]
    lines = [pt for line in root.iter(f"{NS}polyline") for pt in _points(root, line.get("class"))]
    assert lines
    for line in root.iter(f"{NS}polyline"):  # a one-point line draws nothing: it gets a marker
        cls = line.get("class")
        assert len(_points(root, cls)) > 1 or root.find(f"{NS}circle[@class='{cls}']") is not None
    for x, y in lines + circles:  # finite, and inside a plot area
        assert any(a["x"] <= x <= a["x"] + a["width"] and a["y"] <= y <= a["y"] + a["height"]
                   for a in _areas(root))


def test_text_is_escaped(tmp_path):
    root = _render(tmp_path, _records(), title='loss <&> "run"')
    assert root.find(f"{NS}title").text == 'loss <&> "run"'
    assert 'loss <&> "run"' in [t.text for t in root.iter(f"{NS}text")]


def test_written_atomically(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plot, "write_bytes_atomic", lambda p, data: calls.append((p, data)))
    assert write_training_plot(_records(), tmp_path / "plot.svg")
    assert calls[0][0] == tmp_path / "plot.svg" and calls[0][1].startswith(b"<?xml")


def test_nice_ticks():
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.93, 3.21) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert nice_ticks(0, 7, integer=True) == [0, 2, 4, 6, 8]
    assert nice_ticks(0, 2, integer=True) == [0, 1, 2]  # never a fractional step
    ticks = nice_ticks(1.5, 1.5)  # an empty range is widened
    assert ticks[0] < 1.5 < ticks[-1]
    assert nice_ticks(0, 0, integer=True) == [-1, 0, 1]
