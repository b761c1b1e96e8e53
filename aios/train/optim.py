"""Optimizers, the learning-rate schedule, and undoing an interrupted optimizer step."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

log = logging.getLogger(__name__)

BETAS = (0.9, 0.95)


class AdamATan2(Optimizer):
    """Adam with atan2 in place of the epsilon-guarded division (the HRM reference optimizer).

    p *= 1 - lr * wd;  m, v as Adam;  p -= lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t)).

    A step is two phases: first every update is computed into new tensors (this may run out of memory,
    and then nothing has changed), then the state and the weights are updated in place, which allocates
    nothing. So an out-of-memory error never leaves a half-applied step behind (see OptimizerTransaction).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = BETAS, weight_decay: float = 0.1):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Phase 1: the updates, from the values phase 2 will write (the same kernels, so the same bits).
            updates = []
            for p in params:
                state = self.state[p]
                t = float(state["step"]) + 1
                m = state["exp_avg"].lerp(p.grad, 1 - beta1)
                v = state["exp_avg_sq"].mul(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                updates.append((torch.atan2(m, v.sqrt_().div_(math.sqrt(1 - beta2**t))), -lr / (1 - beta1**t)))
            # Phase 2: commit, in place.
            for p, (update, alpha) in zip(params, updates, strict=True):
                state = self.state[p]
                state["step"] += 1
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=alpha)
        return loss


@dataclass(frozen=True)
class BuiltOptimizer:
    optimizer: Optimizer
    kind: str  # what the state in a checkpoint is: adamw | adamw-8bit | adam-atan2


def build_optimizer(model: torch.nn.Module, *, name: str, lr: float, weight_decay: float,
                    use_8bit: bool, device: torch.device) -> BuiltOptimizer:
    """AdamW (fused where available), AdamATan2, or bitsandbytes' 8-bit AdamW (CUDA or CPU: bitsandbytes >=
    0.50 has a CPU backend). Its moments are blockwise-quantized to one byte each (2 bytes a parameter, not 8),
    for tensors of at least 4096 elements; smaller ones keep 32-bit state.

    `kind` names the optimizer actually built (after any fallback): its state only loads into the same kind.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if use_8bit:
        if name != "adamw":
            log.warning("--use-8bit-optimizer applies to --optimizer adamw only; using the full-precision %s", name)
        else:
            try:
                import bitsandbytes as bnb
            except ImportError:
                log.warning("--use-8bit-optimizer: bitsandbytes is not installed (pip install 'bitsandbytes>=0.50'); "
                            "falling back to full-precision AdamW")
            else:
                return BuiltOptimizer(bnb.optim.AdamW8bit(params, lr=lr, betas=BETAS, weight_decay=weight_decay),
                                      "adamw-8bit")
    if name == "adam-atan2":
        return BuiltOptimizer(AdamATan2(params, lr=lr, betas=BETAS, weight_decay=weight_decay), "adam-atan2")
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused kernels unavailable for this device/dtype
        optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=weight_decay)
    return BuiltOptimizer(optimizer, "adamw")


def optimizer_kind_hint(kind: str) -> str:
    """The flags that give an optimizer of `kind` (adamw+zero2: AdamW inside DeepSpeed ZeRO-2), for messages."""
    kind, _, zero = kind.partition("+")
    if zero:
        return f"{optimizer_kind_hint(kind)}, with --zero-stage {zero} and --launcher ray"
    return {"adamw": "--optimizer adamw without --use-8bit-optimizer",
            "adamw-8bit": "--optimizer adamw --use-8bit-optimizer (with bitsandbytes installed)",
            "adam-atan2": "--optimizer adam-atan2"}.get(kind, f"the optimizer {kind}")


# How an optimizer computes, not what it computes: load_state_dict copies them from the saved groups, but
# they belong to this process (a host without fused kernels must not be told to use them).
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def set_hyperparameters(optimizer: Optimizer, *, lr: float, weight_decay: float) -> None:
    """This run's learning rate and weight decay, and its own kernel choices, over those a loaded optimizer
    state brought along."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay
        for key in _IMPLEMENTATION_KEYS:
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


# -- the schedule -----------------------------------------------------------------------------------------


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup, then cosine down to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each optimizer step: a pure function of the step and the run's settings.

    No state to save: a resumed run, with the same or new --lr/--steps/--warmup-steps, computes it again.
    """

    lr: float
    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        """The learning rate of the update that completes step `step + 1` (steps done so far: `step`)."""
        return self.lr * lr_lambda(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                                   min_ratio=self.min_ratio)


# -- undoing an interrupted step ------------------------------------------------------------------------------


def _is_atomic(optimizer: Optimizer) -> bool:
    """Whether an error inside `step()` leaves weights and moments untouched, short of the step counters
    and lazily created state (which OptimizerTransaction undoes). True for AdamATan2 (two phases) and for
    fused AdamW over one device and dtype: it creates its state, bumps the step counters, then runs one
    in-place kernel."""
    if isinstance(optimizer, AdamATan2):
        return True
    if type(optimizer) is torch.optim.AdamW and optimizer.defaults.get("fused"):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return len({(p.device, p.dtype) for p in params}) <= 1
    return False


class OptimizerTransaction:
    """`begin()` before `optimizer.step()`; `roll_back()` after it raised puts everything back exactly;
    `commit()` once the step is kept.

    For an atomic optimizer (see `_is_atomic`) that costs nothing per step: the step counters are saved and
    state created by the failed step is dropped. Any other optimizer is snapshotted in host memory (weights
    and state) before each step, which costs a copy of both per step; it is logged once.
    """

    def __init__(self, optimizer: Optimizer, params: list[torch.nn.Parameter]):
        self.optimizer, self.params = optimizer, params
        self.atomic = _is_atomic(optimizer)
        if not self.atomic:
            log.info("%s is not known to step atomically: each step snapshots weights and optimizer state so "
                     "that an out-of-memory retry is exact", type(optimizer).__name__)
        self.open = False
        self._had_state: set[int] = set()
        self._steps: dict[int, torch.Tensor] = {}
        self._snapshot: tuple[list[torch.Tensor], dict] | None = None

    def begin(self) -> None:
        self.open = False  # until all is saved: an error in here must not roll back to an older begin
        state = self.optimizer.state
        had_state = {id(p) for p in self.params if state.get(p)}
        steps = {id(p): state[p]["step"].clone() for p in self.params
                 if state.get(p) and isinstance(state[p].get("step"), torch.Tensor)}
        snapshot = None
        if not self.atomic:
            weights = [p.detach().to("cpu", copy=True) for p in self.params]
            moments = {id(p): {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                               for k, v in state[p].items()} for p in self.params if state.get(p)}
            snapshot = (weights, moments)
        self._had_state, self._steps, self._snapshot = had_state, steps, snapshot
        self.open = True

    def commit(self) -> None:
        """The step is kept: nothing to undo any more."""
        self.open = False
        self._snapshot = None

    @torch.no_grad()
    def roll_back(self) -> None:
        """Undo the step begun last, if it was not committed; otherwise nothing."""
        if not self.open:
            return
        self.open = False
        state = self.optimizer.state
        for p in self.params:
            if id(p) not in self._had_state:
                state.pop(p, None)  # created (perhaps half) by the failed step
            elif id(p) in self._steps:
                state[p]["step"].copy_(self._steps[id(p)])
        if self._snapshot is not None:
            weights, moments = self._snapshot
            self._snapshot = None
            for p, saved in zip(self.params, weights, strict=True):
                p.copy_(saved)
            for p in self.params:
                for key, value in moments.get(id(p), {}).items():
                    if isinstance(value, torch.Tensor):
                        state[p][key].copy_(value)
                    else:
                        state[p][key] = value
