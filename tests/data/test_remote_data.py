"""Prepared data in run storage (a real S3 endpoint: moto's ThreadedMotoServer on 127.0.0.1) read through a
node-local chunk cache, and the sampler's prefetch hints that keep the cache ahead of the reads."""

from __future__ import annotations

import time

import numpy as np

from aios.data import ChunkSampler, PreparedDataset
from aios.data.remote import CachedDataset, publish_prepared
from tests.bundle.test_remote_bundles import BUCKET, keys, s3  # noqa: F401 - the module's S3 endpoint


class Hinted(PreparedDataset):
    """A local dataset that records the sampler's prefetch hints and the chunks it opens, in order."""

    prefetches = True

    def __init__(self, path):
        super().__init__(path)
        self.events: list[tuple[str, int]] = []

    def prefetch(self, chunks) -> None:
        self.events += [("hint", c) for c in chunks]

    def _chunk(self, index):
        if index not in self._open:
            self.events.append(("open", index))
        return super()._chunk(index)


def test_the_sampler_hints_each_slot_s_next_chunk_about_a_chunk_ahead_of_its_first_read(small_dataset):
    dataset = Hinted(small_dataset.path)
    sampler = ChunkSampler(dataset, seed=3, micro_batch=2, grad_accum=1, rank=0, world_size=2, iterate=True)
    for draw in range(400):  # past an epoch of this rank's slots: slots move through several chunks
        dataset.events.append(("draw", draw))
        sampler.draw(sampler.slots_for(0))
    hinted_at: dict[int, int] = {}
    leads, unhinted, draw = [], 0, 0
    for kind, value in dataset.events:
        if kind == "draw":
            draw = value
        elif kind == "hint":
            hinted_at.setdefault(value, draw)
        elif value in hinted_at:
            leads.append(draw - hinted_at.pop(value))  # draws between the first hint and the read
        else:
            unhinted += 1
    assert len(leads) > 10
    # the first chunk of each slot, and of each slot's next epoch, is read on demand; the others were hinted
    # while the slot was still in the chunk before (16 sequences a chunk: several draws ahead, not one)
    assert unhinted <= 2 * 3 and sorted(leads)[len(leads) // 2] >= 4


def test_a_cached_dataset_downloads_each_chunk_once_and_reads_what_the_local_one_reads(s3, small_dataset, tmp_path):
    location = publish_prepared(small_dataset, f"s3://{BUCKET}/run-storage")
    stored = keys(s3["client"], "run-storage/data/")
    assert stored[-1].endswith("manifest.json") or f"run-storage/data/{small_dataset.fingerprint[:16]}/manifest.json" in stored
    assert publish_prepared(small_dataset, f"s3://{BUCKET}/run-storage") == location  # found: nothing uploaded
    assert keys(s3["client"], "run-storage/data/") == stored

    cached = CachedDataset(location, cache_dir=tmp_path / "node")
    ids = np.arange(small_dataset.num_sequences)
    np.testing.assert_array_equal(cached.get(ids), small_dataset.get(ids))
    hits, downloads, size, stall = cached.cache_counters()
    assert (hits, downloads) == (0, small_dataset.num_chunks) and size > 0 and stall > 0
    cached.close()

    again = CachedDataset(location, cache_dir=tmp_path / "node")  # another worker of the node: all on disk
    np.testing.assert_array_equal(again.get(ids), small_dataset.get(ids))
    assert again.cache_counters()[:2] == [float(small_dataset.num_chunks), 0.0]
    again.close()


def test_prefetched_chunks_are_read_without_waiting_and_the_cache_keeps_its_size_limit(s3, small_dataset, tmp_path):
    location = publish_prepared(small_dataset, f"s3://{BUCKET}/run-storage")
    chunk_bytes = (small_dataset.path / "chunk-00000.npy").stat().st_size
    cached = CachedDataset(location, cache_dir=tmp_path / "node", limit_bytes=3 * chunk_bytes)
    cached.prefetch([0, 1])
    deadline = time.monotonic() + 30
    while cached.cache_counters()[1] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first = small_dataset.chunk_offsets[:2]
    cached.get(first)
    hits, downloads, _, stall = cached.cache_counters()
    assert (hits, downloads, stall) == (2, 2, 0.0)  # downloaded ahead: no read waited
    cached.get(small_dataset.chunk_offsets[:-1])  # one row of every chunk
    on_disk = list(cached.path.glob("chunk-*.npy"))
    assert sum(p.stat().st_size for p in on_disk) <= 3 * chunk_bytes + max(p.stat().st_size for p in on_disk)
    cached.close()
