"""`train_bpe_tokenizer` trains a byte-level BPE on real text and saves a loadable Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from aios.errors import AiosError
from aios.tokenizers import MIN_VOCAB_SIZE, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer


@pytest.fixture(scope="module")
def trained_dir(train_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("trained") / "bpe512"
    assert train_bpe_tokenizer([train_text_file], 512, output_dir) == output_dir
    return output_dir


def test_trained_tokenizer_loads_with_requested_vocab_and_special_token(trained_dir: Path):
    assert sorted(p.name for p in trained_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(str(trained_dir))
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == tok.unk_token_id == 0
    # Every one of the 256 bytes is a token, so nothing maps to unk.
    assert 0 not in tok.encode("naïve café 🙂 \x00\x7f")


def test_trained_tokenizer_round_trips_and_compresses_held_out_text(trained_dir: Path, held_out_text: str):
    tok = load_tokenizer(str(trained_dir))
    ids = tok.encode(held_out_text)
    assert tok.decode(ids) == held_out_text
    n_bytes = len(held_out_text.encode("utf-8"))
    # 512 tokens learned from 200 KB of Shakespeare give ~0.52 tokens per byte on unseen Shakespeare;
    # an untrained byte-level tokenizer would give 1.0.
    assert len(ids) < 0.6 * n_bytes, f"{len(ids)} tokens for {n_bytes} bytes"


def test_fingerprint_is_stable_and_distinguishes_tokenizers(
    trained_dir: Path, train_text_file: Path, tmp_path: Path
):
    first = tokenizer_fingerprint(load_tokenizer(str(trained_dir)))
    assert len(first) == 64 and int(first, 16) >= 0
    assert tokenizer_fingerprint(load_tokenizer(str(trained_dir))) == first
    assert tokenizer_fingerprint(load_tokenizer("gpt2")) != first
    # Training is deterministic: the same inputs give the same tokenizer and fingerprint.
    again = train_bpe_tokenizer([train_text_file], 512, tmp_path / "again")
    assert tokenizer_fingerprint(load_tokenizer(str(again))) == first
    other = train_bpe_tokenizer([train_text_file], 600, tmp_path / "other")
    assert tokenizer_fingerprint(load_tokenizer(str(other))) != first


def test_min_frequency_is_applied(train_text_file: Path, tmp_path: Path):
    # No pair occurs a billion times, so nothing is merged: only the bytes and <|endoftext|> remain.
    output_dir = train_bpe_tokenizer([train_text_file], 512, tmp_path / "tok", min_frequency=10**9)
    assert len(load_tokenizer(str(output_dir))) == MIN_VOCAB_SIZE == 257


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters byte-level BPE uses back to the bytes they stand for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    byte_to_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {char: b for b, char in byte_to_char.items()}


def _learned_tokens_with_non_ascii_bytes(output_dir: Path) -> list[bytes]:
    from tokenizers import pre_tokenizers

    byte_of = _byte_level_decoder()
    assert set(byte_of) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = load_tokenizer(str(output_dir))
    merged = [bytes(byte_of[ch] for ch in token) for token in tok.get_vocab() if token != "<|endoftext|>"]
    return [token for token in merged if len(token) > 1 and any(b > 127 for b in token)]


def test_ascii_only_learns_no_non_ascii_merges(shakespeare: str, tmp_path: Path):
    text_file = tmp_path / "mixed.txt"
    text_file.write_text(shakespeare[:50_000] + "naïve café crème brûlée\n" * 500, encoding="utf-8")
    plain_dir = train_bpe_tokenizer([text_file], 400, tmp_path / "plain")
    ascii_dir = train_bpe_tokenizer([text_file], 400, tmp_path / "ascii", ascii_only=True)
    assert "é".encode() in _learned_tokens_with_non_ascii_bytes(plain_dir)
    assert _learned_tokens_with_non_ascii_bytes(ascii_dir) == []
    ascii_tok = load_tokenizer(str(ascii_dir))
    assert ascii_tok.decode(ascii_tok.encode("crème brûlée")) == "crème brûlée"  # still encodes, byte by byte


def test_retraining_replaces_a_tokenizer_dir_whole(train_text_file: Path, tmp_path: Path):
    output_dir = tmp_path / "tok"
    train_bpe_tokenizer([train_text_file], 512, output_dir)
    (output_dir / "special_tokens_map.json").write_text("{}")  # a stale file from an older save
    train_bpe_tokenizer([train_text_file], 300, output_dir)
    assert len(load_tokenizer(str(output_dir))) == 300
    assert sorted(p.name for p in output_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no staging or old directories left


def test_refuses_to_replace_a_directory_with_other_files(train_text_file: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(AiosError, match="notes.txt"):
        train_bpe_tokenizer([train_text_file], 300, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("vocab_size", [0, 100, MIN_VOCAB_SIZE - 1])
def test_vocab_smaller_than_byte_alphabet_is_refused(train_text_file: Path, tmp_path: Path, vocab_size: int):
    with pytest.raises(AiosError, match=f"vocab size {vocab_size} is too small.*at least 257"):
        train_bpe_tokenizer([train_text_file], vocab_size, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_bad_inputs_are_refused(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(AiosError, match="no training text"):
        train_bpe_tokenizer([], 300, tmp_path / "tok")
    with pytest.raises(AiosError, match="missing.txt' does not exist"):
        train_bpe_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "tok")
    with pytest.raises(AiosError, match="empty.txt' is empty"):
        train_bpe_tokenizer([empty], 300, tmp_path / "tok")
    with pytest.raises(AiosError, match="is not a file"):
        train_bpe_tokenizer([tmp_path], 300, tmp_path / "tok")
    with pytest.raises(AiosError, match="latin1.txt' is not UTF-8"):
        train_bpe_tokenizer([latin1], 300, tmp_path / "tok")
    with pytest.raises(AiosError, match="min frequency 0"):
        train_bpe_tokenizer([latin1], 300, tmp_path / "tok", min_frequency=0)
    assert not (tmp_path / "tok").exists()
