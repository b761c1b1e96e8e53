"""DeepSpeed ZeRO inside the worker loop (`--zero-stage zero1|zero2|zero3`, `--launcher ray`).

`deepspeed.initialize` wraps the model and the run's optimizer on the process group Ray Train has set up
(gloo on CPU with DeepSpeed's CPU accelerator, nccl on GPU); nothing else starts a process group. The stage
settings come from `config/deepspeed/<stage>.json`; aios adds what follows from its own flags (micro-batch,
accumulation, global batch, --grad-clip), and refuses a file that sets those itself.

What DeepSpeed takes over from the loop:
  * gradient accumulation: `gradient_accumulation_steps` is the run's; `engine.backward` divides each
    micro-batch's loss by it and the reduction averages over the ranks, so the loop hands it the micro-batch's
    summed loss divided by the micro-batch size (the same sum / global batch the loop's own path computes);
  * the gradient reduction (reduce-scatter of ZeRO-2/3, all-reduce + partitioned update of ZeRO-1), the
    gradient-norm clip, and the skip of a step whose gradient norm is not finite (`was_step_applied`);
  * the optimizer state, sharded over the ranks, and its checkpoint files: every rank writes its own
    `zero_pp_rank_R_mp_rank_00_optim_states.pt` (ZeRO-3: and its `..._model_states.pt`) into the step's
    staging directory beside aios's files, and the seal covers them all.

What it cannot do here: retry a step that ran out of memory at a smaller micro-batch (the reduction runs
inside the backward passes, and the accumulation count is fixed when the engine is built), resume with
another world size (the optimizer shards are per rank), or wrap bitsandbytes' 8-bit optimizer. Those are
refused with a message instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from aios.errors import AiosError

if TYPE_CHECKING:  # checkpoint listing and verification read the file names here without torch
    import torch

log = logging.getLogger(__name__)

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
CONFIG_DIRS = (Path(__file__).resolve().parents[2] / "config" / "deepspeed", Path("config") / "deepspeed")
_AIOS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast")
# Settings aios does not support (untested; some write checkpoint files the seal would not cover): refused.
_UNSUPPORTED = ("checkpoint", "elasticity", "zero_optimization.offload_optimizer", "zero_optimization.offload_param",
                "zero_optimization.elastic_checkpoint", "zero_optimization.managed_gradient_accumulation")


def optim_file(rank: int) -> str:
    """Rank `rank`'s optimizer shard, as DeepSpeed names it."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def model_files(stage: int, world_size: int) -> list[str]:
    """The model-state files DeepSpeed writes: one (rank 0's) for ZeRO-1/2, one per rank for ZeRO-3."""
    if stage == 3:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    return ["mp_rank_00_model_states.pt"]


def files_of_rank(stage: int, rank: int, world_size: int) -> list[str]:
    """The DeepSpeed files rank `rank` writes into a checkpoint."""
    own = [optim_file(rank)]
    if stage == 3:
        own.append(model_files(3, world_size)[rank])
    elif rank == 0:
        own.append(model_files(stage, world_size)[0])
    return own


def stage_config_path(zero_stage: str) -> Path:
    for directory in CONFIG_DIRS:
        path = directory / f"{zero_stage}.json"
        if path.is_file():
            return path
    raise AiosError(f"--zero-stage {zero_stage}: its DeepSpeed settings {CONFIG_DIRS[0] / f'{zero_stage}.json'} are "
                    f"missing: restore config/deepspeed/ from the aios source")


def deepspeed_config(zero_stage: str, *, micro_batch: int, grad_accum: int, world_size: int,
                     grad_clip: float) -> dict:
    """config/deepspeed/<stage>.json plus what aios decides: the batch split and the gradient clip."""
    path = stage_config_path(zero_stage)
    try:
        settings = json.loads(path.read_text())
    except ValueError as exc:
        raise AiosError(f"--zero-stage {zero_stage}: {path} is not valid JSON ({exc}): fix it") from None
    clash = [key for key in _AIOS_KEYS if key in settings]
    if clash:
        raise AiosError(f"--zero-stage {zero_stage}: {path} sets {clash[0]}, which aios sets from its own flags "
                        f"(--batch-size, --gradient-accumulation-steps, --grad-clip, --optimizer, --amp): remove it")
    zero_settings = settings.get("zero_optimization", {})
    unsupported = [key for key in _UNSUPPORTED
                   if (zero_settings if key.startswith("zero_optimization.") else settings).get(key.split(".")[-1])
                   is not None]
    if unsupported:
        raise AiosError(f"--zero-stage {zero_stage}: {path} sets {unsupported[0]}, which aios does not support (its "
                        f"checkpoints and resume are built for the plain stages): remove it")
    stage = zero_settings.get("stage")
    if stage != STAGES[zero_stage]:
        raise AiosError(f"--zero-stage {zero_stage}: {path} has zero_optimization.stage {stage!r}, not "
                        f"{STAGES[zero_stage]}: fix the file")
    return {**settings, "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world_size, "gradient_clipping": float(grad_clip)}


def import_deepspeed(device: torch.device):
    """deepspeed, on the accelerator of `device` (DeepSpeed's CPU accelerator on CPU): its first use on a
    machine JIT-compiles a communication op into TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions by default),
    which later runs reuse."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise AiosError("--zero-stage needs DeepSpeed: pip install 'deepspeed>=0.19' on every node (the aios "
                        "images have it), or use --zero-stage none") from None
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)  # its config dump and per-step notes
    return deepspeed


class ZeroEngine:
    """A DeepSpeed engine around the run's model and optimizer, stepped the way the loop needs it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, zero_stage: str,
                 micro_batch: int, grad_accum: int, world_size: int, grad_clip: float, device: torch.device):
        self.deepspeed = deepspeed = import_deepspeed(device)
        self.zero_stage, self.stage = zero_stage, STAGES[zero_stage]
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        config = deepspeed_config(zero_stage, micro_batch=micro_batch, grad_accum=grad_accum,
                                  world_size=world_size, grad_clip=grad_clip)
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                     dist_init_required=False)
        except Exception as exc:  # noqa: BLE001 - a build or setup failure: one line, the likely fixes
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise AiosError(f"--zero-stage {zero_stage}: DeepSpeed could not start ({type(exc).__name__}: {first}); "
                            f"on CPU it JIT-builds a communication op into TORCH_EXTENSIONS_DIR (needs a C++ "
                            f"compiler and a writable directory), and the settings are "
                            f"{stage_config_path(zero_stage)}") from None

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def backward(self, loss_sum: torch.Tensor, *, last: bool) -> None:
        """One micro-batch's summed loss: DeepSpeed divides by the accumulation and averages over the ranks.
        Every micro-batch but the last is stepped here (a no-op but for DeepSpeed's micro-step count); the last
        one's step, the update, is `step()`."""
        self.engine.backward(loss_sum / self.micro_batch)
        if not last:
            self.engine.step()

    def step(self, lr: float) -> tuple[bool, float]:
        """The update at the accumulation boundary: (applied, gradient norm before clipping). A step whose
        gradient norm is not finite is skipped by DeepSpeed (on every rank: the norm is global)."""
        for group in self.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return bool(self.engine.was_step_applied()), norm

    def full_weights(self):
        """ZeRO-3: a context in which every rank holds the whole of every weight (gathered: a collective every
        rank enters; read-only), for what reads the weights (the saved model, the bundle, the finiteness check).
        ZeRO-1/2 keep whole weights anyway."""
        if self.stage != 3:
            return contextlib.nullcontext()
        return self.deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def set_weight_decay(self, weight_decay: float) -> None:
        for group in self.param_groups:
            group["weight_decay"] = weight_decay

    def save(self, directory: Path) -> list[str]:
        """Every rank writes its DeepSpeed files into `directory` (a collective); returns the ones it wrote."""
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        return files_of_rank(self.stage, self.engine.global_rank, self.engine.world_size)

    def load(self, directory: Path) -> None:
        """The optimizer shards and master weights of this rank from `directory` (written by `save`)."""
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise ValueError(f"DeepSpeed found no ZeRO checkpoint in {directory}")
