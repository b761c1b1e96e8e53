"""A test-only fault hook for the Ray job: off unless AIOS_TEST_FAULT is set.

    AIOS_TEST_FAULT=raise:K     a worker raises RuntimeError after completing optimizer step K
    AIOS_TEST_FAULT=sigkill:K   a worker's process SIGKILLs itself after step K
    AIOS_TEST_FAULT_ONCE=PATH   required with it: the fault fires only while PATH does not exist (it is
                                created, durably, just before), so the restarted workers run through
    AIOS_TEST_FAULT_RANK=R      the rank that fails (default 0)

The driver forwards these variables to the workers' runtime environment. Tests use it to check that a
job recovers from a failed worker with results bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

from aios.train.loop import TrainCallbacks

VARIABLES = ("AIOS_TEST_FAULT", "AIOS_TEST_FAULT_ONCE", "AIOS_TEST_FAULT_RANK")


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in VARIABLES if name in os.environ}


class FaultAfterStep(TrainCallbacks):
    def __init__(self, kind: str, step: int, once_file: str, rank: int):
        self.kind, self.step, self.once_file, self.rank = kind, step, once_file, rank

    def after_step(self, trainer, record: dict) -> None:
        if trainer.rank != self.rank or record["step"] != self.step or os.path.exists(self.once_file):
            return
        fd = os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.fsync(fd)
        os.close(fd)
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"AIOS_TEST_FAULT: injected failure after step {self.step}")


def callbacks_from_env() -> TrainCallbacks | None:
    spec = os.environ.get("AIOS_TEST_FAULT")
    if not spec:
        return None
    kind, _, step = spec.partition(":")
    once_file = os.environ.get("AIOS_TEST_FAULT_ONCE")
    if kind not in ("raise", "sigkill") or not step.isdigit() or not once_file:
        raise ValueError(f"AIOS_TEST_FAULT={spec!r}: expected raise:K or sigkill:K with AIOS_TEST_FAULT_ONCE set")
    return FaultAfterStep(kind, int(step), once_file, int(os.environ.get("AIOS_TEST_FAULT_RANK", "0")))
