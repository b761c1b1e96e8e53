"""Brain bundles: `<bundle-dir>/<brain-name>/`, a normal, self-describing model directory.

    config.json              HRM ACT v1 model config
    model.safetensors        weights
    tokenizer.json (+ tokenizer_config.json, ...)
    metadata.json            name, times, steps, tokens seen, dataset fingerprints, last metrics, versions
    training_args.json       the full TrainingConfig of the run
    chunk_tracker_state.json where the data sampler is (per epoch: chunks completed and in progress; totals)
    metrics.jsonl            one JSON record per step / eval / checkpoint / stop / end
    checkpoints/step-N/      full-state checkpoints (see aios.train.checkpoint)

Loading for inference needs only config.json, model.safetensors and the tokenizer files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aios.atomic import atomic_write_json, atomic_write_text, fsync_dir, fsync_file
from aios.errors import AiosError
from aios.paths import CONFIG_NAME, HIDDEN_PREFIX, WEIGHTS_NAME

if TYPE_CHECKING:  # torch and the model load on first use: `aios brains list/push/pull` never need them
    import torch

    from aios.models.hrm_act_v1 import HRMACTv1

METADATA = "metadata.json"
TRAINING_ARGS = "training_args.json"
TRACKER = "chunk_tracker_state.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def package_versions() -> dict[str, str]:
    import numpy
    import tokenizers
    import torch
    import transformers

    from aios import __version__

    return {"aios": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


class BrainBundle:
    kind = "brain"  # what the directory holds, for messages ("expert": aios.experts.ExpertBundle)

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def for_run(cls, bundle_dir: str | Path, brain_name: str) -> BrainBundle:
        return cls(Path(bundle_dir) / brain_name)

    @classmethod
    def open(cls, name_or_path: str, bundle_dir: str | Path) -> BrainBundle:
        """An existing bundle, by name under `bundle_dir` or by path; AiosError when it is not a bundle."""
        candidate = Path(name_or_path)
        if not (candidate / CONFIG_NAME).is_file():  # not a bundle path: a name under bundle_dir
            if is_hidden_name(name_or_path):  # what `brains list` skips is not a brain by name either
                raise AiosError(f"'{name_or_path}' is not a brain name: names starting with '{HIDDEN_PREFIX}' are "
                                f"hidden staging directories; pass a name from `aios brains list` or a bundle "
                                f"directory path")
            candidate = Path(bundle_dir) / name_or_path
        bundle = cls(candidate)
        problem = bundle.missing()
        if problem:
            raise AiosError(f"'{name_or_path}' is not a brain bundle ({problem}): pass a bundle name under "
                            f"'{bundle_dir}' (see `aios brains list`) or a bundle directory")
        return bundle

    # -- paths ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    def missing(self) -> str | None:
        """What keeps this directory from loading for inference, or None."""
        if not self.root.is_dir():
            return f"no directory {self.root}"
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (self.root / name).is_file():
                return f"{name} is missing in {self.root}"
        if not any((self.root / name).is_file() for name in TOKENIZER_FILES):
            return f"no tokenizer files in {self.root}"
        try:
            json.loads((self.root / CONFIG_NAME).read_text())
        except ValueError as exc:
            return f"config.json is not valid JSON ({exc})"
        return None

    # -- write ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Hold the bundle for one training run (an advisory lock on its directory): a second run on the same
        brain, which would interleave checkpoints, is refused while this one lives."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            flag = "--expert-id" if self.kind == "expert" else "--brain-name"
            raise AiosError(f"{self.kind} '{self.name}' is being trained by another process ({self.root}): wait for "
                            f"it to finish, or choose another {flag}") from None
        try:
            yield self
        finally:
            if created and not any(self.root.iterdir()):  # a run that failed before writing leaves no trace
                self.root.rmdir()
            os.close(fd)  # releases the lock

    def write_model(self, model: HRMACTv1) -> None:
        model.save_pretrained(self.root)  # each file written atomically

    def write_tokenizer(self, tokenizer) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            for file in Path(tmp).iterdir():
                fsync_file(file)
                os.replace(file, self.root / file.name)
        fsync_dir(self.root)

    def write_training_args(self, config) -> None:
        atomic_write_text(self.root / TRAINING_ARGS, config.to_json() + "\n")

    def write_tracker(self, progress: dict) -> None:
        atomic_write_json(self.root / TRACKER, {**progress, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def update_metadata(self, *, created: float | None = None, **fields) -> dict:
        """Merge `fields` into metadata.json; `created` (unix time the brain's first run started) is kept
        from the first write on."""
        meta = self.metadata()
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta.setdefault("name", self.name)
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)) if created else now)
        meta.update(fields, updated=now, versions=package_versions())
        atomic_write_json(self.root / METADATA, meta)
        return meta

    # -- read -------------------------------------------------------------------------------------------
    def _read_json(self, name: str) -> dict:
        path = self.root / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise AiosError(f"{path} is not valid JSON ({exc}): restore it from a backup or delete it "
                            f"(it is rewritten at the next checkpoint)") from None
        if not isinstance(data, dict):
            raise AiosError(f"{path} does not hold a JSON object: restore it or delete it")
        return data

    def metadata(self) -> dict:
        return self._read_json(METADATA)

    def training_args(self) -> dict:
        return self._read_json(TRAINING_ARGS)

    def tracker(self) -> dict:
        return self._read_json(TRACKER)

    def load_model(self, device: torch.device | str = "cpu") -> HRMACTv1:
        from aios.models.hrm_act_v1 import HRMACTv1

        try:
            return HRMACTv1.from_pretrained(self.root, device=device)
        except (ValueError, OSError, RuntimeError, KeyError, TypeError) as exc:
            raise AiosError(f"bundle '{self.root}' has an unusable model ({str(exc).splitlines()[0]}): "
                            f"retrain it or restore config.json/model.safetensors from a checkpoint") from None

    def load_tokenizer(self):
        from aios.tokenizers import load_tokenizer

        return load_tokenizer(str(self.root))


def list_bundles(bundle_dir: str | Path) -> list[BrainBundle]:
    root = Path(bundle_dir)
    if not root.is_dir():
        return []
    return [BrainBundle(p) for p in sorted(root.iterdir()) if p.is_dir() and not is_hidden_name(p.name)]


def is_hidden_name(name: str) -> bool:
    """A directory name under a bundle dir that is never a brain (staging copies; see aios.paths)."""
    return name.startswith(HIDDEN_PREFIX) and name not in (".", "..") and "/" not in name and os.sep not in name
