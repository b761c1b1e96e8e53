"""Full-state checkpoints: everything needed to continue a run bit for bit.

One directory per saved step (DESIGN.md):

    step-000120/
      model.safetensors          weights (float32 master copy)
      optimizer.pt               optimizer + scheduler + scaler state (tensors and plain types only)
      rng-rank{r}.pt             torch / cuda / numpy / python RNG states of rank r
      carry-rank{r}.safetensors  the ACT carries of rank r (one per accumulation micro-step)
      sampler-rank{r}.json       the chunk sampler's cursor of rank r
      state.json                 step, epoch, tokens seen, world size, config hash, ...
      COMPLETE                   written last: sha256 and size of every file above

A directory is built under a temporary name and renamed into place, and a checkpoint counts only when
COMPLETE exists and every file matches its recorded hash, so a crash or a truncated copy is never
mistaken for a checkpoint. Invalid ones are skipped with a warning and never deleted.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aios.hashing import sha256_file
from aios.models.hrm_act_v1 import ACTCarry

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# -- RNG state --------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """RNG states as tensors and plain types, loadable with torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- write ------------------------------------------------------------------------------------------


def write_checkpoint_files(directory: Path, *, rank: int, model: torch.nn.Module | None, optimizer_state: dict | None,
                           carries: list[ACTCarry], sampler_state: dict, state: dict | None) -> None:
    """Write this rank's files into `directory` (rank 0 also writes the shared ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        weights = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
                   for k, v in model.state_dict().items()}
        save_file(weights, directory / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / "optimizer.pt")
    torch.save(capture_rng_state(), directory / f"rng-rank{rank}.pt")
    flat = {}
    for i, carry in enumerate(carries):
        flat.update({f"{i}.{k}": v.cpu() for k, v in carry.state_dict().items()})
    save_file(flat, directory / f"carry-rank{rank}.safetensors")
    (directory / f"sampler-rank{rank}.json").write_text(json.dumps(sampler_state, indent=1) + "\n")
    if state is not None:
        (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def seal_checkpoint(directory: Path) -> None:
    """Write COMPLETE (hashes of every file) last: from then on the directory is a checkpoint."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMPLETE}
    tmp = directory / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    tmp.replace(directory / COMPLETE)


def publish_checkpoint(staged: Path, checkpoints_dir: Path, step: int, keep: int) -> Path:
    """Move a sealed staging directory into `checkpoints_dir/step-N` atomically; keep the newest `keep`."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    previous = None
    if final.exists():  # the same step saved again (e.g. a resume that ends where it started)
        if verify_checkpoint(final) is None:
            previous = final.with_name(f".replaced-{final.name}-{int(time.time())}")
            final.rename(previous)  # dropped only once the new copy is in place
        else:
            set_aside(final, "invalid")
    shutil.move(str(staged), final)  # a rename: staging lives beside the checkpoints
    if previous is not None:
        shutil.rmtree(previous)
    prune_checkpoints(checkpoints_dir, keep)
    return final


def set_aside(directory: Path, reason: str) -> Path:
    """Rename a checkpoint that must not be used out of the step-N namespace; never delete it."""
    aside = directory.with_name(f"{directory.name}.{reason}-{int(time.time())}")
    log.warning("moving checkpoint %s aside to %s", directory, aside.name)
    directory.rename(aside)
    return aside


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete intact checkpoints beyond the newest `keep` intact ones; invalid ones are never deleted."""
    intact = [p for p in list_checkpoints(checkpoints_dir) if verify_checkpoint(p) is None]
    for old in intact[:-keep]:
        shutil.rmtree(old)


# -- read -------------------------------------------------------------------------------------------


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """step-N directories, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


# Hashing a large checkpoint takes seconds: remember the verdict while no file in it has changed.
_verified: dict[tuple, str | None] = {}


def verify_checkpoint(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    marker = directory / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (partial write)"
    key = (str(directory.resolve()),
           *sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()))
    if key not in _verified:
        _verified[key] = _verify_files(directory, marker)
    return _verified[key]


def _verify_files(directory: Path, marker: Path) -> str | None:
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable COMPLETE marker ({exc})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def find_latest_checkpoint(checkpoints_dir: Path, set_aside_invalid: bool = False) -> Path | None:
    """The newest intact checkpoint. Newer invalid ones are reported, skipped and (when resuming) set
    aside as step-N.invalid-<time>, so that later saves and pruning never mistake them for progress."""
    for candidate in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        log.warning("skipping checkpoint %s: %s; trying the previous one", candidate, problem)
        if set_aside_invalid:
            set_aside(candidate, "invalid")
    return None


def load_state(directory: Path) -> dict:
    return json.loads((directory / "state.json").read_text())


def load_model_weights(directory: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors", device=str(device))


def load_optimizer_state(directory: Path) -> dict:
    return torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)


def load_rank_files(directory: Path, rank: int, device: torch.device | str = "cpu"):
    """(rng state, carries, sampler state) of one rank."""
    rng = torch.load(directory / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)
    flat = load_file(directory / f"carry-rank{rank}.safetensors", device=str(device))
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        grouped.setdefault(int(index), {})[name] = value
    carries = [ACTCarry.from_state_dict(grouped[i]) for i in sorted(grouped)]
    sampler_state = json.loads((directory / f"sampler-rank{rank}.json").read_text())
    return rng, carries, sampler_state
