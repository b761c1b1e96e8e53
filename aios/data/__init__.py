"""Data: prepare text once into packed chunk files, then sample them deterministically per rank.

- prepare.py: `prepare_dataset` (tokenise, pack into max_seq_len + 1 windows, cache by fingerprint)
- dataset.py: `PreparedDataset` (manifest + memory-mapped chunk files)
- sampler.py: `ChunkSampler` (epoch order, slots, ACT streaming draws, resumable state)
- sources.py: reading .txt/.jsonl/.csv files, directories and globs
"""

from __future__ import annotations

from aios.data.dataset import PreparedDataset
from aios.data.prepare import DEFAULT_CACHE_DIR, prepare_dataset
from aios.data.sampler import ChunkSampler, merge_sampler_states, sampler_progress

__all__ = [
    "DEFAULT_CACHE_DIR",
    "ChunkSampler",
    "PreparedDataset",
    "merge_sampler_states",
    "prepare_dataset",
    "sampler_progress",
]
