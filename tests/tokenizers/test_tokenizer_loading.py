"""`load_tokenizer` resolves paths, files and cached ids offline, and fails with one-line, fixable errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aios.errors import AiosError
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer


@pytest.fixture(scope="module")
def small_tokenizer_dir(train_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer([train_text_file], 300, tmp_path_factory.mktemp("small") / "tok")


def test_unknown_name_says_what_was_looked_for_and_where():
    from huggingface_hub.constants import HF_HUB_CACHE

    with pytest.raises(AiosError) as excinfo:
        load_tokenizer("aios-tests/no-such-tokenizer")
    message = str(excinfo.value)
    assert "unknown tokenizer 'aios-tests/no-such-tokenizer'" in message
    assert str(Path("aios-tests/no-such-tokenizer").absolute()) in message  # the path checked
    assert "gpt2" in message and HF_HUB_CACHE in message
    assert "aios tokenizer train" in message and "tokenizer.json" in message  # the fix
    assert "\n" not in message


def test_missing_path_is_named_as_a_path():
    with pytest.raises(AiosError, match=r"tokenizer path '\./nope/tok' does not exist"):
        load_tokenizer("./nope/tok")


def test_directory_without_tokenizer_files_is_refused(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(AiosError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_malformed_tokenizer_json_is_a_user_error(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(AiosError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(AiosError, match="is not a tokenizers JSON file"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_bare_tokenizer_json_file_gets_eos_and_pad(small_tokenizer_dir: Path):
    tok = load_tokenizer(str(small_tokenizer_dir / "tokenizer.json"))
    assert len(tok) == 300
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
    assert tok.name_or_path == str(small_tokenizer_dir / "tokenizer.json")
    # Same ids as the directory it came from.
    from_dir = load_tokenizer(str(small_tokenizer_dir))
    assert tok.encode("To be, or not to be") == from_dir.encode("To be, or not to be")


def test_fingerprint_ignores_padding_and_truncation_left_by_calls(small_tokenizer_dir: Path):
    tok = load_tokenizer(str(small_tokenizer_dir))
    before = tokenizer_fingerprint(tok)
    batch = tok(["To be, or not to be", "To"], padding=True, truncation=True, max_length=64)
    assert batch["input_ids"][1][-1] == tok.pad_token_id  # the call really padded
    # ...and transformers left that setting on the backend tokenizer, which the fingerprint must ignore.
    assert tok.backend_tokenizer.padding is not None and tok.backend_tokenizer.truncation is not None
    assert tokenizer_fingerprint(tok) == before


def test_fingerprint_changes_with_special_tokens(small_tokenizer_dir: Path):
    tok = load_tokenizer(str(small_tokenizer_dir))
    before = tokenizer_fingerprint(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    assert tokenizer_fingerprint(tok) != before


def test_fingerprint_is_identical_in_another_process(small_tokenizer_dir: Path, aios_cache: Path):
    script = (
        "import json, sys\n"
        "from aios.tokenizers import load_tokenizer, tokenizer_fingerprint\n"
        "print(json.dumps([tokenizer_fingerprint(load_tokenizer(name)) for name in sys.argv[1:]]))\n"
    )
    env = {**os.environ, "AIOS_CACHE_DIR": str(aios_cache), "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script, "gpt2", str(small_tokenizer_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    in_other_process = json.loads(result.stdout.strip().splitlines()[-1])
    here = [
        tokenizer_fingerprint(load_tokenizer("gpt2")),
        tokenizer_fingerprint(load_tokenizer(str(small_tokenizer_dir))),
    ]
    assert in_other_process == here
