"""The real `aios` console script end to end: train, signal stop, generate, eval, brains, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AIOS = [sys.executable, "-m", "aios.cli.main"]
TINY = ["--config", "config/train/demo-cpu.yaml", "--hidden-size", "32", "--num-heads", "2", "--max-seq-len", "16",
        "--batch-size", "4", "--eval-batches", "1", "--checkpoint-every", "0", "--eval-every", "0", "--no-progress",
        "--launcher", "local"]  # in this process: these tests are about the CLI (tests/cluster run it on Ray)


def aios(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([*AIOS, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "COLUMNS": "200"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("e2e")
    dirs = {"bundle_dir": out / "brains", "cache": out / "cache"}
    result = aios("hrm-hf", "train-actv1", *TINY, "--steps", 3, "--bundle-dir", dirs["bundle_dir"],
                  "--data-cache-dir", dirs["cache"], "--brain-name", "e2e")
    return {**dirs, "stdout": result.stdout}


def test_train_prints_a_summary_and_writes_the_bundle(trained):
    assert "steps: 3 steps" in trained["stdout"] and "eval loss" in trained["stdout"]
    assert f"training curves: {trained['bundle_dir'] / 'e2e' / 'training_curves.png'}" in trained["stdout"]
    root = trained["bundle_dir"] / "e2e"
    assert (root / "model.safetensors").is_file() and (root / "checkpoints" / "step-000003" / "COMPLETE").is_file()


def test_generate_continues_the_prompt(trained):
    result = aios("hrm-hf", "generate", "--brain", "e2e", "--bundle-dir", trained["bundle_dir"], "--prompt",
                  "ROMEO:", "--max-new-tokens", 8, "--seed", 1)
    assert result.stdout.startswith("ROMEO:")
    assert "ACT segments per token" in result.stderr


def test_eval_prints_json_metrics(trained):
    result = aios("hrm-hf", "eval", "--brain", trained["bundle_dir"] / "e2e", "--eval-file",
                  "training_data/eval_test_dataset.txt", "--eval-batches", 2, "--batch-size", 4,
                  "--data-cache-dir", trained["cache"])
    metrics = json.loads(result.stdout)
    assert metrics["sequences"] == 8 and metrics["tokens"] == 8 * 16
    assert 0 < metrics["loss"] < 20 and metrics["perplexity"] > 1


def test_brains_list_and_show(trained):
    listing = aios("brains", "list", "--bundle-dir", trained["bundle_dir"]).stdout
    assert "e2e" in listing and "ok" in listing
    shown = json.loads(aios("brains", "show", "e2e", "--bundle-dir", trained["bundle_dir"], "--json").stdout)
    assert shown["metadata"]["steps"] == 3
    assert shown["checkpoints"] == [{"name": "step-000003", "status": "complete"}]
    assert shown["config"]["model_type"] == "hrm_act_v1"


def table_rows(text: str) -> dict[str, str]:
    """label -> value of the two-column tables `brains show` prints (wrapped values joined)."""
    rows: dict[str, str] = {}
    label = None
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) != 2:
            label = None
            continue
        if cells[0]:
            label = cells[0]
            rows.setdefault(label, cells[1])
        elif label:
            rows[label] += " " + cells[1]
    return rows


def test_brains_show_prints_a_summary_of_the_json(trained):
    info = json.loads(aios("brains", "show", "e2e", "--bundle-dir", trained["bundle_dir"], "--json").stdout)
    text = aios("brains", "show", "e2e", "--bundle-dir", trained["bundle_dir"]).stdout
    rows, meta, config = table_rows(text), info["metadata"], info["config"]
    assert rows["name"] == "e2e" and rows["path"] == info["path"]
    assert rows["steps"] == "3" and rows["parameters"] == f"{meta['parameters']:,}"
    assert rows["sample tokens seen"] == f"{meta['sample_tokens_seen']:,}"
    assert rows["segment tokens seen"] == f"{meta['segment_tokens_seen']:,}"
    assert rows["eval loss"] == f"{meta['last_eval']['loss']:.3f} (step 3)"
    assert rows["eval perplexity"] == f"{meta['last_eval']['perplexity']:.1f}"
    assert rows["tokenizer"] == f"{meta['tokenizer']['name']} ({meta['tokenizer']['fingerprint'][:12]})"
    train, held_out = meta["datasets"]["train"], meta["datasets"]["eval"]
    assert rows["train data"] == f"{train['source']} ({train['fingerprint'][:12]})"
    assert rows["eval data"] == f"{held_out['source']} ({held_out['fingerprint'][:12]})"
    assert (rows["hidden size D"], rows["heads"]) == ("32", "2")
    assert rows["layers H / L"] == f"{config['H_layers']} / {config['L_layers']}"
    assert rows["M (halt max steps)"] == str(config["halt_max_steps"]) and rows["MoE"] == "off"
    assert rows["trained by"] == "local, 1 worker"  # TINY runs in-process
    tracker = info["chunk_tracker_state"]
    assert rows["partitions"] == str(tracker["partitions"]) == "4"  # the global batch: --batch-size 4
    passes = tracker["sequences_consumed"] / tracker["total_train_sequences"]
    assert rows["sequences consumed"] == (f"{tracker['sequences_consumed']:,} ({passes:.2f} passes over "
                                          f"{tracker['total_train_sequences']:,})")
    assert "step-000003" in text and "complete" in text


def test_brains_show_of_an_older_bundle_shows_dashes_for_what_it_lacks(trained, tmp_path):
    import shutil

    old = tmp_path / "brains" / "old"
    shutil.copytree(trained["bundle_dir"] / "e2e", old, ignore=shutil.ignore_patterns("checkpoints"))
    (old / "metadata.json").write_text(json.dumps({"name": "old", "steps": 7, "last_eval": None, "tokens_seen": 448}))
    (old / "chunk_tracker_state.json").unlink()
    config = json.loads((old / "config.json").read_text())
    del config["use_moe"], config["H_cycles"], config["L_cycles"]
    (old / "config.json").write_text(json.dumps(config))
    text = aios("brains", "show", "old", "--bundle-dir", tmp_path / "brains").stdout
    rows = table_rows(text)
    assert rows["steps"] == "7" and rows["segment tokens seen"] == "448"  # its older name
    for label in ("parameters", "sample tokens seen", "eval loss", "eval perplexity", "created", "tokenizer",
                  "train data", "MoE", "cycles H / L", "epoch", "sequences consumed"):
        assert rows[label] == "-", label
    assert re.search(r"│ -\s+│ none\s+│", text)  # no checkpoints


def test_brains_plot_writes_the_curves_of_the_metrics_into_the_bundle(trained):
    from aios.bundle.plot import read_training_curves

    root = trained["bundle_dir"] / "e2e"
    result = aios("brains", "plot", "e2e", "--bundle-dir", trained["bundle_dir"])
    assert result.stdout.strip() == str(root / "training_curves.png")
    data = (root / "training_curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    curves = read_training_curves(root / "metrics.jsonl")
    assert curves.train_steps == [1, 2, 3] and curves.train_loss == [r["lm_loss"] for r in steps]
    assert curves.eval_steps == [3] and curves.eval_loss == [r["loss"] for r in records if r["event"] == "eval"]
    assert curves.segments == [r["segments"] for r in steps if r["segments"] is not None]


def test_brains_plot_without_metrics_is_one_line_naming_the_fix(trained, tmp_path):
    import shutil

    shutil.copytree(trained["bundle_dir"] / "e2e", tmp_path / "brains" / "bare",
                    ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    result = aios("brains", "plot", "bare", "--bundle-dir", tmp_path / "brains", check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "no metrics.jsonl in" in result.stderr and "aios hrm-hf train-actv1 --brain-name bare" in result.stderr


@pytest.mark.parametrize("args", [
    ["hrm-hf", "train-actv1", *TINY, "--hidden-size", "33"],
    ["brains", "show", "no-such-brain"],
])
def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, args):
    where = ["--bundle-dir", tmp_path]
    plain = aios(*args, *where, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for debug_args in ([*args, *where, "--debug"], ["--debug", *args, *where]):
        debug = aios(*debug_args, check=False)
        assert debug.returncode != 0
        assert "Traceback" in debug.stderr and "aios.errors.AiosError" in debug.stderr, debug.stderr
    assert not any(tmp_path.iterdir())


def test_a_brain_name_starting_with_a_dot_is_refused_by_every_brains_command(trained, tmp_path):
    import shutil

    shutil.copytree(trained["bundle_dir"] / "e2e", tmp_path / ".hidden")  # e.g. made before names were checked
    assert "no brain bundles" in aios("brains", "list", "--bundle-dir", tmp_path).stdout
    for args in (["brains", "show", ".hidden"], ["hrm-hf", "generate", "--brain", ".hidden"]):
        result = aios(*args, "--bundle-dir", tmp_path, check=False)
        assert result.returncode == 2 and "'.hidden' is not a brain name" in result.stderr, result.stderr
    by_path = aios("brains", "show", tmp_path / ".hidden", "--json")  # its path still opens it
    assert json.loads(by_path.stdout)["metadata"]["steps"] == 3


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(tmp_path):
    bundle_dir = tmp_path / "brains"
    process = subprocess.Popen(
        [*AIOS, "hrm-hf", "train-actv1", *TINY, "--steps", "100000", "--bundle-dir", str(bundle_dir),
         "--data-cache-dir", str(tmp_path / "cache"), "--brain-name", "sig"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = bundle_dir / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"event": "step"' in metrics.read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.startswith("stop: ")
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    stop = next(e for e in events if e["event"] == "stop")
    assert stop["reason"] == "SIGTERM"
    assert (bundle_dir / "sig" / "checkpoints" / f"step-{stop['step']:06d}" / "COMPLETE").is_file()


@pytest.mark.parametrize("args, message", [
    (["--dataset-file", "no/such.txt"], "--dataset-file: file 'no/such.txt' does not exist"),
    (["--hidden-size", "33"], "--hidden-size: 33 is not divisible by --num-heads 2"),
    (["--brain-name", "../escape"], "--brain-name '../escape' is not a single directory name"),
    (["--brain-name", ".hidden"], "--brain-name '.hidden' starts with '.', which would hide it from `aios brains list`"),
    (["--world-size", "2"], "--world-size 2 needs --launcher ray"),
    (["--parallel-independent"], "--parallel-independent is not supported"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
])
def test_bad_input_is_one_red_line_and_exit_2(tmp_path, args, message):
    result = aios("hrm-hf", "train-actv1", *TINY, "--bundle-dir", tmp_path, *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flag", ["--bundle-dir", "--data-cache-dir", "--log-file"])
def test_output_paths_of_the_wrong_kind_are_refused(tmp_path, flag):
    target = tmp_path / "target"
    if flag == "--log-file":
        target.mkdir()
    else:
        target.write_text("a file")
    extra = [] if flag == "--bundle-dir" else ["--bundle-dir", tmp_path / "brains"]
    result = aios("hrm-hf", "train-actv1", *TINY, *extra, flag, target, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("is a directory" if flag == "--log-file" else "is a file") in result.stderr


def test_brains_list_survives_a_corrupt_metadata_file(trained, tmp_path):
    import shutil

    copy = tmp_path / "brains"
    shutil.copytree(trained["bundle_dir"] / "e2e", copy / "broken")
    shutil.copytree(trained["bundle_dir"] / "e2e", copy / "fine")
    (copy / "broken" / "metadata.json").write_text("{not json")
    listing = aios("brains", "list", "--bundle-dir", copy).stdout
    assert "broken" in listing and "fine" in listing and "not valid JSON" in listing
    shown = aios("brains", "show", "broken", "--bundle-dir", copy, check=False)
    assert shown.returncode == 2 and "metadata.json is not valid JSON" in shown.stderr


def test_binary_dataset_is_refused_without_touching_the_bundle(tmp_path, trained):
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\x00\x01\x02" * 1000)
    root = trained["bundle_dir"] / "e2e"
    before = (root / "model.safetensors").read_bytes()
    result = aios("hrm-hf", "train-actv1", *TINY, "--bundle-dir", trained["bundle_dir"], "--brain-name", "e2e",
                  "--resume", "--steps", 5, "--dataset-file", binary, "--data-cache-dir", trained["cache"],
                  check=False)
    assert result.returncode == 2 and "binary" in result.stderr
    assert "Traceback" not in result.stderr
    assert (root / "model.safetensors").read_bytes() == before


def test_generate_on_something_that_is_not_a_bundle(tmp_path):
    (tmp_path / "junk").mkdir()
    result = aios("hrm-hf", "generate", "--brain", "junk", "--bundle-dir", tmp_path, check=False)
    assert result.returncode == 2 and "is not a brain bundle" in result.stderr


@pytest.mark.parametrize("flag, where, reason", [
    ("--bundle-dir", "/proc/aios-test/brains", "cannot create it"),
    ("--data-cache-dir", "{file}/cache", "cannot create it (Not a directory)"),
    ("--log-file", "{file}/logs/run.jsonl", "cannot create it (Not a directory)"),
])
def test_output_paths_that_cannot_be_created_are_one_line(tmp_path, flag, where, reason):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    path = where.format(file=a_file)
    extra = [] if flag == "--bundle-dir" else ["--bundle-dir", tmp_path / "brains"]
    result = aios("hrm-hf", "train-actv1", *TINY, *extra, flag, path, check=False)
    assert result.returncode == 2, result.stderr
    assert f"{flag} " in result.stderr and reason in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_resume_with_steps_already_reached_says_so_and_exits_zero(trained):
    root = trained["bundle_dir"] / "e2e"
    before = (root / "training_args.json").read_text()
    result = aios("hrm-hf", "train-actv1", *TINY, "--steps", 2, "--resume", "--bundle-dir", trained["bundle_dir"],
                  "--data-cache-dir", trained["cache"], "--brain-name", "e2e")
    assert result.stdout.strip() == ("brain 'e2e' is at step 3; --steps 2 is already reached: nothing to train "
                                     "(pass a larger --steps to continue it)")
    assert (root / "training_args.json").read_text() == before


def test_sigterm_before_training_starts_exits_cleanly(tmp_path):
    """SIGTERM while the data is being prepared (6 MB of text take seconds): a message and exit 0, no half
    dataset and no bundle left behind."""
    cache, bundle_dir = tmp_path / "cache", tmp_path / "brains"
    big = tmp_path / "big.txt"
    big.write_text((REPO / "training_data" / "curated_datasets" / "test_sample.txt").read_text() * 6)
    process = subprocess.Popen(
        [*AIOS, "hrm-hf", "train-actv1", *TINY, "--dataset-file", str(big),
         "--bundle-dir", str(bundle_dir), "--data-cache-dir", str(cache), "--brain-name", "early"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (cache.is_dir() and any(".staging-" in p.name for p in cache.iterdir())):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before its data preparation could be interrupted"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped: SIGTERM before training started; nothing was trained" in stderr
    assert "Traceback" not in stderr
    assert not cache.exists()  # its staging directory removed, then the cache directory the run created
    assert not (bundle_dir / "early").exists()  # no empty brain left behind either
