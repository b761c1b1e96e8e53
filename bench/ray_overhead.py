"""What the Ray Train job costs over training in-process, side by side in one run.

    python bench/ray_overhead.py                    # the demo preset, 3 rounds (about 5 minutes on 2 cores)
    python bench/ray_overhead.py --rounds 5 --steps 200

Each round runs the same short training three times through the real CLI, each in a fresh process and a
fresh bundle, in rotating order:
  local         `--launcher local`: in this process, torch on all CPUs
  ray           `--launcher ray`: one TorchTrainer worker on an embedded local cluster, all CPUs as threads
  ray-2x        `--launcher ray --world-size 2 --batch-size 8`: two workers with half the CPUs each and half the
                micro-batch, so the same global batch of 16 (data parallelism against threads)
From each run:
  wall s        the whole `aios hrm-hf train-actv1` process
  step ms       the median time between consecutive step records of metrics.jsonl: everything the loop does
                per step (the Ray worker also asks the driver once per step whether to stop)
  fixed s       wall minus steps x step ms: start-up, data, evaluation, checkpoints, shut-down
The table shows medians over the rounds, and the one-worker Ray run's per-step overhead over the in-process
one (target: within 3%) and its extra fixed cost (target: under 15 s). Results go to
bench/results/ray_overhead.json (git-ignored). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aios.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "ray_overhead.json"
STEP_OVERHEAD_TARGET = 0.03
FIXED_TARGET_S = 15.0


VARIANTS = {
    "local": ["--launcher", "local"],
    "ray": ["--launcher", "ray"],
    "ray-2x": ["--launcher", "ray", "--world-size", "2", "--batch-size", "8"],
}


def run_once(launcher: str, root: Path, steps: int, index: int) -> dict:
    bundle_dir = root / f"{launcher}-{index}"
    command = [sys.executable, "-m", "aios.cli.main", "hrm-hf", "train-actv1", "--config",
               str(REPO / "config" / "train" / "demo-cpu.yaml"), "--steps", str(steps), "--eval-every", "0",
               "--checkpoint-every", "0", "--no-progress", "--bundle-dir", str(bundle_dir), "--brain-name", "bench",
               *VARIANTS[launcher]]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (bundle_dir / "bench" / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r["event"] == "step"]
    step = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
    return {"launcher": launcher, "wall_s": wall, "step_s": step, "fixed_s": wall - steps * step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 3:
        parser.error("--rounds must be at least 1 and --steps at least 3")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="aios-ray-bench-") as root:
        for r in range(args.rounds):
            names = list(VARIANTS)
            for launcher in names[r % len(names):] + names[:r % len(names)]:
                print(f"round {r + 1}/{args.rounds}: {launcher} ({' '.join(VARIANTS[launcher])}) ...", flush=True)
                runs.append({"round": r, **run_once(launcher, Path(root), args.steps, r)})
    summary = {}
    for launcher in VARIANTS:
        mine = [run for run in runs if run["launcher"] == launcher]
        summary[launcher] = {key: statistics.median(run[key] for run in mine) for key in ("wall_s", "step_s", "fixed_s")}
    step_overhead = summary["ray"]["step_s"] / summary["local"]["step_s"] - 1
    fixed_extra = summary["ray"]["fixed_s"] - summary["local"]["fixed_s"]
    table = Table(title=f"demo preset, {args.steps} steps, median of {args.rounds} rounds, {os.cpu_count()} CPUs")
    for column in ("variant", "wall s", "step ms", "fixed s"):
        table.add_column(column, justify="right")
    for launcher, row in summary.items():
        table.add_row(launcher, f"{row['wall_s']:.1f}", f"{1000 * row['step_s']:.1f}", f"{row['fixed_s']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"per-step overhead of the Ray job: {100 * step_overhead:+.1f}% (target within "
                  f"{100 * STEP_OVERHEAD_TARGET:.0f}%: {'met' if step_overhead <= STEP_OVERHEAD_TARGET else 'NOT met'})")
    console.print(f"extra fixed cost (embedded cluster and TorchTrainer start-up, shut-down): {fixed_extra:.1f} s "
                  f"(target under {FIXED_TARGET_S:.0f} s: {'met' if fixed_extra < FIXED_TARGET_S else 'NOT met'})")
    report = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": args.steps,
              "rounds": args.rounds, "cpu_count": os.cpu_count(), "runs": runs, "summary": summary,
              "step_overhead": step_overhead, "fixed_extra_s": fixed_extra,
              "targets": {"step_overhead": STEP_OVERHEAD_TARGET, "fixed_extra_s": FIXED_TARGET_S}}
    two_workers = summary["ray-2x"]["step_s"] / summary["ray"]["step_s"]
    console.print(f"2 workers x {max(1, (os.cpu_count() or 1) // 2)} threads against 1 worker x {os.cpu_count()} "
                  f"threads, same global batch: {two_workers:.2f}x the step time")
    report["two_workers_step_ratio"] = two_workers
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
