from __future__ import annotations

from pathlib import Path

import pytest

from aios.config import TrainingConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "training_data" / "curated_datasets" / "test_sample.txt"
EVAL_TEXT = REPO / "training_data" / "eval_test_dataset.txt"
TOKENIZER = REPO / "training_data" / "tokenizers" / "shakespeare-bpe-2k"


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """About 40 KB of the shipped Shakespeare sample."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(SAMPLE.read_text()[:40_000])
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def tiny_config(out: Path, small_text: Path, data_cache: Path, **overrides) -> TrainingConfig:
    """A tiny, fast TrainingConfig whose bundles go under out/brains; overrides as keyword arguments."""
    settings = dict(
        model=str(TOKENIZER), dataset_file=str(small_text), max_seq_len=16, dataset_chunk_size=64,
        data_cache_dir=str(data_cache), hidden_size=32, num_heads=2, expansion=2.0, h_layers=1, l_layers=1,
        h_cycles=1, l_cycles=2, halt_max_steps=3, batch_size=4, steps=6, lr=3e-3, warmup_steps=2,
        eval_batches=2, checkpoint_every=0, amp=False, gradient_checkpointing=False, progress=False,
        bundle_dir=str(out / "brains"), brain_name="tiny", seed=7, launcher="local",
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


@pytest.fixture
def make_config(tmp_path, small_text, data_cache):
    """A tiny, fast TrainingConfig writing into tmp_path; overrides as keyword arguments."""

    def make(**overrides) -> TrainingConfig:
        return tiny_config(tmp_path, small_text, data_cache, **overrides)

    return make


@pytest.fixture(scope="module")
def module_make_config(tmp_path_factory, small_text, data_cache):
    """make_config for runs that a module's tests share (module-scoped references): its bundles go into one
    directory of the module, so every run there needs a brain name of its own."""
    out = tmp_path_factory.mktemp("module")

    def make(**overrides) -> TrainingConfig:
        return tiny_config(out, small_text, data_cache, **overrides)

    return make
