"""Training: the worker loop, its session, checkpoints and optimizers.

`launch(config)` checks what the run needs, then runs one training job: in this process (the
`LocalSession`, `--launcher local`) or as a Ray Train job whose workers run the same `Trainer`
(`aios.cluster`, `--launcher ray`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from aios.config import TrainingConfig
from aios.errors import AiosError
from aios.train.metrics import metrics_log_of

log = logging.getLogger(__name__)


def launch(config: TrainingConfig, callbacks=None):
    """Check what the run needs, then train in this process. Returns the `TrainResult`.

    Everything a user can get wrong is refused before anything is written. A resume whose --steps is
    already reached changes nothing and returns reason "already_reached".
    """
    from aios.bundle import BrainBundle
    from aios.models.hrm_act_v1 import WEIGHTS_NAME
    from aios.train.checkpoint import newest_intact_checkpoint, remove_leftovers, saved_step
    from aios.train.loop import Trainer, TrainResult
    from aios.train.session import LocalSession, resolve_device

    unavailable = config.unavailable_features()
    if unavailable:
        raise AiosError(unavailable[0])
    if config.ddp and config.max_workers == 1:
        log.warning("--ddp with one worker: nothing to run in parallel; pass --world-size N (N > 1) for "
                    "data-parallel training")
    if not config.dataset_file:
        raise AiosError("--dataset-file is required: pass a .txt/.jsonl/.csv file, directory or glob "
                        "(e.g. training_data/curated_datasets/test_sample.txt)")
    from aios.train.remote import RemoteBrain, with_local_sources
    from aios.train.run_storage import RemoteCheckpoints, checkpoints_location

    if config.expert_id:  # expert training: the base brain is read (checked here), the expert's dir written
        from aios.experts import expert_bundle, expert_run_config

        config = expert_run_config(config)
        remote, bundle = None, expert_bundle(config)
    else:
        remote = RemoteBrain.of(config)  # a remote bundle dir: train in its local copy, brought up to date first
        bundle = remote.bring_up_to_date() if remote else BrainBundle.for_run(config.bundle_dir, config.brain_name)
    # --storage-path: the checkpoints live there (a local directory, or RemoteCheckpoints on S3)
    location = checkpoints_location(config, bundle.checkpoints_dir)
    remote_checkpoints = location if isinstance(location, RemoteCheckpoints) else None
    checkpoints = bundle.checkpoints_dir if remote_checkpoints else location
    if remote_checkpoints:
        remote_checkpoints.storage.check()
        has_checkpoints = remote_checkpoints.has_any()
    else:
        has_checkpoints = checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())
    has_weights = bundle.has_weights() if config.expert_id else (bundle.root / WEIGHTS_NAME).exists()
    has_work = has_weights or has_checkpoints  # set-aside checkpoints too: trained work
    if has_work and not config.resume:
        if config.run_name and _recorded_run_name(bundle) == config.run_name:
            log.info("run '%s' has trained brain '%s' before: continuing it from its newest checkpoint",
                     config.run_name, config.expert_id or config.brain_name)
            config = config.replace(resume=True, check_paths=False)
        elif config.expert_id:
            raise AiosError(f"expert '{config.expert_id}' already exists in {bundle.root}: pass --resume to continue "
                            f"it (or the --run-name it was trained with), or choose a new --expert-id")
        else:
            raise AiosError(f"brain '{config.brain_name}' already holds a trained model in {bundle.root}: pass "
                            f"--resume to continue it (or the --run-name it was trained with), or choose a new "
                            f"--brain-name")
    if config.resume and has_work:
        if remote_checkpoints:
            newest = remote_checkpoints.newest_sealed(set_aside_broken=False)
            reached = remote_checkpoints.saved_step(newest) if newest is not None else None
        else:
            newest = newest_intact_checkpoint(checkpoints)
            reached = saved_step(newest) if newest is not None else None
        if reached is not None and reached >= config.steps:
            if remote:  # a run whose last push failed: the remote gets what the local copy holds
                remote.push()
            return TrainResult(step=reached, reason="already_reached", final_eval=None, bundle=bundle.root)
    if config.resume and not has_work:
        log.warning("--resume: brain '%s' has no checkpoint yet; starting a new run", config.brain_name)
    _check_stop_file(config.stop_file)
    device = resolve_device(config.device, config.cuda_ids)
    created = _check_output_paths(config, bundle.root, resuming=has_work,
                                  checkpoints=None if remote_checkpoints else checkpoints)
    config = with_local_sources(config)  # an s3:// --dataset-file/--eval-file: prepared from its download
    try:
        if config.launcher == "ray":
            if callbacks is not None:
                raise ValueError("training callbacks run in this process: use launcher 'local' with them")
            from aios.cluster import run_on_ray

            with bundle.lock():
                remove_leftovers(checkpoints)
                result = run_on_ray(config, bundle, require_checkpoint=has_work)
            if remote:  # rank 0 may have trained on another node: this machine's copy gets what it pushed
                local = remote.bring_up_to_date().root
                result = dataclasses.replace(result, bundle=local,
                                             plot=local / result.plot.name if result.plot else None)
            return result
        session = LocalSession(checkpoints, device=device, keep_checkpoints=config.keep_checkpoints,
                               resume=config.resume, stop_file=config.stop_file, require_checkpoint=has_work,
                               remote=remote_checkpoints)
        with bundle.lock(), session.handle_signals():  # SIGTERM from here on: a clean exit (see LocalSession)
            remove_leftovers(checkpoints)
            try:
                return Trainer(config, session, callbacks).run()
            finally:
                session.close()
                session.consume_stop_file()  # one that appeared during the run, whether or not it stopped it
    finally:
        _remove_if_empty(created)  # a run refused before it wrote anything leaves no trace


def already_reached_message(config: TrainingConfig, step: int) -> str:
    return (f"brain '{config.brain_name}' is at step {step}; --steps {config.steps} is already reached: "
            f"nothing to train (pass a larger --steps to continue it)")


def _writable_dir(flag: str, path: Path, created: list[Path], what: str = "") -> None:
    """Create `path` (and its parents; each one made is appended to `created`) or refuse in one line naming
    the path and the reason."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        created.extend(reversed(missing))
    except FileExistsError:
        raise AiosError(f"{flag} {path}{what} is a file, not a directory: pass a directory path") from None
    except OSError as exc:
        raise AiosError(f"{flag} {path}{what}: cannot create it ({exc.strerror or exc}); pass a directory you "
                        f"can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise AiosError(f"{flag} {path}{what}: no permission to write there; pass a directory you can write to")


def _check_output_paths(config: TrainingConfig, bundle_root: Path, *, resuming: bool,
                        checkpoints: Path | None = None) -> list[Path]:
    """Every output location is the right kind of thing and can be created and written, before any work
    (the checks that create nothing come first)."""
    if bundle_root.exists() and not bundle_root.is_dir():
        raise AiosError(f"the bundle path {bundle_root} is a file: remove it or choose another --brain-name")
    log_file = Path(config.log_file) if config.log_file else None
    if log_file is not None:
        if log_file.is_dir():
            raise AiosError(f"--log-file {log_file} is a directory: pass a file path such as "
                            f"{log_file / 'metrics.jsonl'}")
        if log_file.exists() and not resuming:
            raise AiosError(f"--log-file {log_file} already exists: pass a new file (a --resume of this brain "
                            f"continues its own log)")
        if log_file.exists() and not metrics_log_of(log_file, config.brain_name):
            raise AiosError(f"--log-file {log_file} is not a metrics log of brain '{config.brain_name}' (its first "
                            f"record is not this brain's start record): pass this brain's log or a new file")
        if log_file.exists() and not os.access(log_file, os.W_OK):
            raise AiosError(f"--log-file {log_file}: no permission to write it; pass a file you can write")
    created: list[Path] = []
    if config.expert_id:
        _writable_dir("--experts-dir", bundle_root.parent, created)
    else:
        _writable_dir("--bundle-dir", bundle_root.parent, created,
                      f" (the local copy of {config.bundle_dir})" if bundle_root.parent != Path(config.bundle_dir)
                      else "")
    if config.storage_path and checkpoints is not None:  # a local --storage-path
        if checkpoints.parent.exists() and not checkpoints.parent.is_dir():
            raise AiosError(f"--storage-path: {checkpoints.parent} is a file: remove it or pass another --storage-path")
        _writable_dir("--storage-path", checkpoints, created, f" (the checkpoints of brain '{config.brain_name}')")
    _writable_dir("--data-cache-dir", Path(config.data_cache_dir), created)
    if log_file is not None:
        _writable_dir("--log-file", log_file.parent, created, f" (the directory of {log_file})")
    return created


def _remove_if_empty(directories: list[Path]) -> None:
    """Remove the output directories this launch created and left empty (deepest first)."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:  # not empty (the run wrote into it), or already gone
            pass


def _check_stop_file(stop_file: str | None) -> None:
    """The stop file must not exist yet: only one that appears during the run is a request (and removed)."""
    if not stop_file:
        return
    path = Path(stop_file)
    if path.is_dir():
        raise AiosError(f"--stop-file {path} is a directory: pass the path of a file that does not exist yet")
    if os.path.lexists(path):
        raise AiosError(f"--stop-file {path}: the stop file already exists; remove it first (aios removes only a "
                        f"stop file that appears during the run)")
    if not path.parent.is_dir():
        raise AiosError(f"--stop-file {path}: its directory {path.parent} does not exist; create it or pass "
                        f"another path")


def _recorded_run_name(bundle) -> str | None:
    """The --run-name the bundle was last trained under (metadata.json), if any."""
    try:
        run = bundle.metadata().get("run") or {}
    except Exception:  # noqa: BLE001 - an unreadable metadata.json names no run
        return None
    return run.get("run_name") if isinstance(run, dict) else None
