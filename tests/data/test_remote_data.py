"""Prepared data in run storage (a real S3 endpoint: moto's ThreadedMotoServer on 127.0.0.1) read through a
node-local chunk cache, and the sampler's prefetch hints that keep the cache ahead of the reads."""

from __future__ import annotations

import time

import numpy as np

from aios.data import ChunkSampler, PreparedDataset
from aios.data.remote import CachedDataset, publish_prepared
from tests.bundle.test_remote_bundles import BUCKET, keys, s3  # noqa: F401 - the module's S3 endpoint
from tests.train.conftest import data_cache, make_config, small_text  # noqa: F401 - a training config


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
    assert len(stored) == small_dataset.num_chunks + 2  # + stats.json, manifest.json
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
    for future in list(cached._pending.values()):
        future.result(timeout=30)  # both downloaded ahead
    first = small_dataset.chunk_offsets[:2]
    cached.get(first)
    hits, downloads, _, stall = cached.cache_counters()
    assert (hits, downloads, stall) == (2, 2, 0.0)  # downloaded ahead: no read waited
    cached.get(small_dataset.chunk_offsets[:-1])  # one row of every chunk
    on_disk = list(cached.path.glob("chunk-*.npy"))
    assert sum(p.stat().st_size for p in on_disk) <= 3 * chunk_bytes + max(p.stat().st_size for p in on_disk)
    cached.close()


def test_an_interrupted_publication_has_no_manifest_and_the_next_one_uploads_only_what_is_missing(
        s3, small_dataset, monkeypatch):
    from aios.errors import AiosError
    from aios.storage import Storage

    monkeypatch.setenv("AIOS_STORAGE_RETRY_S", "0")
    upload, uploaded = Storage.upload_file, []

    def upload_three_then_fail(self, local, relative):
        if len(uploaded) == 3:
            raise AiosError(f"{relative}: cannot reach the S3 endpoint (test)")
        upload(self, local, relative)
        uploaded.append(relative)

    monkeypatch.setattr(Storage, "upload_file", upload_three_then_fail)
    prefix = f"cut/data/{small_dataset.fingerprint[:16]}/"
    try:
        publish_prepared(small_dataset, f"s3://{BUCKET}/cut")
    except AiosError as exc:
        assert str(exc).startswith("cannot upload the prepared data to s3://") and "\n" not in str(exc)
    else:
        raise AssertionError("the publication did not fail")
    assert len(keys(s3["client"], prefix)) == 3 and not any(k.endswith("manifest.json") for k in keys(s3["client"], prefix))
    monkeypatch.setattr(Storage, "upload_file", lambda self, local, relative: (uploaded.append(relative),
                                                                              upload(self, local, relative)))
    uploaded.clear()
    publish_prepared(small_dataset, f"s3://{BUCKET}/cut")
    assert len(uploaded) == small_dataset.num_chunks - 3 + 1 and uploaded[-1] == "manifest.json"  # the rest, then it
    assert len(keys(s3["client"], prefix)) == small_dataset.num_chunks + 2


def test_data_prepared_with_another_tokenizer_is_refused_in_one_line(small_dataset, make_config):
    from aios.errors import AiosError
    from aios.train.loop import Trainer
    from aios.train.session import LocalSession

    config = make_config()  # the 2k Shakespeare BPE; small_dataset was prepared with a 512-token one
    session = LocalSession(config.bundle_dir, device=__import__("torch").device("cpu"), keep_checkpoints=1,
                           resume=False)
    try:
        Trainer(config, session, datasets=(small_dataset, small_dataset))
    except AiosError as exc:
        assert "is not the tokenizer the data in" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("the mismatched tokenizer was not refused")
