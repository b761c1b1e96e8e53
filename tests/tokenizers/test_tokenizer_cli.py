"""`aios tokenizer train | encode | info`, driven through the typer app."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from aios.cli.tokenizer import app
from aios.errors import AiosError
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint

runner = CliRunner()


def _info_fields(output: str) -> dict[str, str]:
    return {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in output.splitlines())
    }


def test_encode_gpt2_prints_json_ids():
    result = runner.invoke(app, ["encode", "--model", "gpt2", "Hello world"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "[15496, 995]"


def test_info_gpt2():
    result = runner.invoke(app, ["info", "--model", "gpt2"])
    assert result.exit_code == 0, result.output
    fields = _info_fields(result.stdout)
    assert fields["class"] == "GPT2Tokenizer"
    assert fields["vocab size"] == "50257"
    assert fields["eos"] == "50256 '<|endoftext|>'" and fields["pad"] == "50256 '<|endoftext|>'"
    assert fields["fingerprint"] == tokenizer_fingerprint(load_tokenizer("gpt2"))
    assert fields["source"].endswith("tokenizers/gpt2")


def test_train_then_info_and_encode(train_text_file: Path, tmp_path: Path):
    output_dir = tmp_path / "tok"
    result = runner.invoke(
        app, ["train", "--input", str(train_text_file), "--vocab-size", "400", "--output", str(output_dir)]
    )
    assert result.exit_code == 0, result.output
    assert f"Saved tokenizer to {output_dir} (vocab size 400)" in result.stdout

    result = runner.invoke(app, ["info", "-m", str(output_dir)])
    assert result.exit_code == 0, result.output
    fields = _info_fields(result.stdout)
    assert fields["vocab size"] == "400" and fields["eos"] == "0 '<|endoftext|>'"
    assert fields["fingerprint"] == tokenizer_fingerprint(load_tokenizer(str(output_dir)))
    assert fields["source"] == str(output_dir)

    result = runner.invoke(app, ["encode", "-m", str(output_dir), "To be, or not to be"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(load_tokenizer(str(output_dir)).encode("To be, or not to be"))


def test_train_with_several_inputs_and_options(train_text_file: Path, tmp_path: Path):
    second = tmp_path / "second.txt"
    second.write_text("naïve café\n" * 200, encoding="utf-8")
    args = [
        "train",
        "-i",
        str(train_text_file),
        "-i",
        str(second),
        "--vocab-size",
        "300",
        "-o",
        str(tmp_path / "t"),
    ]
    result = runner.invoke(app, [*args, "--min-frequency", "3", "--ascii-only"])
    assert result.exit_code == 0, result.output
    assert "vocab size 300" in result.stdout


def test_train_reports_when_the_text_is_too_small_for_the_vocab(tmp_path: Path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abab abab\n", encoding="utf-8")
    result = runner.invoke(app, ["train", "-i", str(tiny), "--vocab-size", "1000", "-o", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert "asked for 1000 tokens" in result.stdout


def test_user_errors_are_aios_errors(tmp_path: Path):
    result = runner.invoke(app, ["encode", "--model", "no-such-tokenizer", "hi"])
    assert result.exit_code != 0
    assert isinstance(result.exception, AiosError) and "no-such-tokenizer" in str(result.exception)

    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    result = runner.invoke(app, ["train", "-i", str(text), "--vocab-size", "10", "-o", str(tmp_path / "t")])
    assert isinstance(result.exception, AiosError) and "vocab size 10 is too small" in str(result.exception)
    assert not (tmp_path / "t").exists()


def test_missing_required_flag_is_a_usage_error():
    result = runner.invoke(app, ["train", "--vocab-size", "300"])
    assert result.exit_code == 2
    assert "--input" in result.output
