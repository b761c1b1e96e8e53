"""Optimizers and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


class AdamATan2(Optimizer):
    """Adam with atan2 in place of the epsilon-guarded division (the HRM reference optimizer).

    p *= 1 - lr * wd;  m, v as Adam;  p -= lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t)).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.1):
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = v.sqrt() / math.sqrt(1 - beta2**t)
                p.add_(torch.atan2(m, denom), alpha=-lr / (1 - beta1**t))
        return loss


def build_optimizer(model: torch.nn.Module, *, name: str, lr: float, weight_decay: float,
                    use_8bit: bool, device: torch.device) -> Optimizer:
    """AdamW (fused where available), AdamATan2, or bitsandbytes' 8-bit AdamW on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (0.9, 0.95)
    if use_8bit:
        if name != "adamw":
            log.warning("--use-8bit-optimizer applies to adamw only; using the full-precision %s", name)
        elif device.type != "cuda":
            log.warning("--use-8bit-optimizer needs CUDA (bitsandbytes); falling back to full-precision AdamW")
        else:
            try:
                import bitsandbytes as bnb
            except ImportError:
                log.warning("--use-8bit-optimizer: bitsandbytes is not installed (pip install 'aios[gpu]'); "
                            "falling back to full-precision AdamW")
            else:
                return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adam-atan2":
        return AdamATan2(params, lr=lr, betas=betas, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused kernels unavailable for this device/dtype
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup, then cosine down to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float) -> LambdaLR:
    from functools import partial

    return LambdaLR(optimizer, partial(lr_lambda, warmup_steps=warmup_steps, total_steps=total_steps,
                                       min_ratio=min_ratio))
