"""Training curves: metrics.jsonl -> the series plotted -> training_curves.png in the bundle."""

from __future__ import annotations

import json
import struct

import pytest

from aios.bundle.plot import PLOT_NAME, draw_training_curves, plot_training_curves, read_training_curves
from aios.errors import AiosError

# A run that crashed after step 3 and was resumed from its step-1 checkpoint: steps 2 and 3 appear twice,
# and only their second records count. Step 4's loss was non-finite; the killed run left half a line.
RECORDS = [
    {"event": "start", "step": 0},
    {"event": "step", "step": 1, "loss": 5.0, "segments": None},
    {"event": "step", "step": 2, "loss": 4.0, "segments": 2.0},
    {"event": "eval", "step": 2, "loss": 4.6},
    {"event": "step", "step": 3, "loss": None, "segments": 3.0},
    {"event": "start", "step": 1},
    {"event": "step", "step": 2, "loss": 3.9, "segments": 1.5},
    {"event": "eval", "step": 2, "loss": 4.5},
    {"event": "step", "step": 3, "loss": 3.5, "segments": None},
    {"event": "checkpoint", "step": 3, "path": "checkpoints/step-000003"},
    {"event": "step", "step": 4, "loss": None, "segments": 2.5},
    {"event": "eval", "step": 4, "loss": 4.25},
]


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "brain"
    root.mkdir()
    lines = [json.dumps(record) for record in RECORDS]
    (root / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "step", "st')
    (root / "config.json").write_text(json.dumps({"model_type": "hrm_act_v1", "halt_max_steps": 4}))
    return root


def test_the_last_record_of_each_step_counts_and_nulls_are_left_out(bundle, caplog):
    curves = read_training_curves(bundle / "metrics.jsonl")
    assert "skipped 1 line(s) that are not JSON" in caplog.text
    assert (curves.train_steps, curves.train_loss) == ([1, 2, 3], [5.0, 3.9, 3.5])
    assert curves.nonfinite_steps == [4]
    assert (curves.eval_steps, curves.eval_loss) == ([2, 4], [4.5, 4.25])
    assert (curves.segment_steps, curves.segments) == ([2, 4], [1.5, 2.5])


def test_the_figure_plots_exactly_those_series(bundle):
    curves = read_training_curves(bundle / "metrics.jsonl")
    figure = draw_training_curves(curves, title="brain", max_segments=4)
    loss_axes, segment_axes = figure.axes
    train, evaluation = loss_axes.lines
    assert train.get_xydata().tolist() == [[1, 5.0], [2, 3.9], [3, 3.5]]
    assert evaluation.get_xydata().tolist() == [[2, 4.5], [4, 4.25]]
    segments, limit = segment_axes.lines
    assert segments.get_xydata().tolist() == [[2, 1.5], [4, 2.5]]
    assert list(limit.get_ydata()) == [4, 4]  # the M line
    assert segment_axes.get_ylim() == (0, 4.5)
    assert "1 non-finite step(s) not shown" in train.get_label()
    assert [text.get_text() for text in loss_axes.get_legend().get_texts()] == [train.get_label(),
                                                                                  evaluation.get_label()]
    assert segment_axes.get_xlabel() == "optimizer step" and loss_axes.get_ylabel() == "loss (nats)"


def test_plot_writes_a_png_into_the_bundle_atomically(bundle):
    (bundle / PLOT_NAME).write_bytes(b"an older plot")
    path = plot_training_curves(bundle)
    assert path == bundle / PLOT_NAME
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (900, 700)
    assert len(data) > 20_000  # axes, lines, text: not an empty canvas
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "metrics.jsonl", PLOT_NAME]  # no temp file


def test_a_bundle_without_metrics_is_a_user_error_naming_the_fix(tmp_path):
    with pytest.raises(AiosError) as info:
        plot_training_curves(tmp_path)
    assert "no metrics.jsonl in" in str(info.value) and "aios hrm-hf train-actv1" in str(info.value)
    assert not (tmp_path / PLOT_NAME).exists()


def test_metrics_without_steps_are_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    with pytest.raises(AiosError, match="no training steps yet"):
        plot_training_curves(tmp_path)


def test_the_train_curve_is_the_token_loss_the_eval_loss_compares_with(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"event": "step", "step": 1, "loss": 7.5, "lm_loss": 7.0, "segments": 1.0},
        {"event": "step", "step": 2, "loss": None, "lm_loss": None, "segments": None},
        {"event": "eval", "step": 2, "loss": 6.9}]) + "\n")
    curves = read_training_curves(metrics)
    assert (curves.train_steps, curves.train_loss, curves.nonfinite_steps) == ([1], [7.0], [2])
