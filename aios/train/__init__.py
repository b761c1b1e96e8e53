"""Training: the worker loop, its session, checkpoints and optimizers.

`launch(config)` runs one training job in this process (the `LocalSession`); the Ray job runs the same
`train_worker` on every worker.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aios.config import TrainingConfig
from aios.errors import AiosError

log = logging.getLogger(__name__)


def launch(config: TrainingConfig, callbacks=None):
    """Validate what the run needs, then train in this process. Returns the `TrainResult`."""
    from aios.bundle import BrainBundle
    from aios.train.checkpoint import list_checkpoints
    from aios.train.loop import train_worker
    from aios.train.session import LocalSession, resolve_device

    unavailable = config.unavailable_features()
    if unavailable:
        raise AiosError(unavailable[0])
    if not config.dataset_file:
        raise AiosError("--dataset-file is required: pass a .txt/.jsonl/.csv file, directory or glob "
                        "(e.g. training_data/curated_datasets/test_sample.txt)")
    bundle = BrainBundle.for_run(config.bundle_dir, config.brain_name)
    existing = list_checkpoints(bundle.checkpoints_dir)
    if existing and not config.resume:
        raise AiosError(f"brain '{config.brain_name}' already has checkpoints in {bundle.checkpoints_dir}: "
                        f"pass --resume to continue it, or choose a new --brain-name")
    if config.resume and not existing:
        log.warning("--resume: brain '%s' has no checkpoint yet; starting a new run", config.brain_name)
    device = resolve_device(config.device)
    with LocalSession(bundle.checkpoints_dir, device=device, keep_checkpoints=config.keep_checkpoints,
                      resume=config.resume, stop_file=config.stop_file) as session:
        result = train_worker(config, session, callbacks)
    if result.reason == "stop" and config.stop_file and Path(config.stop_file).exists():
        Path(config.stop_file).unlink()  # consumed, so that `--resume` does not stop at once
    return result
