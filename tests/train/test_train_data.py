"""The data of a training run: its identity with or without --eval-file."""

from __future__ import annotations

import json
from pathlib import Path

from aios.bundle import BrainBundle
from aios.train import launch
from aios.train.checkpoint import load_state

EVAL_TEXT = Path(__file__).resolve().parents[2] / "training_data" / "eval_test_dataset.txt"


def records(path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def train_fingerprint(bundle: Path) -> str:
    return BrainBundle(bundle).metadata()["datasets"]["train"]["fingerprint"]


# ---- the training data does not depend on --eval-file ------------------------------------------------------

def test_adding_then_removing_eval_file_on_resume_keeps_the_training_data(make_config):
    config = make_config(steps=3)
    first = launch(config)
    fingerprint = load_state(first.bundle / "checkpoints" / "step-000003")["dataset_fingerprint"]
    start = records(first.bundle / "metrics.jsonl", "start")[-1]

    with_eval = launch(config.replace(steps=5, eval_file=str(EVAL_TEXT), resume=True))  # accepted
    assert with_eval.step == 5
    resumed = records(with_eval.bundle / "metrics.jsonl", "start")[-1]
    assert resumed["resumed_from"].endswith("step-000003")
    assert resumed["train_sequences"] == start["train_sequences"]
    assert resumed["eval_sequences"] > start["eval_sequences"]  # the whole eval file, not the 5% tail
    assert load_state(with_eval.bundle / "checkpoints" / "step-000005")["dataset_fingerprint"] == fingerprint
    meta = BrainBundle(with_eval.bundle).metadata()["datasets"]
    assert meta["train"]["fingerprint"] == fingerprint and meta["eval"]["source"] == str(EVAL_TEXT)

    without = launch(config.replace(steps=6, resume=True))  # and back
    assert without.step == 6
    assert load_state(without.bundle / "checkpoints" / "step-000006")["dataset_fingerprint"] == fingerprint
    assert records(without.bundle / "metrics.jsonl", "start")[-1]["eval_sequences"] == start["eval_sequences"]
