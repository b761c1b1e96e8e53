"""Where a run's checkpoints live: `--storage-path` (a local directory or s3://BUCKET/PREFIX).

Without --storage-path they are the bundle's checkpoints/ folder. With it, they are
`<storage-path>/<brain-name>/checkpoints/step-N/`, and that folder is also the Ray run's directory
(`RunConfig(storage_path=<storage-path>/<brain-name>, name="checkpoints", storage_filesystem=...)`).
A local storage path works exactly as the bundle's folder does (rename into place, fsync).

On S3 there is no rename, so a checkpoint is published the way the bundle is: its files are uploaded under
`step-N/` first, and COMPLETE (the sha256 and size of every file) is written last in one PUT. A checkpoint
without COMPLETE does not exist for any reader, so an upload cut short publishes nothing. Every rank uploads
its own files from a directory on its own node (no disk is shared), rank 0 gathers their hashes and writes
COMPLETE; a step that is already sealed there is kept, not uploaded again. Pruning deletes a checkpoint's
COMPLETE first. A resume downloads the newest sealed checkpoint into a directory on each worker's node and
checks every file against COMPLETE there; one that fails is moved aside (copied to `step-N.invalid-<time>/`,
then deleted) and the previous one is tried. Uploads are retried with backoff for $AIOS_STORAGE_RETRY_S
seconds; then the run stops in one line and the newest sealed checkpoint stays as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aios.errors import AiosError
from aios.storage import Storage, is_remote, open_storage
from aios.train.checkpoint import (
    COMPLETE,
    STEP_DIR,
    CheckpointUnusable,
    complete_text,
    expected_files,
    file_record,
    files_written_by,
    step_dir_name,
    verify_checkpoint,
)
from aios.train.remote import with_retries

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under <storage-path>/<brain>: the Ray run's directory too
SCRATCH_ENV = "AIOS_SCRATCH_DIR"  # a node-local directory for staging and downloaded checkpoints


def checkpoints_location(config, bundle_checkpoints: Path) -> Path | RemoteCheckpoints:
    """Where this run's checkpoints live: a local directory, or the remote checkpoints of --storage-path."""
    if not config.storage_path:
        return bundle_checkpoints
    if is_remote(config.storage_path):
        return RemoteCheckpoints(config.storage_path, config.brain_name, config.s3_endpoint_url)
    return Path(config.storage_path) / config.brain_name / CHECKPOINTS


def scratch_dir(purpose: str) -> Path:
    """A fresh directory on this node ($AIOS_SCRATCH_DIR, else the system's temporary directory)."""
    root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"aios-{purpose}-", dir=root))


class RemoteCheckpoints:
    """The checkpoints of one brain at s3://.../<brain>/checkpoints."""

    def __init__(self, storage_path: str, brain: str, endpoint_url: str | None = None):
        self.storage: Storage = open_storage(f"{storage_path.rstrip('/')}/{brain}/{CHECKPOINTS}", endpoint_url)

    def describe(self, name: str = "") -> str:
        return self.storage.describe(name)

    def __str__(self) -> str:
        return self.describe()

    def ray_storage(self) -> tuple[str, object]:
        """Ray's RunConfig storage_path (the filesystem's path of <storage-path>/<brain>) and filesystem."""
        return self.storage.path().rpartition("/")[0], self.storage.filesystem()

    # -- reading --------------------------------------------------------------------------------------
    def step_dirs(self) -> list[str]:
        """step-N folders (with or without COMPLETE), oldest first."""
        names = [n for n in self.storage.list_dirs() if STEP_DIR.match(n)]
        return sorted(names, key=lambda n: int(STEP_DIR.match(n).group(1)))

    def has_any(self) -> bool:
        """Whether any checkpoint was ever published (sealed) or set aside here: trained work. A step-N without
        COMPLETE is an upload cut short, like a local staging directory: not a checkpoint."""
        return any(n.startswith("step-") and (not STEP_DIR.match(n) or self.storage.exists(f"{n}/{COMPLETE}"))
                   for n in self._retrying(self.storage.list_dirs, "", "list"))

    def problem(self, name: str) -> str | None:
        """None if step `name` is sealed and every file COMPLETE lists is there at its size, else the reason
        (the hashes are checked after a download)."""
        sizes = self.storage.sizes(name)
        if COMPLETE not in sizes:
            return "no COMPLETE (an upload cut short)"
        try:
            files = json.loads(self.storage.read_bytes(f"{name}/{COMPLETE}"))["files"]
            listed = {file: int(entry["bytes"]) for file, entry in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unparsable COMPLETE marker ({type(exc).__name__})"
        for file, size in listed.items():
            if sizes.get(file) != size:
                return f"{file} is missing" if file not in sizes else f"{file} has {sizes[file]} bytes, not {size}"
        return None

    def newest_sealed(self, *, set_aside_broken: bool) -> str | None:
        """The newest step that passes `problem`; sealed ones that fail it are moved aside when asked."""
        for name in reversed(self._retrying(self.step_dirs, "", "list")):
            problem = self._retrying(lambda name=name: self.problem(name), name, "read")
            if problem is None:
                return name
            if set_aside_broken and not problem.startswith("no COMPLETE"):
                log.warning("skipping checkpoint %s: %s; trying the previous one", self.describe(name), problem)
                self.set_aside(name, "invalid")
        return None

    def saved_step(self, name: str) -> int | None:
        try:
            step = json.loads(self.storage.read_bytes(f"{name}/state.json"))["step"]
        except (AiosError, ValueError, KeyError, TypeError):
            return None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def download(self, name: str, local: Path) -> Path:
        """Every file step `name`'s COMPLETE lists, then COMPLETE, into the empty directory `local`."""
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        marker = self._retrying(lambda: self.storage.read_bytes(f"{name}/{COMPLETE}"), name, "download")
        try:
            files = list(json.loads(marker)["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointUnusable(f"unparsable COMPLETE marker ({type(exc).__name__})") from None
        for file in files:
            if "/" in file or file.startswith("."):
                raise CheckpointUnusable(f"COMPLETE lists {file!r}, not a checkpoint file")
            self._retrying(lambda file=file: self.storage.download_file(f"{name}/{file}", local / file), name,
                           "download")
        (local / COMPLETE).write_bytes(marker)
        return local

    # -- writing --------------------------------------------------------------------------------------
    def upload(self, local: Path, name: str, files: list[str]) -> dict[str, dict]:
        """Upload `files` of the local directory into step `name`; returns their COMPLETE records."""
        records = {}
        for file in files:
            records[file] = file_record(local / file)
            self._retrying(lambda file=file: self.storage.upload_file(local / file, f"{name}/{file}"), name)
        return records

    def seal(self, name: str, files: dict[str, dict]) -> None:
        """Publish step `name`: COMPLETE, in one PUT, after every file it lists was uploaded."""
        self._retrying(lambda: self.storage.write_bytes(f"{name}/{COMPLETE}", complete_text(files).encode()), name)

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` sealed checkpoints; delete older sealed ones (COMPLETE first, so that a deletion
        cut short leaves no checkpoint that looks whole) and unsealed leftovers older than the newest sealed one."""
        names = self.step_dirs()
        sealed = [n for n in names if self.problem(n) is None]
        doomed = sealed[:-keep] if keep > 0 else []
        if sealed:
            newest = int(STEP_DIR.match(sealed[-1]).group(1))
            doomed += [n for n in names if n not in sealed and int(STEP_DIR.match(n).group(1)) < newest
                       and COMPLETE not in self.storage.sizes(n)]
        for name in doomed:
            self._retrying(lambda name=name: self._delete(name), name)

    def _delete(self, name: str) -> None:
        if self.storage.exists(f"{name}/{COMPLETE}"):
            self.storage.delete_file(f"{name}/{COMPLETE}")
        self.storage.delete_dir(name)

    def set_aside(self, name: str, reason: str) -> str:
        """Move step `name` out of the step-N namespace (copy, then delete; COMPLETE first); never lose it."""
        aside = f"{name}.{reason}-{int(time.time())}"
        log.warning("moving checkpoint %s aside to %s", self.describe(name), aside)
        for file in self.storage.list_files(name):
            self.storage.copy_file(f"{name}/{file}", f"{aside}/{file}")
        self._delete(name)
        return aside

    def forget_ray_snapshot(self, snapshot: str) -> None:
        if self.storage.exists(snapshot):
            self.storage.delete_file(snapshot)

    def _retrying(self, operation: Callable[[], object], name: str, what: str = "upload"):
        """`operation()` retried (aios.train.remote.with_retries), then one line naming what failed."""
        def failure(problem: str) -> str:
            if what == "upload":
                return (f"cannot save checkpoint {name} to {self.describe()} ({problem}); the newest sealed "
                        f"checkpoint there is kept: rerun with --resume once the storage answers")
            return f"cannot {what} the checkpoints in {self.describe()} ({problem}): rerun with --resume once the " \
                   f"storage answers"

        return with_retries(operation, f"{what} of {self.describe(name)}", failure)


class RemoteCheckpointing:
    """A session's checkpoints on remote storage, for any number of ranks: every rank stages its own files on
    its own node, uploads them, and rank 0 seals; a resume downloads onto every rank's node.

    `gather(value)` returns every rank's value, in rank order (every rank calls it equally often)."""

    def __init__(self, remote: RemoteCheckpoints, *, rank: int, world_size: int,
                 gather: Callable[[object], list], zero_stage: str | None = None):
        self.remote = remote
        self.rank, self.world_size = rank, world_size
        self.zero_stage = zero_stage  # with ZeRO each rank also uploads its DeepSpeed files
        self.gather = gather
        self.scratch = scratch_dir("checkpoints")

    def staging_dir(self, step: int) -> Path:
        staging = self.scratch / "staging"
        shutil.rmtree(staging, ignore_errors=True)  # the previous step's files were uploaded
        path = staging / step_dir_name(step)
        path.mkdir(parents=True)
        return path

    def upload(self, staged: Path, step: int) -> dict[str, dict] | None:
        """Every rank uploads its own files of `staged` (unless step-N is sealed there already: a re-save of the
        same step keeps it). Rank 0 gets every rank's file records (None on the others, and when kept) and every
        rank's sampler file in `staged` (the bundle's chunk tracker reads them). Raises the same AiosError on
        every rank when some rank's upload failed."""
        name = step_dir_name(step)
        keep = self.gather(self._sealed_intact(name) if self.rank == 0 else None)[0]
        records, error = {}, None
        if not keep:
            try:
                records = self.remote.upload(staged, name, files_written_by(self.rank, self.world_size, self.zero_stage))
            except AiosError as exc:
                error = str(exc)
        sampler = f"sampler-rank{self.rank}.json"
        answers = self.gather({"files": records, "error": error, "sampler": (staged / sampler).read_text()})
        errors = [answer["error"] for answer in answers if answer["error"]]
        if errors:
            raise AiosError(errors[0])
        if self.rank != 0:
            return None
        for rank, answer in enumerate(answers[1:], start=1):
            (staged / f"sampler-rank{rank}.json").write_text(answer["sampler"])
        if keep:
            log.info("checkpoint %s is sealed already: kept", self.remote.describe(name))
            return None
        files = {file: record for answer in answers for file, record in answer["files"].items()}
        missing = [file for file in expected_files(self.world_size, self.zero_stage) if file not in files]
        if missing:
            raise RuntimeError(f"checkpoint {name}: {missing[0]} was not uploaded")
        return files

    def _sealed_intact(self, name: str) -> bool:
        """Rank 0, before a step is uploaded: whether it is sealed there already (then it is kept). A sealed one
        that fails its check is moved aside first, so that no old COMPLETE ever covers the new files."""
        problem = self.remote._retrying(lambda: self.remote.problem(name), name, "read")
        if problem is not None and not problem.startswith("no COMPLETE"):
            self.remote._retrying(lambda: self.remote.set_aside(name, "invalid"), name, "move aside")
        return problem is None

    def seal(self, step: int, files: dict[str, dict] | None, keep: int) -> None:
        """Rank 0: COMPLETE for the uploaded files (None: the step was kept), then pruning. The checkpoint is
        published once COMPLETE is written: a pruning that fails after it is a warning, not a stop."""
        if files is not None:
            self.remote.seal(step_dir_name(step), files)
        try:
            self.remote.prune(keep)
        except AiosError as exc:
            log.warning("checkpoint %s is saved, but pruning the older ones failed (%s); they are pruned at the "
                        "next checkpoint", self.remote.describe(step_dir_name(step)), exc)

    def restore(self, load: Callable[[Path], None], *, require: bool) -> Path | None:
        """Download the newest sealed checkpoint onto every rank's node, verify it there and `load` it; rank 0
        sets aside one that some rank cannot use and the previous one is tried."""
        tried = False
        while True:
            name = self.gather(self.remote.newest_sealed(set_aside_broken=True) if self.rank == 0 else None)[0]
            if name is None:
                from aios.train.session import no_checkpoint_left

                no_checkpoint_left(self.remote.describe(), tried=tried, require=require)
                return None
            tried = True
            local = self.scratch / "restore" / name
            try:
                self.remote.download(name, local)
                problem = verify_checkpoint(local)
            except CheckpointUnusable as exc:
                problem = str(exc)
            # All ranks agree that every node holds it intact before any loads it: loading may hold collectives
            # (DeepSpeed's), which a rank that skipped it would leave the others waiting in.
            if self.world_size > 1 and any(self.gather(problem)) and problem is None:
                problem = "another rank could not download or verify it"
            if problem is None:
                try:
                    load(local)
                except CheckpointUnusable as exc:
                    problem = str(exc)
            if problem is not None:
                log.warning("rank %d cannot use checkpoint %s: %s", self.rank, self.remote.describe(name), problem)
            if not any(self.gather(problem)):
                shutil.rmtree(local, ignore_errors=True)  # loaded: only its name is kept (describe_checkpoint)
                return local
            if self.rank == 0:
                self.remote.set_aside(name, "invalid")

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
