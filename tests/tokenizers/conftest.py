"""Shared fixtures: an isolated aios cache, offline Hugging Face, and real text to train on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tokenizer tests must pass with no network: set before huggingface_hub reads its constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_CANDIDATES = (
    REPO_ROOT / "training_data" / "curated_datasets" / "test_sample.txt",
    REPO_ROOT.parent / "shared" / "data" / "shakespeare_complete.txt",
)


@pytest.fixture(scope="session")
def aios_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aios-cache")


@pytest.fixture(autouse=True)
def _isolated_aios_cache(aios_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPT-2 directory is built once per session here, never in the user's ~/.cache/aios.
    monkeypatch.setenv("AIOS_CACHE_DIR", str(aios_cache))


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The first 400 KB of the shipped Shakespeare sample (real text, ASCII), else of the shared corpus."""
    for path in CORPUS_CANDIDATES:
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return f.read(400_000)
    pytest.fail(f"test corpus not found; looked for {', '.join(map(str, CORPUS_CANDIDATES))}")


@pytest.fixture(scope="session")
def train_text_file(shakespeare: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~200 KB training file; the rest of `shakespeare` stays held out."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(shakespeare[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def held_out_text(shakespeare: str) -> str:
    return shakespeare[300_000:330_000]
