"""Training curves of a brain bundle: `metrics.jsonl` -> `training_curves.png`.

Two panels over the optimizer step: the training token loss (`lm_loss`) of every step with the eval loss
of every evaluation (the same quantity), and the mean ACT segments of the samples that halted at each step (with M, the most a
sample can take). A step logged twice, by an attempt that crashed after its last checkpoint and the
attempt that resumed from it (logs from before MetricsLog trimmed them on resume), is one point: the
last record of each (event, step) counts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from aios.atomic import atomic_write
from aios.bundle import METRICS
from aios.errors import AiosError
from aios.models.hrm_act_v1 import CONFIG_NAME

log = logging.getLogger(__name__)

PLOT_NAME = "training_curves.png"


@dataclass
class TrainingCurves:
    """The series that `draw_training_curves` plots, each as parallel lists of steps and values."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)  # step records whose loss was null
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    segment_steps: list[int] = field(default_factory=list)
    segments: list[float] = field(default_factory=list)


def read_training_curves(metrics_path: str | Path) -> TrainingCurves:
    """The curves in a metrics.jsonl file; AiosError when it is missing or has no step records."""
    path = Path(metrics_path)
    if not path.is_file():
        raise AiosError(f"no {path.name} in {path.parent}: train the brain first (`aios hrm-hf train-actv1 "
                        f"--brain-name {path.parent.name}`); a run with --log-file wrote its metrics there instead")
    last: dict[tuple[str, int], dict] = {}
    unreadable = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # e.g. the half-written last line of a killed run
            unreadable += 1
            continue
        if isinstance(record, dict) and record.get("event") in ("step", "eval") and _is_step(record.get("step")):
            last[(record["event"], record["step"])] = record
    if unreadable:
        log.warning("%s: skipped %d line(s) that are not JSON", path, unreadable)
    curves = TrainingCurves()
    for (event, step), record in sorted(last.items(), key=lambda item: (item[0][1], item[0][0])):
        # Training: the token cross-entropy (lm_loss), the same quantity as the eval loss; logs from before
        # lm_loss was recorded have only the total loss.
        train_loss = record.get("lm_loss", record.get("loss")) if record.get("loss") is not None else None
        loss = _number(record.get("loss") if event == "eval" else train_loss)
        segments = _number(record.get("segments"))
        if event == "eval":
            if loss is not None:
                curves.eval_steps.append(step)
                curves.eval_loss.append(loss)
            continue
        if loss is None:
            curves.nonfinite_steps.append(step)
        else:
            curves.train_steps.append(step)
            curves.train_loss.append(loss)
        if segments is not None:
            curves.segment_steps.append(step)
            curves.segments.append(segments)
    if not curves.train_steps and not curves.nonfinite_steps:
        raise AiosError(f"{path} has no training steps yet: plot once the run has logged a step")
    return curves


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def draw_training_curves(curves: TrainingCurves, *, title: str, max_segments: int | None = None):
    """A matplotlib Figure of `curves` (Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, segment_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    figure.suptitle(title)

    train_label = "train loss (token cross-entropy of each step's segment)"
    if curves.nonfinite_steps:
        train_label += f"; {len(curves.nonfinite_steps)} non-finite step(s) not shown"
    loss_axes.plot(curves.train_steps, curves.train_loss, color="tab:blue", linewidth=1, label=train_label)
    if curves.eval_steps:
        loss_axes.plot(curves.eval_steps, curves.eval_loss, color="tab:orange", marker="o", linewidth=1.5,
                       label="eval loss (token cross-entropy after M segments)")
    loss_axes.set_ylabel("loss (nats)")
    loss_axes.grid(alpha=0.3)
    _legend_above(loss_axes)

    segment_axes.plot(curves.segment_steps, curves.segments, color="tab:green", marker=".", markersize=3,
                      linewidth=0.8, label="mean segments of the samples that halted")
    if max_segments:
        segment_axes.axhline(max_segments, color="grey", linestyle="--", linewidth=1,
                             label=f"M = {max_segments} (--halt-max-steps)")
        segment_axes.set_ylim(0, max_segments + 0.5)
    segment_axes.set_ylabel("ACT segments per sample")
    segment_axes.set_xlabel("optimizer step")
    segment_axes.grid(alpha=0.3)
    _legend_above(segment_axes)
    return figure


def _legend_above(axes) -> None:
    """Above the panel, never over the curves (dense ones leave no empty corner)."""
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=2, frameon=False, fontsize="small",
                borderaxespad=0.2)


def plot_training_curves(bundle_root: Path, metrics_path: Path | None = None) -> Path:
    """Write `<bundle_root>/training_curves.png` from its metrics.jsonl (or `metrics_path`, a run's
    --log-file) and return the PNG's path.

    The PNG is replaced atomically. Raises AiosError when there are no metrics or no steps yet.
    """
    bundle_root = Path(bundle_root)
    curves = read_training_curves(metrics_path or bundle_root / METRICS)
    figure = draw_training_curves(curves, title=f"{bundle_root.name}: training curves",
                                  max_segments=_halt_max_steps(bundle_root))
    target = bundle_root / PLOT_NAME
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png"))
    return target


def _halt_max_steps(bundle_root: Path) -> int | None:
    try:
        value = json.loads((bundle_root / CONFIG_NAME).read_text()).get("halt_max_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return value if _is_step(value) and value > 0 else None
