"""Full-state checkpoints: everything needed to continue a run bit for bit.

One directory per saved step (DESIGN.md):

    step-000120/
      model.safetensors          weights (float32 master copy)
      optimizer.pt               optimizer + scaler state (tensors and plain types only)
      rng-rank{r}.pt             torch / cuda / numpy / python RNG states of rank r
      carry-rank{r}.safetensors  the ACT carries of rank r (one per accumulation micro-step)
      sampler-rank{r}.json       the chunk sampler's state of rank r's slots: (epoch, draws) per slot
      state.json                 format, step, counters, batch layout, identity of model, data, optimizer
      COMPLETE                   written last: sha256 and size of every file above (every rank's)

A directory is built under a staging name (`.staging-*` beside the checkpoints), every file is flushed to
disk, COMPLETE is written last, and the directory is renamed into place. A checkpoint counts only when
COMPLETE exists and every file matches its recorded hash; one that passes that check but cannot be loaded
(`CheckpointUnusable`) is treated the same way. Invalid ones are moved aside, never deleted; pruning deletes
only intact ones; symbolic links are never followed, moved or deleted (aios did not make them).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aios import jsonio
from aios.atomic import exchange_dirs, fsync_dir, fsync_file
from aios.errors import AiosError
from aios.hashing import sha256_file

if TYPE_CHECKING:  # torch is imported where tensors are read or written: listing and verifying need none
    import torch

    from aios.models.hrm_act_v1 import ACTCarry

log = logging.getLogger(__name__)

FORMAT = 3  # of state.json and the files beside it; 2: the sampler read strided positions; 1: aios 0.1
COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
STAGING_PREFIX = ".staging-"
_LEFTOVER_PREFIXES = (STAGING_PREFIX, ".replaced-")  # what killed runs (of this or older versions) leave


class CheckpointUnusable(Exception):
    """A sealed checkpoint whose content cannot be used (unparsable file, bad values): like corruption."""


class CheckpointUnreadable(AiosError):
    """A checkpoint this process may not read (permissions, an I/O error): the machine's problem, not the
    checkpoint's, so it is never set aside; the resume is refused with the reason."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# -- RNG state --------------------------------------------------------------------------------------


def capture_rng_state(device: torch.device) -> dict:
    """RNG states as tensors and plain types, loadable with torch.load(weights_only=True): torch's CPU
    generator, numpy's, python's, and the generator of the CUDA device this rank trains on (only that one:
    a resume may see another number of GPUs; a CPU run never touches CUDA)."""
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- write ------------------------------------------------------------------------------------------


def write_checkpoint_files(directory: Path, *, rank: int, model: torch.nn.Module | None, optimizer_state: dict | None,
                           rng_state: dict, carries: list[ACTCarry], sampler_state: dict, state: dict | None) -> None:
    """Write this rank's files into `directory` (rank 0 also writes the shared ones), flushed to disk."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        weights = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
                   for k, v in model.state_dict().items()}
        save_file(weights, directory / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / "optimizer.pt")
    torch.save(rng_state, directory / f"rng-rank{rank}.pt")
    flat = {}
    for i, carry in enumerate(carries):
        flat.update({f"{i}.{k}": v.cpu() for k, v in carry.state_dict().items()})
    save_file(flat, directory / f"carry-rank{rank}.safetensors")
    (directory / f"sampler-rank{rank}.json").write_text(jsonio.dumps(sampler_state, indent=1) + "\n")
    if state is not None:
        (directory / "state.json").write_text(jsonio.dumps({"format": FORMAT, **state}, indent=2, sort_keys=True)
                                              + "\n")
    # This rank's files only: the other ranks are writing theirs into the same directory right now.
    shared = [name for name, written in (("model.safetensors", model), (OPTIMIZER_FILE, optimizer_state),
                                         ("state.json", state)) if written is not None]
    sync_files(directory, [*shared, *(f.format(rank) for f in RANK_FILES)])


def sync_files(directory: Path, names: list[str]) -> None:
    """Flush these files of `directory`, then the directory, to disk."""
    for name in names:
        fsync_file(directory / name)
    fsync_dir(directory)


def seal_checkpoint(directory: Path) -> None:
    """Write COMPLETE (hashes of every file of every rank, by state.json's world size) last, durably: from
    then on the directory is a checkpoint. Call it once every rank has written its files; a file of a rank
    this checkpoint does not have (left by a failed attempt with more workers) is removed first."""
    state = json.loads((directory / "state.json").read_text())
    expected = expected_files(state["world_size"], state.get("zero_stage"))
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"cannot seal checkpoint {directory}: {missing[0]} was not written")
    for path in directory.iterdir():
        if path.is_file() and path.name not in expected:
            path.unlink()
    files = {name: file_record(directory / name) for name in expected}
    tmp = directory / f".{COMPLETE}.tmp"
    tmp.write_text(complete_text(files))
    fsync_file(tmp)
    tmp.replace(directory / COMPLETE)
    fsync_dir(directory)


def file_record(path: Path) -> dict:
    """What COMPLETE records of one file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def complete_text(files: dict[str, dict]) -> str:
    """The content of COMPLETE for these files (name -> file_record)."""
    return json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n"


def publish_checkpoint(staged: Path, checkpoints_dir: Path, step: int, keep: int) -> Path:
    """Move a sealed staging directory into `checkpoints_dir/step-N`; keep the newest `keep` intact ones.

    There is never a moment without an intact newest checkpoint: a valid step-N saved again is swapped
    with the new one in one atomic rename (Linux), or kept where the filesystem cannot swap.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    if final.is_symlink():
        shutil.rmtree(staged, ignore_errors=True)
        raise AiosError(f"{final} is a symbolic link that aios did not create, in the place of this run's "
                        f"checkpoint: move it out of {checkpoints_dir} and resume")
    if not final.exists():
        os.replace(staged, final)
    elif verify_checkpoint(final) is None:
        if exchange_dirs(staged, final):
            fsync_dir(checkpoints_dir)
            shutil.rmtree(staged)  # the previous copy of this step, now under the staging name
        else:
            log.warning("checkpoint %s exists and this filesystem cannot swap directories atomically: keeping "
                        "it and dropping the new copy of the same step", final)
            shutil.rmtree(staged)
    else:
        set_aside(final, "invalid")
        os.replace(staged, final)
    fsync_dir(checkpoints_dir)
    prune_checkpoints(checkpoints_dir, keep)
    return final


def set_aside(directory: Path, reason: str) -> Path:
    """Rename a checkpoint that must not be used out of the step-N namespace; never delete it."""
    aside = directory.with_name(f"{directory.name}.{reason}-{int(time.time())}")
    log.warning("moving checkpoint %s aside to %s", directory, aside.name)
    directory.rename(aside)
    fsync_dir(directory.parent)
    return aside


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete intact checkpoints beyond the newest `keep` intact ones; invalid ones and links are never deleted."""
    intact = [p for p in list_checkpoints(checkpoints_dir) if _verified_intact(p)]
    for old in intact[:-keep]:
        # Out of the step-N namespace first: a deletion cut short leaves a leftover (removed at the next
        # start), never a half-deleted step-N.
        doomed = old.with_name(f".replaced-{old.name}-{int(time.time())}")
        old.rename(doomed)
        shutil.rmtree(doomed)


def _verified_intact(directory: Path) -> bool:
    try:
        return verify_checkpoint(directory) is None
    except CheckpointUnreadable:  # unreadable here: certainly not ours to delete
        return False


def remove_leftovers(checkpoints_dir: Path) -> int:
    """Delete staging directories that killed runs left behind (call it while holding the bundle's lock, so
    no live run owns them). Returns how many were removed."""
    if not checkpoints_dir.is_dir():
        return 0
    removed = 0
    for path in checkpoints_dir.iterdir():
        if path.name.startswith(_LEFTOVER_PREFIXES) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d unfinished checkpoint staging director%s left by earlier runs in %s", removed,
                 "y" if removed == 1 else "ies", checkpoints_dir)
    return removed


# -- read -------------------------------------------------------------------------------------------

_warned_links: set[str] = set()


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """step-N directories, oldest first. Symbolic links are not aios's checkpoints: skipped, with a warning."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        if not STEP_DIR.match(path.name):
            continue
        if path.is_symlink():
            if str(path) not in _warned_links:
                _warned_links.add(str(path))
                log.warning("ignoring %s: a symbolic link, not a checkpoint this run wrote (it is left alone)", path)
            continue
        if path.is_dir():
            found.append(path)
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
        try:
            files = json.loads(marker.read_text())["files"]
            checks = [(name, int(expected["bytes"]), str(expected["sha256"])) for name, expected in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unparsable COMPLETE marker ({type(exc).__name__}: {exc})"
        for name, size, digest in checks:
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size or sha256_file(path) != digest:
                return f"{name} does not match its recorded sha256"
        try:  # hashed above: what it says about the ranks can be trusted
            state = json.loads((directory / "state.json").read_text()) if "state.json" in files else {}
        except ValueError:
            state = {}
        world, zero = (state.get("world_size"), state.get("zero_stage")) if isinstance(state, dict) else (None, None)
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            return "COMPLETE does not cover a state.json that names the world size"
        from aios.train.zero import STAGES

        if zero is not None and zero not in STAGES:
            return f"state.json names an unknown ZeRO stage {zero!r}"
        unsealed = [name for name in expected_files(world, zero) if name not in files]
        if unsealed:
            return f"COMPLETE does not cover {unsealed[0]} (a rank's files were written after the seal, or never)"
    except OSError as exc:  # permissions, I/O errors: nothing is known about the checkpoint itself
        raise CheckpointUnreadable(f"cannot read checkpoint {directory} ({type(exc).__name__}: {exc}): fix its "
                                   f"permissions or the storage, then resume") from None
    return None


def newest_intact_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that passes its hash check; changes nothing (see the session for fallbacks)."""
    for candidate in reversed(list_checkpoints(checkpoints_dir)):
        if _verified_intact(candidate):
            return candidate
    return None


def saved_step(directory: Path) -> int | None:
    """The step a checkpoint holds, or None if its state.json cannot tell."""
    try:
        step = json.loads((directory / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# What state.json must hold, and of which type (bool is not an int here).
_STATE_FIELDS: dict[str, type] = {
    "format": int, "step": int, "samples_drawn": int, "sample_tokens_seen": int, "segment_tokens_seen": int,
    "nonfinite_in_a_row": int, "nonfinite_total": int, "world_size": int, "micro_batch": int, "grad_accum": int,
    "config_micro_batch": int, "config_grad_accum": int, "global_batch": int, "epoch": int, "seed": int,
    "optimizer_kind": str, "config_hash": str, "dataset_fingerprint": str, "model_config": dict,
}
_POSITIVE = ("world_size", "micro_batch", "grad_accum", "config_micro_batch", "config_grad_accum", "global_batch")


def _check_state(state: object) -> dict:
    if not isinstance(state, dict):
        raise CheckpointUnusable("state.json does not hold a JSON object")
    version = state.get("format")
    if version != FORMAT:
        if isinstance(version, int) and version > FORMAT:
            raise AiosError(f"checkpoint format {version} is newer than this aios reads ({FORMAT}): upgrade aios")
        if "format" not in state or (isinstance(version, int) and version < FORMAT):
            raise AiosError(f"the checkpoint was written by an older aios (format {version or 1}, this aios reads "
                            f"{FORMAT}): continue it with that version, or train a new --brain-name")
        raise CheckpointUnusable(f"state.json has format {version!r}")
    for name, kind in _STATE_FIELDS.items():
        value = state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointUnusable(f"state.json: {name} is {value!r}, not a {kind.__name__}")
        if kind is int and value < (1 if name in _POSITIVE else 0):
            raise CheckpointUnusable(f"state.json: {name} is {value}")
    if state["micro_batch"] * state["grad_accum"] * state["world_size"] != state["global_batch"]:
        raise CheckpointUnusable("state.json: micro_batch x grad_accum x world_size is not global_batch")
    return state


RANK_FILES = ("rng-rank{}.pt", "carry-rank{}.safetensors", "sampler-rank{}.json")
SHARED_FILES = ("model.safetensors", "optimizer.pt", "state.json")
OPTIMIZER_FILE = "optimizer.pt"  # absent with ZeRO: DeepSpeed's per-rank files hold the optimizer state


def expected_files(world_size: int, zero_stage: str | None = None) -> list[str]:
    """The files a checkpoint of `world_size` ranks must hold (and its COMPLETE must list). With ZeRO
    (`zero_stage` from state.json) DeepSpeed's files of every rank replace optimizer.pt."""
    if not zero_stage:
        return [*SHARED_FILES, *(name.format(r) for r in range(world_size) for name in RANK_FILES)]
    from aios.train.zero import STAGES, files_of_rank

    shared = [name for name in SHARED_FILES if name != OPTIMIZER_FILE]
    return [*shared, *(name.format(r) for r in range(world_size) for name in RANK_FILES),
            *(name for r in range(world_size) for name in files_of_rank(STAGES[zero_stage], r, world_size))]


def files_written_by(rank: int, world_size: int, zero_stage: str | None = None) -> list[str]:
    """The files of a checkpoint that `rank` writes (rank 0: the shared ones too)."""
    own = [*(SHARED_FILES if rank == 0 else ()), *(name.format(rank) for name in RANK_FILES)]
    if not zero_stage:
        return own
    from aios.train.zero import STAGES, files_of_rank

    return [name for name in own if name != OPTIMIZER_FILE] + files_of_rank(STAGES[zero_stage], rank, world_size)


@dataclass
class Checkpoint:
    """One rank's view of a loaded checkpoint: plain values and CPU/device tensors, not yet applied.

    `carry_rows` and `sampler_state` cover the slots asked for (this rank's under its layout), gathered from
    the files of every saved rank that held some of them: a checkpoint of another world size regroups."""

    directory: Path
    state: dict
    weights: dict[str, torch.Tensor]
    optimizer_state: dict
    rng: dict | None  # None: the checkpoint has no rank of this number (saved by fewer workers)
    carry_rows: dict[str, torch.Tensor]
    sampler_state: dict


def read_state(directory: Path) -> dict:
    """state.json, checked; CheckpointUnusable when it is unusable, AiosError when it is from another version."""
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointUnusable(f"state.json is unreadable ({type(exc).__name__}: {exc})") from None
    return _check_state(state)


def read_checkpoint(directory: Path, rank: int, slots: tuple[int, int], device: torch.device | str = "cpu"
                    ) -> Checkpoint:
    """Load what this rank needs: the shared files, its RNG, and the carries and sampler state of the global
    slots [slots[0], slots[1]) from the saved ranks that held them (slot s was on saved rank s // R, R its
    rows per rank). Any file that does not load (a value torch's weights_only loader refuses, a broken
    safetensors header, bad JSON) raises CheckpointUnusable."""
    import torch
    from safetensors.torch import load_file

    from aios.data import merge_sampler_states

    state = read_state(directory)
    saved_world, first, stop = state["world_size"], *slots
    per_rank = state["global_batch"] // saved_world
    if not 0 <= first < stop <= state["global_batch"]:
        raise ValueError(f"slots {first}..{stop} of a global batch of {state['global_batch']}")
    owners = range(first // per_rank, (stop - 1) // per_rank + 1)
    try:
        weights = load_file(directory / "model.safetensors", device=str(device))
        optimizer_state = ({"optimizer": None} if state.get("zero_stage") else  # DeepSpeed's own files hold it
                           torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        rng = (torch.load(directory / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)
               if rank < saved_world else None)
        rows: dict[str, list[torch.Tensor]] = {}
        samplers = []
        for owner in owners:
            flat = load_file(directory / f"carry-rank{owner}.safetensors", device=str(device))
            grouped: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in flat.items():
                index, name = key.split(".", 1)
                grouped.setdefault(int(index), {})[name] = value
            if sorted(grouped) != list(range(state["grad_accum"])):
                raise ValueError(f"carry-rank{owner} holds {len(grouped)} micro-steps, state.json says "
                                 f"{state['grad_accum']}")
            for i in sorted(grouped):
                for name, value in grouped[i].items():
                    rows.setdefault(name, []).append(value)
            sampler = json.loads((directory / f"sampler-rank{owner}.json").read_text())
            if not isinstance(sampler, dict):
                raise ValueError(f"sampler-rank{owner}.json holds no state")
            samplers.append(sampler)
        offset = first - owners[0] * per_rank
        carry_rows = {name: torch.cat(parts)[offset:offset + stop - first] for name, parts in rows.items()}
        sampler_state = samplers[0] if len(samplers) == 1 else merge_sampler_states(samplers)
        if not isinstance(optimizer_state, dict) or "optimizer" not in optimizer_state:
            raise ValueError("optimizer.pt holds no optimizer state")
        if rng is not None and not isinstance(rng, dict):
            raise ValueError("the RNG file holds no state")
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load is treated like corruption
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointUnusable(f"{type(exc).__name__}: {reason}"[:300]) from exc
    return Checkpoint(directory, state, weights, optimizer_state, rng, carry_rows, sampler_state)
