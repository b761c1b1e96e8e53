"""`RaySession`: the worker loop's Session (aios/train/session.py) inside a Ray Train worker.

Checkpoints are staged beside the checkpoints and handed to `ray.train.report` with a
`checkpoint_upload_fn` that publishes them the way `LocalSession` does (`publish_checkpoint`: an atomic
rename into `<bundle>/checkpoints/step-N`, fsynced, then pruning to --keep-checkpoints intact ones), so Ray
records a checkpoint only once it is durable, and Ray itself deletes none. A restart (after a worker failure, or a rerun of the
job) resumes from the newest complete checkpoint found there, not from the one Ray's run snapshot names:
a killed worker can make Ray forget the last one reported.

Several workers: data parallelism on Ray's process group (gloo on CPU, nccl on GPU). Every rank holds the
same weights; after the backward passes of a step (and the ranks' agreement that none ran out of memory)
the gradients are summed over the ranks in one all-reduce of a flat buffer (`sum_gradients`). The loop
divides the loss by the global batch, so one worker accumulating W micro-batches and W workers with one
each compute the same sum, bit for bit for W = 2. The workers write their checkpoint files into one staging directory (the driver makes it, on
the node they share); once all have (a barrier), rank 0 seals it, so COMPLETE covers every rank's files,
and hands it to `ray.train.report`; the other ranks report without a checkpoint. On restart rank 0 picks the
newest intact checkpoint, every rank loads it, and all agree before it is used (one that some rank cannot
load is set aside by rank 0 and the previous one is tried).

A stop is requested by the stop file or by the driver (`JobChannel`, set on SIGTERM/SIGINT of the driver);
every worker asks once per step attempt, and the loop agrees on it across ranks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist

from aios.train.checkpoint import (
    CheckpointUnusable,
    publish_checkpoint,
    seal_checkpoint,
    set_aside,
    step_dir_name,
)
from aios.train.session import newest_verified, no_checkpoint_left, restore_newest

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
                 channel, require_checkpoint: bool, staging_root: Path | None, remote=None,
                 zero_stage: str | None = None):
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
        self.staging_root = Path(staging_root) if staging_root else None  # shared by the workers (made by the driver)
        # --storage-path s3://...: checkpoints staged on each worker's node, uploaded by every rank, sealed by rank 0
        self.remote = None
        if remote is not None:
            from aios.train.run_storage import RemoteCheckpointing

            self.remote = RemoteCheckpointing(remote, rank=self.rank, world_size=self.world_size, gather=self._gather,
                                              zero_stage=zero_stage)
        self._flat: torch.Tensor | None = None  # the gradient all-reduce buffer
        # Worker groups this job started before this one: Ray restarts after a failure (--max-failures).
        self.restarts = ray.get(channel.attempt_started.remote()) - 1 if channel is not None and self.rank == 0 else 0

    def restore(self, load: Callable[[Path], None]) -> Path | None:
        # Always: before this job trained, the launcher refused a bundle with trained work unless --resume,
        # so a checkpoint found by a fresh run is this job's own, from an attempt that failed.
        if self.remote:
            return self.remote.restore(load, require=self.require_checkpoint)
        if self.world_size == 1:
            return restore_newest(self.checkpoints_dir, load, require=self.require_checkpoint)
        tried = False
        while True:
            newest = newest_verified(self.checkpoints_dir) if self.rank == 0 else None
            name = self._broadcast(newest.name if newest is not None else None)
            if name is None:  # every rank got the same broadcast: all end the search together
                no_checkpoint_left(self.checkpoints_dir, tried=tried, require=self.require_checkpoint)
                return None
            candidate = self.checkpoints_dir / name
            tried = True
            try:
                load(candidate)
                problem = None
            except CheckpointUnusable as exc:
                problem = str(exc)
                log.warning("rank %d cannot load checkpoint %s: %s", self.rank, candidate, problem)
            failed = self.all_reduce(torch.tensor([float(problem is not None)], dtype=torch.float64,
                                                  device=self._collective_device())).item()
            if not failed:
                return candidate
            if self.rank == 0:  # some rank could not load it: like corruption, set aside; try the previous one
                set_aside(candidate, "invalid")

    def _gather(self, value) -> list:
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def _broadcast(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size > 1:
            self._flat = sum_gradients(params, self._flat)

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        device = values.device
        buffer = values.to(self._collective_device())
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(device)

    def staging_dir(self, step: int) -> Path:
        if self.remote:
            return self.remote.staging_dir(step)  # this rank's own, on its node
        path = self.staging_root / step_dir_name(step)
        path.mkdir(parents=True, exist_ok=True)  # every rank writes its own files here; rank 0 seals
        return path

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> Path | None:
        metrics = {key: metrics[key] for key in REPORTED if key in metrics}  # the rest is in metrics.jsonl
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return None
        if self.remote:
            return self._report_remote(metrics, checkpoint_dir)
        if self.world_size > 1:
            dist.barrier()  # every rank's files are written (and fsynced)
        if self.rank != 0:
            ray.train.report(metrics)  # rank 0 reports the checkpoint; a barrier like every report
            return None
        seal_checkpoint(checkpoint_dir)  # COMPLETE covers every rank's files
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

    def _report_remote(self, metrics: dict, checkpoint_dir: Path) -> Path | None:
        """Every rank uploads its files; rank 0 seals the step in Ray's checkpoint_upload_fn, so that Ray records
        the checkpoint (on the remote storage) once it is published."""
        step = int(metrics["step"])
        files = self.remote.upload(checkpoint_dir, step)
        if self.rank != 0:
            ray.train.report(metrics)
            return None
        def seal(_checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            self.remote.seal(step, files, self.keep)
            # Named with Ray's own storage objects, so that Ray sees it inside its run directory (the same
            # folder: RunConfig's storage is <storage-path>/<brain>, its name "checkpoints").
            storage = ray.train.get_context().get_storage()
            return ray.train.Checkpoint(f"{storage.experiment_fs_path}/{name}", filesystem=storage.storage_filesystem)

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir.absolute())),
                         checkpoint_dir_name=step_dir_name(step), checkpoint_upload_fn=seal,
                         delete_local_checkpoint_after_upload=False)
        return checkpoint_dir

    def describe_checkpoint(self, directory: Path | None) -> str:
        if directory is None:  # a rank other than 0 after a report
            return ""
        return self.remote.remote.describe(directory.name) if self.remote else str(directory)

    def enter_loop(self) -> None:
        pass  # a driver's SIGTERM reaches the workers only as the stop flag, read in the loop

    def stop_requested(self) -> bool:
        if self._reason is None:
            if self.stop_file and os.path.lexists(self.stop_file):
                self._reason = f"stop file {self.stop_file}"
            elif self.channel is not None:
                self._reason = self._driver_stop_reason()
        return self._reason is not None

    def request_stop_here(self, reason: str) -> None:
        """A stop request seen by this rank only (the test fault hook uses it); the loop agrees on it."""
        self._reason = self._reason or reason

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

    def preemption_notice(self) -> str | None:
        info = ray.train.get_preemption_info()  # a barrier: every rank asks at the same steps
        if info is None:
            return None
        when = (f" in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s" if info.deadline_ms else "")
        nodes = ", ".join(node[:12] for node in info.preempted_node_ids)
        return f"node {nodes} (ranks {', '.join(map(str, info.preempted_ranks))}) is being drained{when}"

    def stop_reason(self) -> str:
        return self._reason or ""

    def run_info(self) -> dict:
        return {"launcher": "ray", "world_size": self.world_size, "ray_version": ray.__version__,
                "ray_storage": self.remote.remote.describe() if self.remote else str(self.checkpoints_dir), "ray_restarts": self.restarts,
                "torch_threads": torch.get_num_threads()}

    def metrics_sink(self, brain: str, run: str | None):
        """Ray metrics of the run (loss, eval loss, tokens/s, segments, restarts), exported by rank 0."""
        if self.rank != 0:
            return None
        from aios.cluster.metrics import RayMetrics

        return RayMetrics(brain, run, restarts=self.restarts, world_size=self.world_size)

    def close(self) -> None:
        if self.remote:  # this rank's node-local staging and downloads (the driver removes the shared staging)
            self.remote.close()


def sum_gradients(params: list[torch.nn.Parameter], flat: torch.Tensor | None) -> torch.Tensor:
    """Replace every gradient by its sum over the default process group's ranks, in one all-reduce of a flat
    buffer (`flat`, allocated on the first call and returned for the next). A parameter no rank has a
    gradient for (an expert no token chose) keeps none, as on one worker, so the optimizer skips it there too
    (a zero gradient would still decay its weights)."""
    total = sum(p.numel() for p in params)
    if flat is None:  # the gradients, then one has-a-gradient flag per parameter
        flat = torch.empty(total + len(params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        part = flat[offset:offset + p.numel()]
        part.copy_(p.grad.reshape(-1)) if p.grad is not None else part.zero_()
        offset += p.numel()
    flat[total:].copy_(torch.tensor([p.grad is not None for p in params], dtype=flat.dtype))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, anyone in zip(params, flat[total:].tolist(), strict=True):
        part = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if not anyone:
            p.grad = None
        elif p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)
    return flat

