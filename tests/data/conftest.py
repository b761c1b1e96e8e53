"""Shared fixtures: one small real BPE tokenizer per session, real Shakespeare text, a prepared dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_PATH = REPO_ROOT / "training_data" / "curated_datasets" / "test_sample.txt"
EVAL_PATH = REPO_ROOT / "training_data" / "eval_test_dataset.txt"


@pytest.fixture(scope="session")
def sample_text() -> str:
    """The shipped ~1 MB sample (nine whole works of Shakespeare)."""
    return SAMPLE_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tokenizer_dir(sample_text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token byte-level BPE trained on the first 200 KB of the sample."""
    from aios.tokenizers import train_bpe_tokenizer

    work = tmp_path_factory.mktemp("tokenizer")
    slice_file = work / "slice.txt"
    slice_file.write_text(sample_text[:200_000], encoding="utf-8")
    return train_bpe_tokenizer([slice_file], 512, work / "bpe-512")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from aios.tokenizers import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def small_dataset(sample_text: str, tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """~60 KB of the sample as ~440 windows of 33 tokens in chunks of 16; the last 10% held out."""
    from aios.data import PrepareOptions, flags, prepare_dataset

    work = tmp_path_factory.mktemp("small-dataset")
    source = work / "plays.txt"
    source.write_text(sample_text[:60_000], encoding="utf-8")
    options = PrepareOptions(max_seq_len=32, chunk_size=16, text_mode="document", holdout_fraction=0.1)
    return prepare_dataset(str(source), tokenizer, "bpe-512", options, flags=flags.PREPARE, cache_dir=work / "cache")
