"""Every hint of the data code names a flag of the command that printed it.

The data code serves `aios hrm-hf train-actv1` (training text and --eval-file), `aios data prepare` and
`aios hrm-hf eval`, whose flags differ. Each data error is triggered through each real command and every
`--flag` in the message is checked against that command's click parameters.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import typer

from aios.cli import main as cli_main
from aios.config import TrainingConfig

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "training_data" / "tokenizers" / "shakespeare-bpe-2k"
SAMPLE = REPO / "training_data" / "curated_datasets" / "test_sample.txt"
SEQ_LEN = 16
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# name: (files to write under the work folder, the source argument, extra flags)
SOURCE_ERRORS = {
    "missing file": ({}, "nope.txt", ()),
    "empty file": ({"empty.txt": b""}, "empty.txt", ()),
    "binary file": ({"blob.txt": b"\x00\x01\x02"}, "blob.txt", ()),
    "not UTF-8": ({"latin1.txt": "naïve\n".encode("latin-1")}, "latin1.txt", ()),
    "unsupported extension": ({"table.xlsx": b"x"}, "table.xlsx", ()),
    "directory without text files": ({"d/readme.md": b"x"}, "d", ()),
    "glob without text files": ({"d/readme.md": b"x"}, "d/*.txt", ()),
    "jsonl line that is not JSON": ({"rows.jsonl": b'{"text": "a"}\nnot json\n'}, "rows.jsonl", ()),
    "jsonl record without the field": ({"rows.jsonl": b'{"body": "a"}\n'}, "rows.jsonl", ()),
    "jsonl field that is not a string": ({"rows.jsonl": b'{"text": 3}\n'}, "rows.jsonl", ()),
    "csv without the column": ({"rows.csv": b"id,body\n1,a\n"}, "rows.csv", ()),
    "no usable text": ({"blank.txt": b"\n  \n\t\n"}, "blank.txt", ()),
    "--ascii-only drops everything": ({"u.txt": "café\nnaïve\n".encode()}, "u.txt", ("--ascii-only",)),
    "shorter than one window": ({"short.txt": b"Hark!\n"}, "short.txt", ()),
}


def command_flags(*path: str) -> set[str]:
    """Every --flag the click command `aios <path>` accepts."""
    command = typer.main.get_command(cli_main.app)
    for name in path:
        command = command.commands[name]
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}


FLAGS = {
    "train-actv1": command_flags("hrm-hf", "train-actv1"),
    "prepare": command_flags("data", "prepare"),
    "eval": command_flags("hrm-hf", "eval"),
}


def test_the_commands_are_found_with_their_own_flags():
    assert {"--eval-file", "--data-cache-dir", "--max-seq-len"} <= FLAGS["train-actv1"]
    assert "--holdout-fraction" not in FLAGS["train-actv1"]
    assert {"--holdout-fraction", "--cache-dir", "--max-seq-len"} <= FLAGS["prepare"]
    assert "--data-cache-dir" not in FLAGS["prepare"] and "--eval-file" not in FLAGS["prepare"]
    assert {"--eval-file", "--data-cache-dir", "--ascii-only", "--amp", "--no-amp"} <= FLAGS["eval"]
    assert "--max-seq-len" not in FLAGS["eval"] and "--dataset-file" not in FLAGS["eval"]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich neither wraps nor truncates


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """Good training text, its prepared cache, and a one-step brain for `aios hrm-hf eval`."""
    from aios.train import launch

    work = tmp_path_factory.mktemp("flags")
    text = work / "plays.txt"
    text.write_text(SAMPLE.read_text()[:20_000])
    cache = work / "cache"
    config = TrainingConfig(
        model=str(TOKENIZER), dataset_file=str(text), max_seq_len=SEQ_LEN, dataset_chunk_size=64,
        data_cache_dir=str(cache), hidden_size=32, num_heads=2, expansion=2.0, h_layers=1, l_layers=1,
        h_cycles=1, l_cycles=1, halt_max_steps=2, batch_size=4, steps=1, eval_batches=1, checkpoint_every=0,
        amp=False, gradient_checkpointing=False, progress=False, bundle_dir=str(work / "brains"), brain_name="tiny",
        launcher="local",
    )
    launch(config)
    return {"text": text, "cache": cache, "brain": work / "brains" / "tiny"}


def train_args(shared: dict, tmp_path: Path, *args: str) -> list[str]:
    return ["hrm-hf", "train-actv1", "--model", str(TOKENIZER), "--max-seq-len", str(SEQ_LEN),
            "--dataset-chunk-size", "64", "--data-cache-dir", str(shared["cache"]), "--hidden-size", "32",
            "--num-heads", "2", "--steps", "1", "--no-progress", "--bundle-dir", str(tmp_path / "brains"),
            "--launcher", "local", *args]


def run(capsys, args: list[str]) -> str:
    """The command's error line, checked to be one red line with exit code 2."""
    code = cli_main.main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("error:") and len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err + captured.out
    return captured.err.strip()


def assert_real_flags(message: str, command: str) -> set[str]:
    named = set(FLAG.findall(message))
    assert named <= FLAGS[command], f"{sorted(named - FLAGS[command])} are not flags of {command}: {message}"
    return named


def write_case(tmp_path: Path, files: dict[str, bytes], source: str) -> str:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return str(tmp_path / source)


@pytest.mark.parametrize("case", SOURCE_ERRORS)
@pytest.mark.parametrize("command, source_flag", [
    ("train-actv1", "--dataset-file"), ("train-actv1", "--eval-file"), ("prepare", "--dataset-file"),
    ("eval", "--eval-file"),
])
def test_each_source_error_names_only_flags_of_its_command(command, source_flag, case, shared, tmp_path, capsys):
    files, source, extra = SOURCE_ERRORS[case]
    source = write_case(tmp_path, files, source)
    if command == "train-actv1":
        data = ["--dataset-file", source] if source_flag == "--dataset-file" else \
            ["--dataset-file", str(shared["text"]), "--eval-file", source]
        args = train_args(shared, tmp_path, *data, *extra)
    elif command == "prepare":
        args = ["data", "prepare", "--dataset-file", source, "--model", str(TOKENIZER), "--max-seq-len",
                str(SEQ_LEN), "--dataset-chunk-size", "64", "--cache-dir", str(tmp_path / "cache"), *extra]
    else:
        args = ["hrm-hf", "eval", "--brain", str(shared["brain"]), "--eval-file", source, "--data-cache-dir",
                str(tmp_path / "cache"), *extra]
    message = run(capsys, args)
    named = assert_real_flags(message, command)
    other_source = {"--dataset-file", "--eval-file"} - {source_flag}
    assert not named & other_source, message  # an --eval-file error never says "pass ... to --dataset-file"
    if case in ("missing file", "directory without text files", "glob without text files", "no usable text"):
        assert source_flag in named, message
    if case in ("jsonl record without the field", "jsonl field that is not a string", "csv without the column"):
        assert "--text-field" in named, message
    if case == "--ascii-only drops everything":
        assert "--ascii-only" in named, message
    if case == "shorter than one window":
        # eval's sequence length is the model's: the fix is more text.
        assert named == ({source_flag} if command == "eval" else {"--max-seq-len", source_flag}), message


def one_window_of_text(tmp_path: Path) -> Path:
    """A .txt file of exactly one window (SEQ_LEN + 1 tokens, or a few more) in lines mode."""
    from aios.tokenizers import load_tokenizer

    per_line = len(load_tokenizer(str(TOKENIZER)).encode("Hark!", add_special_tokens=False)) + 1  # + EOS
    path = tmp_path / "one.txt"
    path.write_text("Hark!\n" * -(-(SEQ_LEN + 1) // per_line))
    return path


def test_a_holdout_that_leaves_nothing_names_the_holdout_flag_only_where_there_is_one(shared, tmp_path, capsys):
    source = one_window_of_text(tmp_path)
    message = run(capsys, train_args(shared, tmp_path, "--dataset-file", str(source)))
    assert "leaves none for training" in message
    assert assert_real_flags(message, "train-actv1") == {"--max-seq-len", "--dataset-file"}

    message = run(capsys, ["data", "prepare", "--dataset-file", str(source), "--model", str(TOKENIZER),
                           "--max-seq-len", str(SEQ_LEN), "--dataset-chunk-size", "64", "--cache-dir",
                           str(tmp_path / "cache"), "--holdout-fraction", "0.5"])
    assert "leaves none for training" in message
    assert assert_real_flags(message, "prepare") == {"--holdout-fraction", "--max-seq-len", "--dataset-file"}


def test_a_cache_that_is_a_file_names_the_cache_flag_of_the_command(shared, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("a file")
    text = str(shared["text"])
    commands = {
        "train-actv1": train_args(shared, tmp_path, "--dataset-file", text, "--data-cache-dir", str(cache)),
        "prepare": ["data", "prepare", "--dataset-file", text, "--model", str(TOKENIZER), "--max-seq-len", "16",
                    "--dataset-chunk-size", "64", "--cache-dir", str(cache)],
        "eval": ["hrm-hf", "eval", "--brain", str(shared["brain"]), "--eval-file", text, "--data-cache-dir",
                 str(cache)],
    }
    for command, args in commands.items():
        message = run(capsys, args)
        assert "is a file" in message
        cache_flag = "--cache-dir" if command == "prepare" else "--data-cache-dir"
        assert f"pass a directory to {cache_flag}" in message or f"{cache_flag} {cache} is a file" in message
        assert_real_flags(message, command)


@pytest.mark.parametrize("args, expected", [
    (["--max-seq-len", "0"], {"--max-seq-len"}),
    (["--dataset-chunk-size", "0"], {"--dataset-chunk-size"}),
    (["--holdout-fraction", "1.5"], {"--holdout-fraction"}),
])
def test_bad_prepare_options_name_their_flag(args, expected, shared, tmp_path, capsys):
    base = ["data", "prepare", "--dataset-file", str(shared["text"]), "--model", str(TOKENIZER), "--max-seq-len",
            "16", "--dataset-chunk-size", "64", "--cache-dir", str(tmp_path / "cache")]
    message = run(capsys, [*base, *args])
    assert assert_real_flags(message, "prepare") == expected


def test_an_eval_file_that_is_training_data_names_train_flags(shared, tmp_path, capsys):
    text = str(shared["text"])
    message = run(capsys, train_args(shared, tmp_path, "--dataset-file", text, "--eval-file", text))
    assert "is part of the training data" in message
    assert assert_real_flags(message, "train-actv1") == {"--eval-file"}


@pytest.mark.parametrize("command", ["train-actv1", "prepare", "eval"])
def test_warnings_about_options_without_effect_name_flags_of_the_command(command, shared, tmp_path, caplog,
                                                                         capsys):
    lines = [line for line in shared["text"].read_text().splitlines() if line.strip()]
    rows, held_out = tmp_path / "rows.jsonl", tmp_path / "held-out.jsonl"
    rows.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[:-50]))
    held_out.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[-50:]))
    if command == "train-actv1":
        args = train_args(shared, tmp_path, "--dataset-file", str(rows), "--eval-file", str(held_out),
                          "--brain-name", "warned", "--text-mode", "document")
    elif command == "prepare":
        args = ["data", "prepare", "--dataset-file", str(rows), "--model", str(TOKENIZER), "--max-seq-len", "16",
                "--dataset-chunk-size", "64", "--cache-dir", str(tmp_path / "cache"), "--text-mode", "document"]
    else:
        args = ["hrm-hf", "eval", "--brain", str(shared["brain"]), "--eval-file", str(held_out), "--data-cache-dir",
                str(tmp_path / "cache"), "--text-mode", "document"]
    with caplog.at_level(logging.WARNING, logger="aios.data.prepare"):
        code = cli_main.main(args)
    assert code == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("--text-mode document has no effect"), warnings
    assert assert_real_flags(warnings[0], command) == {"--text-mode"}
