"""Fault-injection callbacks shared by the training tests."""

from __future__ import annotations

from aios.train.loop import TrainCallbacks


class PoisonLogits(TrainCallbacks):
    """Make the logits NaN at the given steps (every micro-step of them)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.handle = None

    def at(self, trainer, point, micro_step):
        if point != "forward":
            return
        if self.handle is None:
            self.handle = trainer.model.inner.lm_head.register_forward_hook(
                lambda module, args, out: out * float("nan") if self.poison else out)
        self.poison = trainer.step + 1 in self.steps
