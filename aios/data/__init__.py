"""Data: prepare text once into packed chunk files, then sample them deterministically per rank.

- prepare.py: `prepare_dataset` (tokenise, pack into max_seq_len + 1 windows, cache by fingerprint) and its
  `PrepareOptions`
- dataset.py: `PreparedDataset` (manifest + memory-mapped chunk files)
- sampler.py: `ChunkSampler` (epoch order, slots, ACT streaming draws, resumable state)
- sources.py: reading .txt/.jsonl/.csv files, directories and globs
- flags.py: `DataFlags`, the flags of each command that set the inputs, named in error messages
"""

from __future__ import annotations

from aios.data.dataset import PreparedDataset
from aios.data.flags import DataFlags
from aios.data.prepare import DEFAULT_CACHE_DIR, PrepareOptions, prepare_dataset, warn_unused_options
from aios.data.sampler import ChunkSampler, merge_sampler_states, sampler_progress

__all__ = [
    "DEFAULT_CACHE_DIR",
    "ChunkSampler",
    "DataFlags",
    "PrepareOptions",
    "PreparedDataset",
    "merge_sampler_states",
    "prepare_dataset",
    "sampler_progress",
    "warn_unused_options",
]
