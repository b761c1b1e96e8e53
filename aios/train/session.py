"""The session interface: what the worker loop may ask of whatever runs it (DESIGN.md).

The loop never imports ray. `LocalSession` runs it in this process (tests, debugging, the CPU demo);
the Ray runner implements the same methods on top of `ray.train`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from aios.errors import AiosError, Terminated
from aios.train.checkpoint import (
    STAGING_PREFIX,
    CheckpointUnusable,
    list_checkpoints,
    publish_checkpoint,
    seal_checkpoint,
    set_aside,
    step_dir_name,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


class Session(Protocol):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def restore(self, load: Callable[[Path], None]) -> Path | None:
        """Resume: call `load(directory)` on the newest usable checkpoint and return that directory, or None.

        `load` raises CheckpointUnusable for a checkpoint whose content cannot be used (the session then
        sets it aside and tries an older one) and AiosError to refuse the resume altogether. When `load` was
        tried and no checkpoint loaded, the resume is refused (the trainer may hold part of one)."""

    def staging_dir(self, step: int) -> Path:
        """A local directory to write this rank's files of a checkpoint of `step` into before `report` (one
        directory for all ranks; the files of an earlier attempt there are overwritten or removed by the seal)."""

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> Path | None:
        """Record metrics; with `checkpoint_dir` (every rank has written its files into the same directory)
        seal it once all ranks have, and persist it. A barrier: every rank calls it equally often. Returns
        the published checkpoint on rank 0."""

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over all ranks (data parallelism: every rank holds the
        same weights and takes the same optimizer step). Called by every rank once per step."""

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of a 1-D float64 tensor over all ranks (every rank calls it equally often)."""

    def enter_loop(self) -> None:
        """From now on a stop request (signal, stop file) ends the loop after the current step; before,
        a SIGTERM interrupts the setup at once (`Terminated`)."""

    def stop_requested(self) -> bool:
        """True once a graceful stop was asked for (stop file, SIGTERM, SIGINT)."""

    def stop_reason(self) -> str:
        """Why the stop was requested (for the metrics log)."""

    def preemption_notice(self) -> str | None:
        """What is about to take a node of this job away (a spot reclaim, a drain before a scale-down), or None.
        Every rank calls it equally often and gets the same answer (on Ray it is a barrier)."""

    def run_info(self) -> dict:
        """How this run is executed, for metadata.json: launcher, world size and the launcher's own facts."""

    def metrics_sink(self, brain: str, run: str | None) -> Callable[[dict], None] | None:
        """Rank 0: where the metrics log's records also go (on Ray: Ray metrics, for the dashboard), or None."""

    def describe_checkpoint(self, directory: Path) -> str:
        """Where a checkpoint that `restore` or `report` returned lives, as the user would write it."""


def resolve_device(name: str, cuda_ids: str | None = None) -> torch.device:
    """The device of an in-process run (`--cuda-ids`: its first GPU); refuses GPUs this machine does not have."""
    if cuda_ids is not None:
        if not torch.cuda.is_available():
            raise AiosError(f"--cuda-ids {cuda_ids}: no CUDA device is visible on this machine; drop --cuda-ids "
                            f"(or use --device cpu)")
        count = torch.cuda.device_count()
        missing = [i for i in map(int, cuda_ids.split(",")) if i >= count]
        if missing:
            raise AiosError(f"--cuda-ids {cuda_ids}: this machine has {count} CUDA device(s), numbered 0 to "
                            f"{count - 1}, so GPU {missing[0]} does not exist; pick from those")
        return torch.device("cuda", int(cuda_ids.split(",")[0]))
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise AiosError("--device cuda: no CUDA device is visible; use --device cpu or --device auto")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def restore_newest(checkpoints_dir: Path, load: Callable[[Path], None], *, require: bool) -> Path | None:
    """`load` the newest usable checkpoint in `checkpoints_dir` and return it (None when there is none).

    A checkpoint that fails verification or that `load` finds unusable is set aside and the previous one is
    tried; at the end see `no_checkpoint_left`."""
    tried = False
    while (candidate := newest_verified(checkpoints_dir)) is not None:
        tried = True
        try:
            load(candidate)
            return candidate
        except CheckpointUnusable as exc:
            log.warning("skipping checkpoint %s: it cannot be loaded (%s); trying the previous one", candidate, exc)
            set_aside(candidate, "invalid")
    no_checkpoint_left(checkpoints_dir, tried=tried, require=require)
    return None


def newest_verified(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that passes verification; newer ones that fail it are set aside."""
    for candidate in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        log.warning("skipping checkpoint %s: %s; trying the previous one", candidate, problem)
        set_aside(candidate, "invalid")
    return None


def no_checkpoint_left(checkpoints_dir: Path, *, tried: bool, require: bool) -> None:
    """The search found no usable checkpoint: refuse the resume when `load` was tried on one (it may have
    applied part of it) or, with `require`, when the bundle holds trained work; else a fresh start."""
    if tried:
        raise AiosError(f"no checkpoint in {checkpoints_dir} could be loaded (they were moved aside as "
                        f"step-N.invalid-*): repair one and resume, or train a new --brain-name")
    if require:
        raise AiosError(f"--resume: no intact checkpoint in {checkpoints_dir} (invalid ones were moved aside as "
                        f"step-N.invalid-*): repair one, or train a new --brain-name")


def new_staging_root(checkpoints_dir: Path) -> Path:
    """A fresh `.staging-*` directory beside the checkpoints (so publishing is a rename; removed at the next
    start if the process is killed)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=checkpoints_dir))


def empty_step_dir(staging_root: Path, step: int) -> Path:
    path = staging_root / step_dir_name(step)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def consume_stop_file(stop_file: str | Path | None) -> None:
    """Remove the stop file that stopped this run, so that `--resume` does not stop at once. It did not
    exist when the run started (checked), so it is not a user's file; a directory is left alone."""
    if not (stop_file and os.path.lexists(stop_file)):
        return
    stop_file = Path(stop_file)
    if stop_file.is_dir() and not stop_file.is_symlink():
        log.warning("--stop-file %s is a directory: left in place; remove it before --resume", stop_file)
        return
    stop_file.unlink()


class LocalSession:
    """One process, rank 0 of 1. Checkpoints go to `<bundle>/checkpoints/step-N`."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, checkpoints_dir: Path, *, device: torch.device, keep_checkpoints: int,
                 resume: bool, stop_file: str | None = None, require_checkpoint: bool = False, remote=None):
        """`remote`: a RemoteCheckpoints (aios.train.run_storage) that holds the checkpoints instead of
        `checkpoints_dir` (then only the staging directory is local)."""
        self.device = device
        self.checkpoints_dir = Path(checkpoints_dir)
        self.remote = None
        if remote is not None:
            from aios.train.run_storage import RemoteCheckpointing

            self.remote = RemoteCheckpointing(remote, rank=0, world_size=1, gather=lambda value: [value])
        self.keep = keep_checkpoints
        self.resume = resume
        self.require_checkpoint = require_checkpoint  # resuming a bundle that holds trained work
        # The launcher has checked that no file is there yet: whatever appears there was put there to stop us.
        self.stop_file = Path(stop_file) if stop_file else None
        self.signal_received: str | None = None
        self.in_loop = False
        self._staging_root: Path | None = None
        self._previous_handlers: dict = {}

    # -- signals --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def handle_signals(self):
        """SIGTERM/SIGINT: during setup, stop at once (Terminated / KeyboardInterrupt); in the loop, the first
        one asks for a graceful stop after the current step and a second one acts as usual."""
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        self._previous_handlers = previous
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if not self.in_loop:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(name)
        self.signal_received = name
        log.warning("%s received: finishing the current step, then checkpointing and stopping (send it again "
                    "to stop at once)", name)
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def enter_loop(self) -> None:
        self.in_loop = True

    def stop_requested(self) -> bool:
        return self.signal_received is not None or bool(self.stop_file and os.path.lexists(self.stop_file))

    def stop_reason(self) -> str:
        if self.signal_received:
            return self.signal_received
        return f"stop file {self.stop_file}"

    def preemption_notice(self) -> str | None:
        return None  # one process on this machine: nothing announces its end

    def run_info(self) -> dict:
        return {"launcher": "local", "world_size": 1}

    def metrics_sink(self, brain: str, run: str | None) -> None:
        return None  # the metrics log and the console are this process's watchers

    def describe_checkpoint(self, directory: Path | None) -> str:
        if directory is None:  # a rank other than 0 after a report
            return ""
        return self.remote.remote.describe(directory.name) if self.remote else str(directory)

    def consume_stop_file(self) -> None:
        consume_stop_file(self.stop_file)

    # -- checkpoints ----------------------------------------------------------------------------------
    def restore(self, load: Callable[[Path], None]) -> Path | None:
        if not self.resume:
            return None
        if self.remote:
            return self.remote.restore(load, require=self.require_checkpoint)
        return restore_newest(self.checkpoints_dir, load, require=self.require_checkpoint)

    def staging_dir(self, step: int) -> Path:
        if self.remote:
            return self.remote.staging_dir(step)
        if self._staging_root is None:
            self._staging_root = new_staging_root(self.checkpoints_dir)
        return empty_step_dir(self._staging_root, step)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        pass  # one rank: its gradients are the sum

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> Path | None:
        if checkpoint_dir is None:
            return None
        if self.remote:
            step = int(metrics["step"])
            self.remote.seal(step, self.remote.upload(Path(checkpoint_dir), step), self.keep)
            return Path(checkpoint_dir)
        seal_checkpoint(Path(checkpoint_dir))
        return publish_checkpoint(Path(checkpoint_dir), self.checkpoints_dir, int(metrics["step"]), self.keep)

    def close(self) -> None:
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
        if self.remote:
            self.remote.close()
