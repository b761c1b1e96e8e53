"""Prepared data in run storage, read by workers through a node-local chunk cache.

With an s3:// `--storage-path`, the driver prepares the data as always (in its --data-cache-dir) and then
publishes the prepared directory once into `<storage-path>/data/<fingerprint[:16]>/`: the chunk files and
stats.json first, manifest.json last (a reader that finds the manifest finds every chunk). A later run with
the same fingerprint finds the manifest and uploads nothing.

Workers never open the driver's directory: each opens a `CachedDataset`, which downloads the manifest and
then the chunk files its reads need into a node-local cache (`$AIOS_CACHE_DIR/chunks/<fingerprint[:16]>/`,
default ~/.cache/aios), shared by the workers of a node and kept within `$AIOS_CACHE_LIMIT_GB` (default 10)
by deleting the least recently used chunks (a chunk a reader has mapped stays readable; one downloaded and
not yet opened is never deleted). The chunk sampler tells it which chunk each
of its slots reads next (`prefetch`), and two background threads download those while training goes on, so
a step waits only for a chunk that was not asked for in time. It counts cache hits, downloads, bytes and
the time a read waited (stall), which the trainer adds to each step's metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from aios.data.dataset import MANIFEST_NAME, PreparedDataset
from aios.errors import AiosError
from aios.storage import Storage, open_storage

log = logging.getLogger(__name__)

DATA = "data"  # under the storage path
STATS_NAME = "stats.json"
CACHE_ENV = "AIOS_CACHE_DIR"
CACHE_LIMIT_ENV = "AIOS_CACHE_LIMIT_GB"
DEFAULT_CACHE_LIMIT_GB = 10.0
PREFETCH_THREADS = 2


def remote_location(storage_path: str, dataset: PreparedDataset) -> str:
    return f"{storage_path.rstrip('/')}/{DATA}/{dataset.fingerprint[:16]}"


def publish_prepared(dataset: PreparedDataset, storage_path: str, endpoint_url: str | None = None) -> str:
    """Upload a prepared dataset into run storage once (manifest last); returns its location."""
    from aios.train.remote import with_retries

    location = remote_location(storage_path, dataset)
    storage = open_storage(location, endpoint_url)

    def publish() -> bool:
        if storage.exists(MANIFEST_NAME):
            return False
        for chunk in dataset.manifest["chunks"]:
            storage.upload_file(dataset.path / chunk["file"], chunk["file"])
        if (dataset.path / STATS_NAME).is_file():
            storage.upload_file(dataset.path / STATS_NAME, STATS_NAME)
        storage.upload_file(dataset.path / MANIFEST_NAME, MANIFEST_NAME)  # last: it names the chunks above
        return True

    uploaded = with_retries(publish, f"upload of the prepared data to {location}",
                            lambda problem: f"cannot upload the prepared data to {location} ({problem}); rerun once "
                                            f"the storage answers")
    log.info("%s the prepared data %s (%d chunks)", "uploaded" if uploaded else "reusing", location,
             dataset.num_chunks)
    return location


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aios") / "chunks"


def cache_limit_bytes() -> int:
    try:
        return int(float(os.environ.get(CACHE_LIMIT_ENV, DEFAULT_CACHE_LIMIT_GB)) * 2**30)
    except ValueError:
        raise AiosError(f"${CACHE_LIMIT_ENV}={os.environ[CACHE_LIMIT_ENV]!r} is not a number of GB; set e.g. "
                        f"{CACHE_LIMIT_ENV}=10") from None


class CachedDataset(PreparedDataset):
    """A prepared dataset in run storage, read through this node's chunk cache (see the module docstring)."""

    prefetches = True

    def __init__(self, location: str, endpoint_url: str | None = None, *, cache_dir: Path | None = None,
                 limit_bytes: int | None = None):
        self.storage: Storage = open_storage(location, endpoint_url)
        self.location = location
        directory = (cache_dir or cache_root()) / location.rstrip("/").rpartition("/")[2]
        directory.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST_NAME, STATS_NAME):
            if name == MANIFEST_NAME or self.storage.exists(name):
                self._download(name, directory / name)
        super().__init__(directory, check_files=False)
        self.limit = cache_limit_bytes() if limit_bytes is None else limit_bytes
        self.hits = self.downloads = self.bytes_downloaded = 0
        self.stall_s = 0.0
        self.downloaded_chunks: list[int] = []  # every chunk this reader downloaded, in order
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._fresh: set[int] = set()  # downloaded, not opened yet: never evicted
        self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="aios-prefetch")

    def cache_counters(self) -> list[float]:
        """Cumulative [hits, downloads, bytes, stall seconds] of this reader."""
        with self._lock:
            return [float(self.hits), float(self.downloads), float(self.bytes_downloaded), self.stall_s]

    def prefetch(self, chunks) -> None:
        for index in chunks:
            self._fetch(int(index))

    def _chunk(self, index: int) -> np.ndarray:
        if index in self._open:
            return super()._chunk(index)
        started = time.perf_counter()
        future = self._fetch(index)
        if future is not None:
            future.result()  # on the prefetch thread, or begun just now: the read waits for it
        with self._lock:
            if future is None:
                self.hits += 1
            else:
                self.stall_s += time.perf_counter() - started
        try:
            os.utime(self.path / self._name(index))  # recently used
        except FileNotFoundError:  # another reader of this node's cache evicted it meanwhile: once more
            self._fetch(index).result()
        rows = super()._chunk(index)
        with self._lock:
            self._fresh.discard(index)
        return rows

    def _fetch(self, index: int) -> Future | None:
        """None when the chunk is on disk; else its download (already running, or started now; one that
        failed is started again)."""
        with self._lock:
            pending = self._pending.get(index)
            if pending is not None and not pending.done():
                return pending
            failed = pending is not None and pending.exception() is not None
            if not failed and (self.path / self._name(index)).is_file():
                return None
            future = self._pool.submit(self._download_chunk, index)
            self._pending[index] = future
            return future

    def _download_chunk(self, index: int) -> None:
        from aios.train.remote import with_retries

        name = self._name(index)
        target = self.path / name
        with_retries(lambda: self._download(name, target), f"download of {self.location}/{name}",
                     lambda problem: f"cannot download {self.location}/{name} ({problem}): rerun with --resume "
                                     f"once the storage answers")
        with self._lock:
            self.downloads += 1
            self.bytes_downloaded += target.stat().st_size
            self.downloaded_chunks.append(index)
            self._fresh.add(index)
            self._evict()

    def _download(self, name: str, target: Path) -> None:
        partial = target.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            self.storage.download_file(name, partial)
            os.replace(partial, target)  # whole or absent: a worker of this node may read it at once
        finally:
            partial.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Delete the least recently used chunk files beyond the size limit (never one just downloaded)."""
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.path.glob("chunk-*.npy")]
        total = sum(size for _, size, _ in files)
        if total <= self.limit:
            return
        # (called holding the lock) A chunk this reader has mapped stays readable when its file is deleted
        # (POSIX), so only the downloaded ones no reader has opened yet are kept.
        open_names = {self._name(i) for i in self._fresh}
        for _, size, path in sorted(files):
            if total <= self.limit:
                break
            if path.name in open_names:
                continue
            path.unlink(missing_ok=True)
            total -= size

    def _name(self, index: int) -> str:
        return self.manifest["chunks"][index]["file"]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def open_cached(location: str, endpoint_url: str | None = None) -> CachedDataset:
    dataset = CachedDataset(location, endpoint_url)
    log.info("reading the prepared data %s through the chunk cache %s", location, dataset.path)
    return dataset
