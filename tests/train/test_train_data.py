"""The data of a training run: its identity with or without --eval-file, train/eval leaks, options that do
not apply, and `aios hrm-hf eval` computing what the run's own evaluation computed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from aios.bundle import TRAINING_ARGS, BrainBundle
from aios.cli import main as cli_main
from aios.config import TrainingConfig
from aios.errors import AiosError
from aios.train import launch
from aios.train.checkpoint import read_state as load_state
from aios.train.precision import autocast_dtype, dtype_name

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


# ---- train/eval leaks -----------------------------------------------------------------------------------

@pytest.fixture
def plays_dir(tmp_path: Path, small_text: Path) -> Path:
    folder = tmp_path / "plays"
    folder.mkdir()
    shutil.copy(small_text, folder / "a.txt")
    (folder / "b.txt").write_text(EVAL_TEXT.read_text()[:20_000])
    return folder


@pytest.mark.parametrize("how", ["the same file", "a file inside the directory", "a file the glob matches",
                                 "a byte-identical copy"])
def test_an_eval_file_that_is_part_of_the_training_data_is_refused_before_training(make_config, plays_dir,
                                                                                  tmp_path, how):
    dataset, eval_file = {
        "the same file": (plays_dir / "a.txt", plays_dir / "a.txt"),
        "a file inside the directory": (plays_dir, plays_dir / "b.txt"),
        "a file the glob matches": (plays_dir / "*.txt", plays_dir / "b.txt"),
        "a byte-identical copy": (plays_dir, tmp_path / "copy.txt"),
    }[how]
    if how == "a byte-identical copy":
        shutil.copy(plays_dir / "a.txt", eval_file)
    config = make_config(dataset_file=str(dataset), eval_file=str(eval_file))
    with pytest.raises(AiosError) as info:
        launch(config)
    message = str(info.value)
    assert message.startswith(f"--eval-file: '{eval_file}' is part of the training data")
    assert message.endswith("pass text that is not in the training data to --eval-file")
    assert not Path(config.bundle_dir).exists()  # refused before anything of the run was written


def test_a_leak_is_one_red_line_and_exit_2_through_the_command(make_config, small_text, tmp_path, capsys):
    config = make_config(eval_file=str(small_text))
    code = cli_main.main(["hrm-hf", "train-actv1", *config.to_cli_args()])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --eval-file:") and len(err.strip().splitlines()) == 1
    assert not Path(config.bundle_dir).exists()


# ---- options that do not apply to the data's formats ---------------------------------------------------

@pytest.fixture
def rows_jsonl(tmp_path: Path, small_text: Path) -> Path:
    lines = [line for line in small_text.read_text().splitlines() if line.strip()]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": line, "body": line.upper()}) + "\n" for line in lines))
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no effect" in r.getMessage()]


def test_text_field_on_txt_data_warns_and_keeps_the_fingerprint(make_config, caplog):
    plain = launch(make_config(steps=1, brain_name="plain"))
    with caplog.at_level(logging.WARNING):
        field = launch(make_config(steps=1, brain_name="field", text_field="body"))
    assert warnings_of(caplog) == [f"--text-field body has no effect: it only applies to .jsonl/.csv files and "
                                   f"'{make_config().dataset_file}' has none; drop --text-field"]
    assert train_fingerprint(field.bundle) == train_fingerprint(plain.bundle)


def test_text_mode_on_jsonl_data_warns_and_keeps_the_fingerprint(make_config, rows_jsonl, caplog):
    lines = launch(make_config(steps=1, brain_name="lines", dataset_file=str(rows_jsonl)))
    with caplog.at_level(logging.WARNING):
        document = launch(make_config(steps=1, brain_name="document", dataset_file=str(rows_jsonl),
                                      text_mode="document"))
    [warning] = warnings_of(caplog)
    assert warning.startswith("--text-mode document has no effect: it only applies to .txt files")
    assert train_fingerprint(document.bundle) == train_fingerprint(lines.bundle)


def test_an_option_that_applies_to_the_eval_file_only_is_not_warned_about(make_config, rows_jsonl, tmp_path,
                                                                           caplog):
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(json.dumps({"body": EVAL_TEXT.read_text()}) + "\n")
    with caplog.at_level(logging.WARNING):
        result = launch(make_config(steps=1, eval_file=str(held_out), text_field="body"))
    assert warnings_of(caplog) == []
    assert result.final_eval["sequences"] > 0  # the eval file was read through field "body"


# ---- `aios hrm-hf eval` evaluates as the run did ----------------------------------------------------------

def eval_command(capsys, *args: str) -> dict:
    code = cli_main.main(["hrm-hf", "eval", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("amp", [False, True])
def test_eval_of_the_runs_eval_file_reports_the_runs_last_eval(make_config, capsys, amp):
    # Every eval setting differs from the defaults of the eval command, so none of them may be lost.
    config = make_config(eval_file=str(EVAL_TEXT), text_mode="document", batch_size=3, eval_batches=3, amp=amp,
                         steps=4)
    result = launch(config)
    final = records(result.bundle / "metrics.jsonl", "eval")[-1]
    assert final["step"] == 4 and final["sequences"] == 9

    out = eval_command(capsys, "--brain", str(result.bundle), "--eval-file", str(EVAL_TEXT), "--data-cache-dir",
                       config.data_cache_dir)
    assert out["settings"] == {"text_mode": "document", "text_field": "text", "ascii_only": False, "batch_size": 3,
                               "eval_batches": 3, "autocast": "bf16" if amp else "float32"}
    assert abs(out["loss"] - final["loss"]) <= 1e-9
    for key in ("token_accuracy", "q_halt_segments", "sequences", "tokens"):
        assert out[key] == pytest.approx(final[key], abs=1e-9), key

    # A typed flag wins over the run's setting.
    fewer = eval_command(capsys, "--brain", str(result.bundle), "--eval-file", str(EVAL_TEXT), "--data-cache-dir",
                         config.data_cache_dir, "--eval-batches", "1", "--no-amp")
    assert fewer["sequences"] == 3 and fewer["settings"]["autocast"] == "float32"
    if amp:  # bf16 autocast changes the numbers, so taking it from the run is what makes them equal
        full = eval_command(capsys, "--brain", str(result.bundle), "--eval-file", str(EVAL_TEXT),
                            "--data-cache-dir", config.data_cache_dir, "--no-amp")
        assert abs(full["loss"] - final["loss"]) > 1e-6


def test_eval_of_a_bundle_without_training_args_uses_the_training_defaults(make_config, capsys):
    result = launch(make_config(steps=1, text_mode="document", batch_size=2, eval_batches=1))
    (result.bundle / TRAINING_ARGS).unlink()
    out = eval_command(capsys, "--brain", str(result.bundle), "--eval-file", str(EVAL_TEXT), "--data-cache-dir",
                       make_config().data_cache_dir, "--device", "cpu")
    defaults = TrainingConfig()
    assert out["settings"] == {
        "text_mode": defaults.text_mode, "text_field": defaults.text_field, "ascii_only": defaults.ascii_only,
        "batch_size": defaults.batch_size, "eval_batches": defaults.eval_batches,
        "autocast": dtype_name(autocast_dtype(defaults.amp, defaults.amp_dtype, torch.device("cpu"))),
    }
    assert out["sequences"] == defaults.batch_size * defaults.eval_batches

    # A training_args.json with a value the trainer would refuse is a user error naming the file.
    (result.bundle / TRAINING_ARGS).write_text(json.dumps({"text_mode": "pages"}))
    code = cli_main.main(["hrm-hf", "eval", "--brain", str(result.bundle), "--eval-file", str(EVAL_TEXT)])
    err = capsys.readouterr().err
    assert code == 2 and f"{result.bundle / TRAINING_ARGS}: --text-mode" in err and len(err.strip().splitlines()) == 1
