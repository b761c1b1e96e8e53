"""`aios data prepare` and `aios data inspect`, through the real entry point (errors: one red line, exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aios.cli import main as cli_main
from aios.data import PreparedDataset


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich neither wraps nor truncates


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli_main.main(["data", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prepare_args(source: Path, tokenizer_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "prepare",
        "--dataset-file",
        str(source),
        "--model",
        str(tokenizer_dir),
        "--max-seq-len",
        "31",
        "--dataset-chunk-size",
        "64",
        "--cache-dir",
        str(cache),
        *extra,
    ]


def test_prepare_prints_the_path_and_counts_then_inspect_summarises(
    tmp_path: Path, tokenizer_dir: Path, sample_text: str, capsys
):
    source = tmp_path / "plays.txt"
    source.write_text(sample_text[:40_000], encoding="utf-8")
    code, out, err = run(
        capsys,
        *prepare_args(
            source, tokenizer_dir, tmp_path / "cache", "--text-mode", "document", "--holdout-fraction", "0.1"
        ),
    )
    assert code == 0, err
    prepared = next(p for p in (tmp_path / "cache").iterdir())
    manifest = json.loads((prepared / "manifest.json").read_text())
    counts = manifest["counts"]
    assert f"prepared dataset: {prepared}" in out
    assert f"{counts['tokens']} tokens -> {counts['sequences']} sequences of 32 tokens" in out
    assert f"{manifest['holdout']['num_holdout_sequences']} held out" in out
    assert manifest["text_options"]["text_mode"] == "document"

    code, out, err = run(capsys, "inspect", str(prepared / "manifest.json"))
    assert code == 0, err
    assert f"{tokenizer_dir} (vocab 512, eos 0)" in out
    assert "31 / 32 (uint16)" in out
    assert f"{counts['sequences']} ({manifest['holdout']['num_train_sequences']} train" in out
    assert f"plays.txt ({source.stat().st_size} bytes" in out
    chunks = PreparedDataset(prepared).num_chunks
    code, out, err = run(capsys, "inspect", str(prepared), "--global-batch", "4")
    assert code == 0, err
    mixing = re.search(r"([\d.]+) distinct chunks per global batch of 4 rows \(at most (\d+)", out)
    assert mixing and int(mixing.group(2)) == min(chunks, 4) and float(mixing.group(1)) >= 3


@pytest.mark.parametrize(
    "name, content, extra, expected",
    [
        ("missing.txt", None, (), "does not exist"),
        ("empty.txt", b"", (), "is empty"),
        ("latin1.txt", "naïve\n".encode("latin-1"), (), "not valid UTF-8 (byte offset 2)"),
        ("blob.txt", b"\x00\x01\x02", (), "looks binary"),
        ("table.xlsx", b"x", (), "unsupported extension"),
        ("rows.jsonl", b'{"text": "a"}\nnot json\n', (), "line 2 is not JSON"),
        ("rows.jsonl", b'{"body": "a"}\n', (), "line 1 has no field 'text'"),
        ("rows.csv", b"id,body\n1,a\n", (), "no column 'text' (columns: id, body)"),
        ("short.txt", b"Hark!\n", (), "fewer than one window"),
        ("ok.txt", b"Hark!\n" * 200, ("--holdout-fraction", "1.5"), "holdout fraction"),
    ],
)
def test_bad_input_is_one_red_line_and_a_non_zero_exit(
    tmp_path: Path, tokenizer_dir: Path, capsys, name, content, extra, expected
):
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    code, out, err = run(capsys, *prepare_args(source, tokenizer_dir, tmp_path / "cache", *extra))
    assert code == 2
    assert expected in err
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out


def test_inspect_of_something_that_is_not_a_prepared_dataset(tmp_path: Path, capsys):
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "is not a prepared dataset" in err and len(err.strip().splitlines()) == 1
