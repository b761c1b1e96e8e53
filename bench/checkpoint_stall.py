"""How long a checkpoint stalls training inside a Ray Train worker: SYNC against ASYNC upload, side by side.

    python bench/checkpoint_stall.py                 # demo and 27M shapes, 3 saves per mode (about 2 minutes)
    python bench/checkpoint_stall.py --saves 5

One TorchTrainer worker on an embedded local cluster builds each shape's real model (the presets
config/train/demo-cpu.yaml and hrm-27m.yaml, the demo tokenizer's vocabulary) and its real optimizer state
(AdamW after one step), then saves it the way RaySession does, alternating the two upload modes:
  write ms      the checkpoint files (weights, optimizer, RNG, carry, sampler, state), fsynced: the training
                thread writes them in either mode, before ray.train.report
  seal ms       COMPLETE: the hash of every file
  report ms     ray.train.report(checkpoint=..., checkpoint_upload_fn=publish): publication into
                checkpoints/step-N (an atomic rename, fsynced, then pruning). SYNC waits for it; ASYNC hands it
                to a thread and returns
  stall ms      write + seal + report: what one save costs the training loop
  published ms  until the checkpoint is in checkpoints/step-N (ASYNC: the upload thread's end)
Between two saves the worker waits --gap seconds (default 3), as training would: Ray's controller collects a
worker's reports every 2 s and holds one at a time, so a report made sooner after the previous one waits
for that collection, in either mode (in SYNC the training thread waits; --gap 0 shows it).
Medians over the saves. Results go to bench/results/checkpoint_stall.json (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aios.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "checkpoint_stall.json"
SHAPES = {"demo": "config/train/demo-cpu.yaml", "27M": "config/train/hrm-27m.yaml"}
MODES = ("SYNC", "ASYNC")


def _worker(loop_config: dict) -> None:
    """In the Ray Train worker: each shape's model and optimizer, saved `saves` times in each mode."""
    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    from aios.config import TrainingConfig
    from aios.models.hrm_act_v1 import HRMACTv1
    from aios.tokenizers import load_tokenizer
    from aios.train import checkpoint as ckpt
    from aios.train.loop import model_config_for

    os.chdir(loop_config["cwd"])
    torch.set_num_threads(loop_config["threads"])
    root = Path(loop_config["root"])
    rows = []
    for shape, preset in SHAPES.items():
        base = TrainingConfig.load_yaml(REPO / SHAPES["demo"])
        config = TrainingConfig.load_yaml(REPO / preset, check_paths=False).replace(
            model=base.model, dataset_file=base.dataset_file, check_paths=False)
        model = HRMACTv1(model_config_for(config, len(load_tokenizer(config.model))))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()  # AdamW state: two moments per weight
        batch = {"inputs": torch.zeros(config.batch_size, config.max_seq_len, dtype=torch.long)}
        batch["labels"] = batch["inputs"].clone()
        carries = [model.initial_carry(batch)]
        state = {"world_size": 1, "step": 0}
        checkpoints = root / "bench" / shape  # under the run directory (RunConfig name "bench"), as Ray requires
        for i in range(loop_config["saves"] * len(MODES)):
            mode = MODES[i % len(MODES)]
            time.sleep(loop_config["gap"])  # training between two checkpoints
            staged = root / shape / f"staging-{i}"
            published_at: list[float] = []
            started = time.perf_counter()
            ckpt.write_checkpoint_files(staged, rank=0, model=model,
                                        optimizer_state={"optimizer": optimizer.state_dict(), "scaler": None},
                                        rng_state=ckpt.capture_rng_state(torch.device("cpu")), carries=carries,
                                        sampler_state={"bench": True}, state=state)
            written = time.perf_counter()
            ckpt.seal_checkpoint(staged)
            sealed = time.perf_counter()
            done = threading.Event()

            def publish(checkpoint, _name, step=i, into=checkpoints, published_at=published_at, done=done):
                path = ckpt.publish_checkpoint(Path(checkpoint.path), into, step + 1, keep=2)
                published_at.append((time.perf_counter(), path))
                done.set()
                return ray.train.Checkpoint(str(path.absolute()))

            ray.train.report({"step": i + 1}, checkpoint=ray.train.Checkpoint.from_directory(str(staged)),
                             checkpoint_dir_name=f"step-{i + 1}", checkpoint_upload_fn=publish,
                             checkpoint_upload_mode=CheckpointUploadMode[mode],
                             delete_local_checkpoint_after_upload=False)
            reported = time.perf_counter()
            done.wait(120)
            size = sum(f.stat().st_size for f in published_at[0][1].iterdir())
            rows.append({"shape": shape, "mode": mode, "bytes": size, "write_s": written - started,
                         "seal_s": sealed - written, "report_s": reported - sealed, "stall_s": reported - started,
                         "published_s": published_at[0][0] - started})
    ray.get(loop_config["sink"].put.remote(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3, help="saves per shape and mode (default 3)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds between two saves (default 3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.saves < 1:
        parser.error("--saves must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    @ray.remote(num_cpus=0)
    class Sink:
        def __init__(self):
            self.rows = None

        def put(self, rows):
            self.rows = rows

        def get(self):
            return self.rows

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="aios-ckpt-bench-") as root:
            sink = Sink.remote()
            TorchTrainer(_worker, train_loop_config={"cwd": str(REPO), "threads": cpus, "root": root,
                                                     "saves": args.saves, "sink": sink, "gap": args.gap},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                         run_config=RunConfig(name="bench", storage_path=root)).fit()
            rows = ray.get(sink.get.remote())
    finally:
        ray.shutdown()
    summary = {}
    for shape in SHAPES:
        for mode in MODES:
            mine = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            summary[f"{shape} {mode}"] = {k: statistics.median(r[k] for r in mine)
                                          for k in ("bytes", "write_s", "seal_s", "report_s", "stall_s", "published_s")}
    table = Table(title=f"checkpoint stall per save in a Ray Train worker, median of {args.saves}, {args.gap:g} s "
                        f"apart, {cpus} CPUs")
    for column in ("shape", "mode", "MB", "write ms", "seal ms", "report ms", "stall ms", "published ms"):
        table.add_column(column, justify="right")
    for key, row in summary.items():
        shape, mode = key.split()
        table.add_row(shape, mode, f"{row['bytes'] / 1e6:.1f}", *(f"{1000 * row[k]:.0f}" for k in
                      ("write_s", "seal_s", "report_s", "stall_s", "published_s")))
    console = Console()
    console.print(table)
    for shape in SHAPES:
        sync, asynchronous = summary[f"{shape} SYNC"], summary[f"{shape} ASYNC"]
        console.print(f"{shape}: ASYNC saves {1000 * (sync['stall_s'] - asynchronous['stall_s']):.0f} ms of a "
                      f"{1000 * sync['stall_s']:.0f} ms stall ({sync['report_s'] / sync['stall_s']:.0%} of it is the "
                      f"publication ASYNC can hide)")
    atomic_write_json(args.output, {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "saves": args.saves, "gap_s": args.gap, "cpu_count": cpus, "runs": rows, "summary": summary})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
