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
    from aios.models.hrm_act_v1 import WEIGHTS_NAME
    from aios.train.loop import Trainer
    from aios.train.session import LocalSession, resolve_device

    unavailable = config.unavailable_features()
    if unavailable:
        raise AiosError(unavailable[0])
    if not config.dataset_file:
        raise AiosError("--dataset-file is required: pass a .txt/.jsonl/.csv file, directory or glob "
                        "(e.g. training_data/curated_datasets/test_sample.txt)")
    bundle = BrainBundle.for_run(config.bundle_dir, config.brain_name)
    _check_output_paths(config, bundle.root)
    checkpoints = bundle.checkpoints_dir
    has_work = (bundle.root / WEIGHTS_NAME).exists() or (checkpoints.is_dir() and any(
        p.name.startswith("step-") for p in checkpoints.iterdir()))
    if has_work and not config.resume:
        raise AiosError(f"brain '{config.brain_name}' already holds a trained model in {bundle.root}: pass "
                        f"--resume to continue it, or choose a new --brain-name")
    if config.resume and not has_work:
        log.warning("--resume: brain '%s' has no checkpoint yet; starting a new run", config.brain_name)
    session = LocalSession(checkpoints, device=resolve_device(config.device),
                           keep_checkpoints=config.keep_checkpoints, resume=config.resume,
                           stop_file=config.stop_file, require_checkpoint=has_work)
    try:
        trainer = Trainer(config, session, callbacks)  # data preparation: Ctrl-C interrupts it as usual
        with session.handle_signals():
            result = trainer.run()
    finally:
        session.close()
    if result.reason == "stop" and config.stop_file and Path(config.stop_file).exists():
        Path(config.stop_file).unlink()  # consumed, so that `--resume` does not stop at once
    return result


def _check_output_paths(config: TrainingConfig, bundle_root: Path) -> None:
    """Refuse output locations that exist as the wrong kind of thing, before any work."""
    for flag, path in (("--bundle-dir", Path(config.bundle_dir)), ("--data-cache-dir", Path(config.data_cache_dir))):
        if path.exists() and not path.is_dir():
            raise AiosError(f"{flag} {path} is a file, not a directory: pass a directory path")
    if bundle_root.exists() and not bundle_root.is_dir():
        raise AiosError(f"the bundle path {bundle_root} is a file: remove it or choose another --brain-name")
    if config.log_file and Path(config.log_file).is_dir():
        raise AiosError(f"--log-file {config.log_file} is a directory: pass a file path such as "
                        f"{Path(config.log_file) / 'metrics.jsonl'}")
