"""Peak memory and step time of the memory options, one case per fresh process, on the 27M shape.

    python bench/memory.py                       # every case, 4 timed steps each (about 7 minutes on 2 cores)
    python bench/memory.py --cases baseline,amp --steps 2
    python bench/memory.py --cases ddp,zero1,zero2,zero3

The shape is config/train/hrm-27m.yaml (D 512, 8 heads, expansion 4, 4+4 layers, H_cycles = L_cycles = 2,
halt_max_steps 16, seq 256) on the shipped 2k-token Shakespeare tokenizer (29.4M parameters), batch 4,
AdamW (the 8-bit case swaps in bitsandbytes' AdamW8bit), trained by `Trainer(config, LocalSession).train_step()`
as `aios` runs it:
  baseline        float32, no gradient checkpointing
  checkpointing   --gradient-checkpointing (each block of the one-step gradient's last L and H pass recomputed
                  in backward)
  amp             --amp (bf16 autocast; emulated, so slower, on a CPU without native bf16)
  8bit            --use-8bit-optimizer (bitsandbytes AdamW8bit: one-byte moments)
  all             the three together
Two data-parallel processes (gloo on 127.0.0.1, one thread each, batch 4 per process: a global batch of 8), the
Trainer on a process-group session, as a Ray worker runs it:
  ddp             the loop's own gradient all-reduce
  zero1/2/3       --zero-stage (DeepSpeed on the process group, config/deepspeed/<stage>.json): the optimizer
                  state sharded over the two; zero2 also the gradients; zero3 also the weights
Compare the two-process rows with each other (one thread each), the one-process rows with each other.

Each case runs alone in new processes, so its peak RSS (ru_maxrss, which only grows) is its own (for the
two-process cases: the larger of the two ranks'):
  optim MB      the optimizer state the process holds after the steps (ZeRO: its partition's)
  setup MB      RSS once the Trainer is built (weights, data, the imported libraries), before the first step
  peak MB       the highest RSS after warm-up + timed steps
  step MB       peak - setup: what training adds (activations, gradients, optimizer state, allocator slack)
  step s        median time of the timed steps (after one warm-up step)
  CUDA peak MB  torch.cuda.max_memory_allocated, where a GPU is used (--device cuda)
Results go to bench/results/memory.json (git-ignored) with machine facts and a timestamp. Run it on an idle
machine: step times on a busy one are noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config" / "train" / "hrm-27m.yaml"
TOKENIZER = REPO / "training_data" / "tokenizers" / "shakespeare-bpe-2k"
DATASET = REPO / "training_data" / "curated_datasets" / "test_sample.txt"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "memory.json"
CASES: dict[str, dict] = {
    "baseline": {},
    "checkpointing": {"gradient_checkpointing": True},
    "amp": {"amp": True},
    "8bit": {"use_8bit_optimizer": True},
    "all": {"gradient_checkpointing": True, "amp": True, "use_8bit_optimizer": True},
    "ddp": {"world_size": "2"},
    "zero1": {"world_size": "2", "zero_stage": "zero1"},
    "zero2": {"world_size": "2", "zero_stage": "zero2"},
    "zero3": {"world_size": "2", "zero_stage": "zero3"},
}
WORLD = 2  # processes of the data-parallel cases
WARMUP_STEPS = 1


def case_config(case: str, work_dir: Path, batch_size: int, device: str):
    from aios.config.training import TrainingConfig, read_yaml_settings

    settings = read_yaml_settings(PRESET)
    settings.update(
        model=str(TOKENIZER), dataset_file=str(DATASET), dataset_chunk_size=1024,
        data_cache_dir=str(work_dir / "prepared_data"), optimizer="adamw", batch_size=batch_size, warmup_steps=0,
        amp=False, gradient_checkpointing=False, use_8bit_optimizer=False, steps=100_000, iterate=True,
        eval_every=0, checkpoint_every=0, progress=False, bundle_dir=str(work_dir / "brains"),
        brain_name=f"bench-memory-{case}", device=device, launcher="local",
    )
    settings.update(CASES[case])
    if "world_size" in settings:
        settings["launcher"] = "ray"  # what the config requires of several workers; the processes are ours here
    return TrainingConfig.from_dict(settings)


def process_group_session(checkpoints: Path, device):
    """A LocalSession that is rank RANK of WORLD_SIZE on the default process group (what RaySession adds on a
    Ray worker, minus the checkpoints: the benchmark saves none)."""
    import torch.distributed as dist

    from aios.cluster.session import sum_gradients
    from aios.train.session import LocalSession

    class ProcessGroupSession(LocalSession):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        _flat = None

        def sum_gradients(self, params):
            self._flat = sum_gradients(params, self._flat)

        def all_reduce(self, values):
            buffer = values.clone()
            dist.all_reduce(buffer)
            return buffer

    return ProcessGroupSession(checkpoints, device=device, keep_checkpoints=1, resume=False)


def optimizer_state_mb(optimizer) -> float:
    """The optimizer state this process holds (moments; 8-bit: quantized, with their scales), in MB. Under
    ZeRO `optimizer` is the run's AdamW inside DeepSpeed: its state covers this rank's partition only."""
    import torch

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return sum(size(v) for v in value) if isinstance(value, (list, tuple)) else 0

    return sum(size(state) for state in optimizer.state.values()) / 2**20


def worker(args: argparse.Namespace) -> dict:
    """One case in this process (one rank of a data-parallel case): build the Trainer, step, measure."""
    import os

    import torch

    from aios.train.loop import Trainer, current_rss_mb, peak_rss_mb
    from aios.train.session import LocalSession

    work_dir = Path(args.work_dir)
    config = case_config(args.worker, work_dir, args.batch_size, args.device)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    checkpoints = work_dir / f"checkpoints-{args.worker}"
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        torch.set_num_threads(1)  # one core each, as --cpus-per-worker 1 gives a Ray worker
        dist.init_process_group("gloo")
        session = process_group_session(checkpoints, device)
    else:
        session = LocalSession(checkpoints, device=device, keep_checkpoints=1, resume=False)
    trainer = Trainer(config, session)
    setup = current_rss_mb()
    times, losses = [], []
    for i in range(WARMUP_STEPS + args.steps):
        start = time.perf_counter()
        record = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if not isinstance(record, dict):
            raise RuntimeError(f"the training data ran out during the benchmark ({record})")
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
            losses.append(record["loss"])
    return {
        "case": args.worker, "flags": CASES[args.worker], "parameters": trainer.model.num_parameters(),
        "optimizer": type(trainer.optimizer).__name__, "autocast": str(trainer.amp_dtype),
        "rank": trainer.rank, "world_size": trainer.world, "optimizer_state_mb": optimizer_state_mb(trainer.optimizer),
        "setup_rss_mb": setup, "peak_rss_mb": peak_rss_mb(), "step_mb": peak_rss_mb() - setup,
        "step_s": statistics.median(times), "step_times_s": times, "losses": losses,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def spawn(case: str, args: argparse.Namespace, work_dir: Path) -> dict:
    """The case in a fresh process, or WORLD of them on one process group; the row is rank 0's, with the
    larger peak of the ranks."""
    import os
    import socket

    world = WORLD if "world_size" in CASES[case] else 1
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes, outputs = [], []
    for rank in range(world):
        output = work_dir / f"{case}-rank{rank}.json"
        command = [sys.executable, __file__, "--worker", case, "--worker-output", str(output), "--work-dir",
                   str(work_dir), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device",
                   args.device]
        env = dict(os.environ)
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        processes.append(subprocess.Popen(command, cwd=REPO, env=env))
        outputs.append(output)
    codes = [p.wait(timeout=1800) for p in processes]
    if any(codes):
        raise RuntimeError(f"case {case}: a process exited with {codes}")
    ranks = [json.loads(output.read_text()) for output in outputs]
    row = ranks[0]
    if world > 1:
        worst = max(ranks, key=lambda r: r["peak_rss_mb"])
        row.update(peak_rss_mb=worst["peak_rss_mb"], setup_rss_mb=worst["setup_rss_mb"], step_mb=worst["step_mb"],
                   ranks=[{k: r[k] for k in ("rank", "setup_rss_mb", "peak_rss_mb", "step_mb", "step_s")} for r in ranks])
    return row


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = report["cases"]
    bases = {1: rows.get("baseline"), WORLD: rows.get("ddp")}  # each row against its own kind
    cuda = any(r["cuda_peak_mb"] is not None for r in rows.values())
    table = Table(title=f"memory options, 27M shape ({report['parameters'] / 1e6:.1f}M parameters), batch "
                        f"{report['batch_size']}, seq {report['seq_len']}, {report['device']}")
    for column in ["case", "procs", "optim MB", "setup MB", "peak MB", "step MB", "x base", "step s", "x base"] + (
            ["CUDA peak MB"] if cuda else []):
        table.add_column(column, justify="left" if column == "case" else "right", no_wrap=True)
    for name in [case for case in CASES if case in rows]:
        r = rows[name]
        base = bases[r.get("world_size", 1)]
        cells = [name, str(r.get("world_size", 1)), f"{r['optimizer_state_mb']:.0f}", f"{r['setup_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['step_mb']:.0f}",
                 f"{r['step_mb'] / base['step_mb']:.2f}x" if base else "-", f"{r['step_s']:.2f}",
                 f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"]
        if cuda:
            cells.append(f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-")
        table.add_row(*cells)
    Console(width=140).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; pick from {', '.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_output).write_text(json.dumps(worker(args)))
        return
    from aios.atomic import atomic_write_json
    from aios.config.training import read_yaml_settings

    preset = read_yaml_settings(PRESET)
    with tempfile.TemporaryDirectory(prefix="aios-bench-memory-") as tmp:
        cases = {}
        for case in args.cases.split(","):
            print(f"{case} ...", flush=True)
            cases[case] = spawn(case, args, Path(tmp))
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(), "machine": platform.machine(),
        "python": platform.python_version(), "device": args.device, "batch_size": args.batch_size,
        "seq_len": preset["max_seq_len"], "steps": args.steps,
        "parameters": next(iter(cases.values()))["parameters"], "cases": cases,
    }
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
