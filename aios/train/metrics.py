"""What a run tells its watchers: the metrics log (JSONL) and the console (progress bar, eval lines)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from aios import jsonio
from aios.atomic import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL, strict JSON, one record per line, flushed as written.

    Each step appears once: opening the log of a resumed run drops the records past the step it resumes
    from (written by an attempt that crashed before its next checkpoint), in one atomic rewrite, and a torn
    last line. A new run (step 0) keeps only the `start` records of attempts that never checkpointed.
    """

    def __init__(self, path: Path, *, resume_step: int, sink: Callable[[dict], None] | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.sink = sink  # also handed every record (Ray metrics); its failure is logged, never the run's
        if path.exists():
            self._keep_through(resume_step)
        self.file = open(path, "a", buffering=1, encoding="utf-8")

    def _keep_through(self, step: int) -> None:
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a crash
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))
            log.info("%s: dropped %d records past step %d (from an attempt that stopped before its next "
                     "checkpoint)", self.path, len(lines) - len(kept), step)

    def write(self, record: dict) -> None:
        self.file.write(jsonio.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.sink is not None:
            try:
                self.sink(record)
            except Exception as exc:  # noqa: BLE001 - watching a run must never stop it
                log.warning("metrics export failed (%s: %s); the metrics log keeps every record, export stops",
                            type(exc).__name__, exc)
                self.sink = None

    def sync(self) -> None:
        """Flush to disk (after a checkpoint: the log then holds at least what the checkpoint holds)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def metrics_log_of(path: Path, brain_name: str) -> bool:
    """Whether `path` is a metrics log a run of `brain_name` wrote: its first record is that brain's start
    record. (Only such a file is ever rewritten on resume.)"""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("event") == "start" and first.get("brain") == brain_name


class NullLog:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class Console:
    """The progress bar (loss, this attempt's average tokens/s, lr) and one line per evaluation."""

    def __init__(self, enabled: bool, *, total: int, start: int):
        self.enabled = enabled
        self.started = time.perf_counter()
        self.tokens = 0  # segment tokens computed in this attempt
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def step(self, record: dict) -> None:
        self.tokens += record["segment_tokens"]
        if self.enabled:
            loss = record["loss"]
            average = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            info = f"loss {loss:.3f}" if loss is not None else "loss nan"
            self.bar.update(self.task, completed=record["step"],
                            info=f"{info}  {average:,.0f} tok/s avg  lr {record['lr']:.2e}")

    def eval(self, step: int, result: dict) -> None:
        line = (f"step {step}: eval loss {result['loss']:.3f}, perplexity {result['perplexity']:.1f}, "
                f"token accuracy {result['token_accuracy']:.3f}")
        if self.enabled:
            self.bar.console.print(line, highlight=False)
        else:
            log.info(line)
