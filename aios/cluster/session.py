"""`RaySession`: the worker loop's Session (aios/train/session.py) inside a Ray Train worker.

Checkpoints are staged beside the checkpoints and handed to `ray.train.report` with a
`checkpoint_upload_fn` that publishes them the way `LocalSession` does (`publish_checkpoint`: an atomic
rename into `<bundle>/checkpoints/step-N`, fsynced, then pruning to --keep-checkpoints intact ones), so Ray
records a checkpoint only once it is durable, and Ray itself deletes none. A restart (after a worker failure, or a rerun of the
job) resumes from the newest complete checkpoint found there, not from the one Ray's run snapshot names:
a killed worker can make Ray forget the last one reported.

A stop is requested by the stop file or by the driver (`JobChannel`, set on SIGTERM/SIGINT of the driver);
the worker asks once per step.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch

from aios.train.checkpoint import publish_checkpoint, step_dir_name
from aios.train.session import empty_step_dir, new_staging_root, restore_newest

log = logging.getLogger(__name__)

REPORTED = ("step", "loss", "lm_loss", "token_accuracy", "tokens_per_s")  # what Ray keeps of each report


@ray.remote(num_cpus=0)
class JobChannel:
    """Between the driver and the workers, wherever they run: the driver's stop request (set on its
    SIGTERM/SIGINT, read by the workers once per step) and rank 0's result of the run."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.result: dict | None = None
        self.error: str | None = None
        self.attempts = 0

    def attempt_started(self) -> int:
        """Called by rank 0 as a worker group starts: how many attempts this job has made, this one included."""
        self.attempts += 1
        return self.attempts

    def request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def stop_reason(self) -> str | None:
        return self.reason

    def set_result(self, result: dict) -> None:
        self.result = result

    def set_error(self, message: str) -> None:
        """A refusal by the worker (an AiosError): the driver raises it; Ray does not retry it."""
        self.error = message

    def get_error(self) -> str | None:
        return self.error

    def get_result(self) -> dict | None:
        return self.result


class RaySession:
    def __init__(self, checkpoints_dir: Path, *, device: torch.device, keep_checkpoints: int, stop_file: str | None,
                 channel, require_checkpoint: bool):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = device
        self.checkpoints_dir = Path(checkpoints_dir)
        self.keep = keep_checkpoints
        self.stop_file = Path(stop_file) if stop_file else None
        self.channel = channel
        self.require_checkpoint = require_checkpoint
        self._reason: str | None = None
        self._pending = None  # the question to the driver in flight (an ObjectRef)
        self._staging_root: Path | None = None
        # Worker groups this job started before this one: Ray restarts after a failure (--max-failures).
        self.restarts = ray.get(channel.attempt_started.remote()) - 1 if channel is not None and self.rank == 0 else 0

    def restore(self, load: Callable[[Path], None]) -> Path | None:
        # Always: before this job trained, the launcher refused a bundle with trained work unless --resume,
        # so a checkpoint found by a fresh run is this job's own, from an attempt that failed.
        return restore_newest(self.checkpoints_dir, load, require=self.require_checkpoint)

    def staging_dir(self, step: int) -> Path:
        if self._staging_root is None:
            self._staging_root = new_staging_root(self.checkpoints_dir)
        return empty_step_dir(self._staging_root, step)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> Path | None:
        metrics = {key: metrics[key] for key in REPORTED if key in metrics}  # the rest is in metrics.jsonl
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return None
        step = int(metrics["step"])
        published: list[Path] = []

        def publish(checkpoint: ray.train.Checkpoint, _name: str) -> ray.train.Checkpoint:
            # aios's own publication rather than Ray's copy: an atomic rename into checkpoints/step-N, fsynced,
            # a repeated step swapped atomically, and pruning of intact checkpoints only, after that.
            published.append(publish_checkpoint(Path(checkpoint.path), self.checkpoints_dir, step, self.keep))
            return ray.train.Checkpoint(str(published[0].absolute()))  # Ray reads a relative path as a bad URI

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir.absolute())),
                         checkpoint_dir_name=step_dir_name(step), checkpoint_upload_fn=publish,
                         delete_local_checkpoint_after_upload=False)
        return published[0]

    def enter_loop(self) -> None:
        pass  # a driver's SIGTERM reaches the workers only as the stop flag, read in the loop

    def stop_requested(self) -> bool:
        if self._reason is None:
            if self.stop_file and os.path.lexists(self.stop_file):
                self._reason = f"stop file {self.stop_file}"
            elif self.channel is not None:
                self._reason = self._driver_stop_reason()
        return self._reason is not None

    def _driver_stop_reason(self) -> str | None:
        """The driver's stop request, without waiting on it: each call collects the answer to the previous
        call's question if it has arrived and asks again, so a step never blocks on the driver (a request
        is seen one or two steps after it was made)."""
        if self._pending is None:
            self._pending = self.channel.stop_reason.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if not ready:
            return None
        reason, self._pending = ray.get(self._pending), None
        return reason

    def stop_reason(self) -> str:
        return self._reason or ""

    def run_info(self) -> dict:
        return {"launcher": "ray", "world_size": self.world_size, "ray_version": ray.__version__,
                "ray_storage": str(self.checkpoints_dir), "ray_restarts": self.restarts}

    def close(self) -> None:
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
