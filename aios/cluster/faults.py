"""A test-only fault hook for the Ray job: off unless AIOS_TEST_FAULT is set.

    AIOS_TEST_FAULT=raise:K     a worker raises RuntimeError after completing optimizer step K
    AIOS_TEST_FAULT=sigkill:K   a worker's process SIGKILLs itself after step K
    AIOS_TEST_FAULT=stop:K      a worker (only it) sees a stop request after step K, as if only it saw the
                                stop file
    AIOS_TEST_FAULT=oom:K       a worker runs out of memory (torch.cuda.OutOfMemoryError) in the first forward
                                of step K
    AIOS_TEST_FAULT=oom:K,raise:J  several, comma-separated, each firing once
    AIOS_TEST_FAULT_ONCE=PATH   required with it: the fault fires only while PATH does not exist (it is
                                created, durably, just before), so the restarted workers run through; with
                                several faults, the i-th (from 0) uses PATH.i
    AIOS_TEST_FAULT_RANK=R      the rank that fails (default 0)
    AIOS_TEST_STEP_SLEEP_S=S    every worker sleeps S seconds after each step (alone or with a fault) while
    AIOS_TEST_SLEEP_WHILE=PATH  PATH exists (always, without it): a test paces the job while it changes the
                                cluster (adds or drains a node), then lets it run at full speed

The driver forwards these variables to the workers' runtime environment. Tests use it to check that a
job recovers from a failed worker with results bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from aios.train.loop import TrainCallbacks

VARIABLES = ("AIOS_TEST_FAULT", "AIOS_TEST_FAULT_ONCE", "AIOS_TEST_FAULT_RANK", "AIOS_TEST_STEP_SLEEP_S",
             "AIOS_TEST_SLEEP_WHILE")


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in VARIABLES if name in os.environ}


KINDS = ("raise", "sigkill", "stop", "oom")


class FaultAfterStep(TrainCallbacks):
    def __init__(self, kind: str, step: int, once_file: str, rank: int):
        self.kind, self.step, self.once_file, self.rank = kind, step, once_file, rank

    def _fire(self, trainer, step: int) -> bool:
        if trainer.rank != self.rank or step != self.step or os.path.exists(self.once_file):
            return False
        fd = os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.fsync(fd)
        os.close(fd)
        return True

    def at(self, trainer, point: str, micro_step: int | None) -> None:
        if self.kind == "oom" and point == "forward" and micro_step == 0 and self._fire(trainer, trainer.step + 1):
            raise torch.cuda.OutOfMemoryError(f"AIOS_TEST_FAULT: injected out of memory in step {self.step}")

    def after_step(self, trainer, record: dict) -> None:
        if self.kind == "oom" or not self._fire(trainer, record["step"]):
            return
        if self.kind == "stop":
            trainer.session.request_stop_here(f"AIOS_TEST_FAULT stop on rank {trainer.rank}")
            return
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"AIOS_TEST_FAULT: injected failure after step {self.step}")


class SleepAfterStep(TrainCallbacks):
    def __init__(self, seconds: float, while_file: str | None, then: TrainCallbacks | None):
        self.seconds, self.while_file, self.then = seconds, while_file, then or TrainCallbacks()

    def at(self, trainer, point: str, micro_step: int | None) -> None:
        self.then.at(trainer, point, micro_step)

    def after_step(self, trainer, record: dict) -> None:
        if self.while_file is None or os.path.exists(self.while_file):
            time.sleep(self.seconds)
        self.then.after_step(trainer, record)


def callbacks_from_env() -> TrainCallbacks | None:
    fault = _fault_from_env()
    sleep = os.environ.get("AIOS_TEST_STEP_SLEEP_S")
    return SleepAfterStep(float(sleep), os.environ.get("AIOS_TEST_SLEEP_WHILE"), fault) if sleep else fault


class AllOf(TrainCallbacks):
    def __init__(self, callbacks: list[TrainCallbacks]):
        self.callbacks = callbacks

    def at(self, trainer, point: str, micro_step: int | None) -> None:
        for callback in self.callbacks:
            callback.at(trainer, point, micro_step)

    def after_step(self, trainer, record: dict) -> None:
        for callback in self.callbacks:
            callback.after_step(trainer, record)


def _fault_from_env() -> TrainCallbacks | None:
    spec = os.environ.get("AIOS_TEST_FAULT")
    if not spec:
        return None
    once_file = os.environ.get("AIOS_TEST_FAULT_ONCE")
    rank = int(os.environ.get("AIOS_TEST_FAULT_RANK", "0"))
    faults = []
    parts = spec.split(",")
    for i, part in enumerate(parts):
        kind, _, step = part.partition(":")
        if kind not in KINDS or not step.isdigit() or not once_file:
            raise ValueError(f"AIOS_TEST_FAULT={spec!r}: expected one or more (comma-separated) of "
                             f"{', '.join(k + ':K' for k in KINDS)} with AIOS_TEST_FAULT_ONCE set")
        faults.append(FaultAfterStep(kind, int(step), once_file if len(parts) == 1 else f"{once_file}.{i}", rank))
    return faults[0] if len(faults) == 1 else AllOf(faults)
