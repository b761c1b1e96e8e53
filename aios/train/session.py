"""The session interface: what the worker loop may ask of whatever runs it (DESIGN.md).

The loop never imports ray. `LocalSession` runs it in this process (tests, debugging, the CPU demo);
the Ray runner implements the same methods on top of `ray.train`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from aios.errors import AiosError
from aios.train.checkpoint import find_latest_checkpoint, publish_checkpoint

log = logging.getLogger(__name__)


class Session(Protocol):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def restore(self) -> Path | None:
        """The newest complete checkpoint directory to resume from, or None."""

    def staging_dir(self, step: int) -> Path:
        """An empty local directory to write a checkpoint of `step` into before `report`."""

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> Path | None:
        """Record metrics and persist a sealed checkpoint. A barrier: every rank calls it equally often."""

    def stop_requested(self) -> bool:
        """True once a graceful stop was asked for (stop file, SIGTERM, SIGINT)."""

    def stop_reason(self) -> str:
        """Why the stop was requested (for the metrics log)."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise AiosError("--device cuda: no CUDA device is visible; use --device cpu or --device auto")
        return torch.device("cuda", 0)
    return torch.device("cpu")


class LocalSession:
    """One process, rank 0 of 1. Checkpoints go to `<bundle>/checkpoints/step-N`."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, checkpoints_dir: Path, *, device: torch.device, keep_checkpoints: int,
                 resume: bool, stop_file: str | None = None, require_checkpoint: bool = False):
        self.device = device
        self.checkpoints_dir = Path(checkpoints_dir)
        self.keep = keep_checkpoints
        self.resume = resume
        self.require_checkpoint = require_checkpoint  # resuming a bundle that holds trained work
        self.stop_file = Path(stop_file) if stop_file else None
        self.signal_received: str | None = None
        self._staging_root: Path | None = None
        self._previous_handlers: dict = {}

    @contextlib.contextmanager
    def handle_signals(self):
        """While training: the first SIGTERM/SIGINT asks for a graceful stop, a second one acts as usual."""
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

    def close(self) -> None:
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)

    def _on_signal(self, signum, _frame) -> None:
        self.signal_received = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then checkpointing and stopping (send it again "
                    "to stop at once)", self.signal_received)
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def restore(self) -> Path | None:
        if not self.resume:
            return None
        found = find_latest_checkpoint(self.checkpoints_dir, set_aside_invalid=True)
        if found is None and self.require_checkpoint:
            raise AiosError(f"--resume: no intact checkpoint in {self.checkpoints_dir} (invalid ones were moved "
                            f"aside as step-N.invalid-*): repair one, or train a new --brain-name")
        return found

    def staging_dir(self, step: int) -> Path:
        if self._staging_root is None:  # beside the checkpoints, so publishing is a rename
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            self._staging_root = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.checkpoints_dir))
        path = self._staging_root / f"step-{step:06d}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> Path | None:
        if checkpoint_dir is None:
            return None
        return publish_checkpoint(Path(checkpoint_dir), self.checkpoints_dir, int(metrics["step"]), self.keep)

    def stop_requested(self) -> bool:
        return self.signal_received is not None or bool(self.stop_file and self.stop_file.exists())

    def stop_reason(self) -> str:
        if self.signal_received:
            return self.signal_received
        return f"stop file {self.stop_file}"
