"""Training throughput: the real Trainer against a bare PyTorch loop on the same model and batches.

    python bench/train_throughput.py                      # demo and hrm-27m, about 2 minutes on 2 cores
    python bench/train_throughput.py --shapes demo --steps 40

What is measured, per shape:
- demo:    config/train/demo-cpu.yaml as shipped (its model, seq_len, batch size and AdamW; 2k BPE vocab).
- hrm-27m: the model shape of config/train/hrm-27m.yaml (D 512, 8 heads, expansion 4, 4+4 layers, 2/2 cycles,
           halt_max_steps 16, its adam-atan2 optimizer) at seq 128, batch 4, on the same 2k tokenizer and data.
Both train on training_data/curated_datasets/test_sample.txt (text_mode document), fp32, no autocast, no
gradient checkpointing, in a temporary directory.

  trainer  `Trainer(config, LocalSession(...)).train_step()`: one optimizer step as `aios` runs it (sampler
           refill of halted rows, shift_labels, forward, act_loss, backward, clip, step, schedule, metrics).
  bare     the minimum the same step needs, on the SAME model object, batch size and optimizer type, with
           batches drawn once beforehand: model(carry, batch) -> act_loss -> (loss / B).backward() -> clip ->
           optimizer.step() -> zero_grad.
After 2 warm-up steps each, trainer and bare steps alternate in pairs (T B, B T, T B, ...) so machine noise
and drift hit both alike; the table shows medians. overhead = median trainer step / median bare step - 1; the
budget is 5%. Single steps on a 2-core machine vary by about 10%, so a few percent either way is noise; the
JSON also holds every step time and the median of the per-pair ratios.

Peak RSS is `ru_maxrss`, which only ever grows within a process, so each variant runs alone in a fresh
subprocess (2 warm-up steps + 1) for its RSS column; the timing subprocess holds both variants at once.

Reading the table:
  tokens/s      rows x seq_len per step / median step time (each row runs one ACT segment per step).
  GFLOP/s       model FLOPs of one step (see `training_step_flops`) / median step time; "% peak" compares it
                with this machine's best float32 torch.matmul rate, measured first, on the same thread count.
  FLOPs/step    the analytic count, and torch.utils.flop_counter.FlopCounterMode on one real trainer step as a
                cross-check (it also counts the attention scores that flash-attention backward recomputes).
Results go to bench/results/train_throughput.json (git-ignored) with machine info and a timestamp.

Run it on an otherwise idle machine. When other processes hold the cores, torch's OpenMP threads wait for
each other at every parallel op and small elementwise ops get many times slower (on 2 busy cores a 131k
element multiply took 7.7 ms instead of 0.12 ms), so the script warns when the CPUs are busy as it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from aios.atomic import atomic_write_json
from aios.config.training import TrainingConfig, read_yaml_settings
from aios.data import PreparedDataset
from aios.models.hrm_act_v1 import HRMACTv1, HRMACTv1Config, act_loss, shift_labels
from aios.train.loop import Trainer, model_config_for
from aios.train.optim import build_optimizer
from aios.train.session import LocalSession

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "config" / "train" / "demo-cpu.yaml"
HRM_27M_YAML = REPO / "config" / "train" / "hrm-27m.yaml"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "train_throughput.json"

SHAPES = ("demo", "hrm-27m")
DEFAULT_STEPS = {"demo": 30, "hrm-27m": 6}  # timed steps per variant; the 27M step takes seconds on 2 cores
DEFAULT_BATCH = {"demo": None, "hrm-27m": 4}  # None: the preset's batch size
WARMUP_STEPS = 2
FIXED_BATCHES = 4  # pre-drawn batches the bare loop cycles through
OVERHEAD_BUDGET = 0.05
BUSY_WARNING = 0.15  # share of the CPUs already busy before the run above which the results are suspect
DATA_KEYS = ("model", "dataset_file", "text_mode", "eval_file", "dataset_chunk_size")  # taken from the demo
PATH_KEYS = ("model", "dataset_file", "eval_file")


# ----------------------------------------------------------------------------------------------------
# Configs


def shape_config(shape: str, batch_size: int | None, work_dir: Path) -> TrainingConfig:
    """The TrainingConfig of one benchmark shape, writing only under `work_dir`."""
    demo = read_yaml_settings(DEMO_YAML)
    if shape == "demo":
        settings = demo
    else:  # the reference model shape and optimizer, on the demo's tokenizer and text, at seq 128
        settings = {**read_yaml_settings(HRM_27M_YAML), **{k: demo[k] for k in DATA_KEYS}, "max_seq_len": 128,
                    "batch_size": DEFAULT_BATCH["hrm-27m"]}
    for key in PATH_KEYS:  # the presets' paths are relative to the repository root
        if settings.get(key):
            settings[key] = str(REPO / settings[key])
    settings.update(progress=False, amp=False, gradient_checkpointing=False, steps=10_000, iterate=True,
                    eval_every=0, checkpoint_every=0, data_cache_dir=str(work_dir / "prepared_data"),
                    bundle_dir=str(work_dir / "brains"), brain_name=f"bench-{shape}")
    if batch_size is not None:
        settings["batch_size"] = batch_size
    return TrainingConfig.from_dict(settings)


# ----------------------------------------------------------------------------------------------------
# FLOPs


def training_step_flops(cfg: HRMACTv1Config, batch_size: int) -> dict[str, int]:
    """Matmul FLOPs of one training step of HRM ACT v1 (one ACT segment for each of B rows), analytically.

    B rows of S tokens (N = B * S), width D, SwiGLU inner width I, vocab V; a multiply-add is 2 FLOPs.

      block      = N * 2 * (4 D^2 + 3 D I)      qkv (D -> 3D), o (D -> D), gate_up (D -> 2I), down (I -> D)
                 + B * 4 * S^2 * D              QK^T and AV over the full S x S (not halved for the causal
                                                mask; the nanoGPT / FlopCounterMode convention)
      L, H       = L_layers * block, H_layers * block              one application of a reasoning module
      heads      = 2 N D V + 2 B D 2                               lm_head on every position, q_head on one
      segment    = H_cycles * L_cycles * L + H_cycles * H + heads  forward of one segment
      step       = 2 * segment                  the segment, plus the extra no-grad segment the ACT wrapper
                                                runs in training for the q_continue target
                 + 2 * (L + H + heads)          backward (2x forward) of the one-step gradient: only the
                                                last L and H application and the heads are in the graph

    Elementwise work (norms, RoPE, softmax, loss, optimizer) is not counted.
    """
    B, S, D, I, V = batch_size, cfg.seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N = B * S
    block = N * 2 * (4 * D * D + 3 * D * I) + B * 4 * S * S * D
    L, H = cfg.L_layers * block, cfg.H_layers * block
    heads = 2 * N * D * V + 2 * B * D * 2
    segment = cfg.H_cycles * cfg.L_cycles * L + cfg.H_cycles * H + heads
    forward = 2 * segment
    backward = 2 * (L + H + heads)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def counted_flops(step) -> int:
    """FLOPs FlopCounterMode sees while `step()` runs, CPU flash attention included."""
    aten = torch.ops.aten
    # torch counts SDPA only for its CUDA kernels; the CPU kernel has the same shapes and work.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        step()
    return counter.get_total_flops()


def matmul_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10) -> dict:
    """Best float32 torch.matmul rate of this machine at torch's thread count."""
    results = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
        results[str(n)] = 2 * n**3 / best / 1e9
    return {"gflops": max(results.values()), "by_size": results, "repeats": repeats}


# ----------------------------------------------------------------------------------------------------
# The two ways to run a step


class BareLoop:
    """The minimal training step on `model`: fixed batches, a carry of its own, a fresh optimizer."""

    def __init__(self, model: HRMACTv1, config: TrainingConfig, batches: list[dict[str, torch.Tensor]]):
        self.model, self.batches = model, batches
        self.grad_clip = config.grad_clip if config.grad_clip > 0 else float("inf")  # as the Trainer clips
        self.rows = batches[0]["inputs"].shape[0]
        self.optimizer = build_optimizer(model, name=config.optimizer, lr=config.lr,
                                         weight_decay=config.weight_decay, use_8bit=False,
                                         device=torch.device("cpu"))
        self.carry = model.initial_carry(batches[0])  # every row halted: the first step takes batch 0
        self.calls = 0

    def step(self) -> None:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.carry, outputs = self.model(self.carry, batch)
        loss, _ = act_loss(self.carry, outputs, self.model.config)
        (loss / self.rows).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def draw_fixed_batches(dataset: PreparedDataset, batch_size: int, seed: int) -> np.ndarray:
    """(FIXED_BATCHES, batch_size, window) int64 training windows, drawn once."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(dataset.num_train, size=FIXED_BATCHES * batch_size, replace=False)
    return dataset.get(ids).reshape(FIXED_BATCHES, batch_size, dataset.window)


def as_batches(tokens: np.ndarray) -> list[dict[str, torch.Tensor]]:
    return [shift_labels(torch.from_numpy(t)) for t in tokens]


def trainer_step(trainer: Trainer) -> None:
    if trainer.train_step() is None:
        raise RuntimeError("the training data ran out during the benchmark")


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat): other work on the machine skews timings."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy_before, total_before = sample()
    time.sleep(seconds)
    busy_after, total_after = sample()
    return (busy_after - busy_before) / max(1, total_after - total_before)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess


def new_session(work_dir: Path) -> LocalSession:
    """An in-process session; train_step never checkpoints, so nothing needs closing or signals."""
    return LocalSession(work_dir / "checkpoints", device=torch.device("cpu"), keep_checkpoints=1, resume=False)


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def run_paired(config: TrainingConfig, steps: int, work_dir: Path) -> dict:
    """Trainer and bare loop on one model, interleaved; saves the bare loop's batches for `run_alone`."""
    trainer = Trainer(config, new_session(work_dir))
    tokens = draw_fixed_batches(trainer.dataset, config.batch_size, config.seed)
    np.save(work_dir / "fixed_batches.npy", tokens)
    bare = BareLoop(trainer.model, config, as_batches(tokens))

    for _ in range(WARMUP_STEPS):
        trainer_step(trainer)
        bare.step()
    trainer_times, bare_times = [], []
    for i in range(steps):  # T B, B T, T B, ...: neither variant always runs right after the other
        if i % 2 == 0:
            trainer_times.append(timed(lambda: trainer_step(trainer)))
            bare_times.append(timed(bare.step))
        else:
            bare_times.append(timed(bare.step))
            trainer_times.append(timed(lambda: trainer_step(trainer)))
    flop_counter = counted_flops(lambda: trainer_step(trainer))

    model = trainer.model
    return {
        "trainer_step_s": trainer_times, "bare_step_s": bare_times, "flop_counter": flop_counter,
        "analytic": training_step_flops(model.config, config.batch_size),
        "parameters": model.num_parameters(), "vocab_size": model.config.vocab_size,
        "optimizer": type(trainer.optimizer).__name__, "torch_threads": torch.get_num_threads(),
        "peak_rss_mb_both": peak_rss_mb(),
    }


def run_alone(config: TrainingConfig, variant: str, work_dir: Path) -> dict:
    """One variant alone in this process: its RSS before the first step and its peak after a few."""
    if variant == "trainer":
        trainer = Trainer(config, new_session(work_dir))
        step = lambda: trainer_step(trainer)  # noqa: E731
    else:
        tokens = np.load(work_dir / "fixed_batches.npy")  # what run_paired drew: no tokenizer, no dataset
        vocab_size = int(json.loads((work_dir / "vocab_size.json").read_text()))
        torch.manual_seed(config.seed)  # the Trainer's initial weights
        model = HRMACTv1(model_config_for(config, vocab_size))
        model.train()
        step = BareLoop(model, config, as_batches(tokens)).step
    setup_rss = current_rss_mb()
    for _ in range(WARMUP_STEPS + 1):
        step()
    return {"setup_rss_mb": setup_rss, "peak_rss_mb": peak_rss_mb()}


def worker_main(args: argparse.Namespace) -> None:
    shape, variant = args.worker.split(":")
    work_dir = Path(args.work_dir)
    config = shape_config(shape, args.batch_size, work_dir)
    if variant == "paired":
        result = run_paired(config, args.steps, work_dir)
        (work_dir / "vocab_size.json").write_text(json.dumps(result["vocab_size"]))
    else:
        result = run_alone(config, variant, work_dir)
    Path(args.worker_output).write_text(json.dumps(result))


def spawn(worker: str, args: argparse.Namespace, steps: int, batch_size: int | None, work_dir: Path) -> dict:
    output = work_dir / f"{worker.replace(':', '-')}.json"
    command = [sys.executable, __file__, "--worker", worker, "--worker-output", str(output),
               "--work-dir", str(work_dir), "--steps", str(steps)]
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads(output.read_text())


# ----------------------------------------------------------------------------------------------------
# The benchmark


def bench_shape(shape: str, args: argparse.Namespace, matmul_peak: float, root: Path) -> dict:
    steps = args.steps or DEFAULT_STEPS[shape]
    batch_size = args.batch_size or DEFAULT_BATCH[shape]
    work_dir = root / shape
    work_dir.mkdir()
    config = shape_config(shape, batch_size, work_dir)
    print(f"[{shape}] timing {steps} interleaved steps per variant ...", flush=True)
    paired = spawn(f"{shape}:paired", args, steps, batch_size, work_dir)
    print(f"[{shape}] peak RSS of each variant alone ...", flush=True)
    alone = {variant: spawn(f"{shape}:{variant}", args, steps, batch_size, work_dir)
             for variant in ("trainer", "bare")}

    flops = paired["analytic"]["total"]
    tokens_per_step = config.batch_size * config.max_seq_len
    variants = {}
    for variant in ("trainer", "bare"):
        times = paired[f"{variant}_step_s"]
        median = statistics.median(times)
        gflops = flops / median / 1e9
        variants[variant] = {
            "step_time_s_median": median, "step_time_s": times, "tokens_per_s": tokens_per_step / median,
            "gflops": gflops, "percent_of_matmul_peak": 100 * gflops / matmul_peak, **alone[variant],
        }
    overhead = variants["trainer"]["step_time_s_median"] / variants["bare"]["step_time_s_median"] - 1
    # Neighbouring steps share the machine's state best; the median of their ratios resists slow drift.
    paired_overhead = statistics.median(t / b for t, b in zip(paired["trainer_step_s"], paired["bare_step_s"],
                                                                 strict=True)) - 1
    return {
        "model": {"hidden_size": config.hidden_size, "num_heads": config.num_heads, "expansion": config.expansion,
                  "h_layers": config.h_layers, "l_layers": config.l_layers, "h_cycles": config.h_cycles,
                  "l_cycles": config.l_cycles, "halt_max_steps": config.halt_max_steps,
                  "vocab_size": paired["vocab_size"], "parameters": paired["parameters"]},
        "seq_len": config.max_seq_len, "batch_size": config.batch_size, "optimizer": paired["optimizer"],
        "timed_steps": steps, "warmup_steps": WARMUP_STEPS, "torch_threads": paired["torch_threads"],
        "flops_per_step": {"analytic": flops, "analytic_forward": paired["analytic"]["forward"],
                           "analytic_backward": paired["analytic"]["backward"],
                           "flop_counter": paired["flop_counter"]},
        "trainer": variants["trainer"], "bare": variants["bare"],
        "peak_rss_mb_both_in_one_process": paired["peak_rss_mb_both"],
        "overhead_percent": 100 * overhead, "overhead_percent_of_pairs": 100 * paired_overhead,
        "within_budget": overhead <= OVERHEAD_BUDGET,
    }


def print_table(report: dict) -> None:
    peak = report["matmul"]["gflops"]
    table = Table(title=f"Training step throughput (CPU, {report['machine']['torch_threads']} threads, "
                        f"matmul peak {peak:.1f} GFLOP/s)")
    for column in ("shape", "variant", "params", "B x seq", "step ms", "tokens/s", "peak RSS MiB",
                   "step +MiB", "GFLOP/s", "% peak", "overhead"):
        table.add_column(column, justify="left" if column in ("shape", "variant") else "right")
    for shape, result in report["shapes"].items():
        overhead = f"{result['overhead_percent']:+.1f}% {'ok' if result['within_budget'] else 'OVER 5%'}"
        for variant in ("trainer", "bare"):
            row = result[variant]
            table.add_row(shape, variant, f"{result['model']['parameters'] / 1e6:.2f}M",
                          f"{result['batch_size']} x {result['seq_len']}", f"{1000 * row['step_time_s_median']:.1f}",
                          f"{row['tokens_per_s']:,.0f}", f"{row['peak_rss_mb']:,.0f}",
                          f"{row['peak_rss_mb'] - row['setup_rss_mb']:,.0f}", f"{row['gflops']:.1f}",
                          f"{row['percent_of_matmul_peak']:.1f}", overhead if variant == "trainer" else "")
    console = Console() if sys.stdout.isatty() else Console(width=132)  # whole rows in logs and pipes
    console.print(table)
    for shape, result in report["shapes"].items():
        flops = result["flops_per_step"]
        console.print(f"{shape}: {flops['analytic'] / 1e9:.2f} GFLOP/step analytic, "
                      f"{flops['flop_counter'] / 1e9:.2f} counted by FlopCounterMode; "
                      f"{result['timed_steps']} timed steps per variant, optimizer {result['optimizer']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant (default: " +
                             ", ".join(f"{shape} {n}" for shape, n in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per step for every shape (default: demo the preset's, hrm-27m 4)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    # Internal: one measurement in a fresh process.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        parser.error(f"--shapes: unknown shape(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SHAPES)}")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    busy = busy_fraction()
    if busy > BUSY_WARNING:
        print(f"warning: {100 * busy:.0f}% of the CPUs are busy before the benchmark starts; with torch's "
              f"threads competing for cores the numbers will be low and noisy", flush=True)
    print(f"matmul peak: float32 torch.matmul, {torch.get_num_threads()} threads ...", flush=True)
    matmul = matmul_gflops()
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch_version": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "cpu_model": cpu_model(),
                    "busy_before_start_percent": 100 * busy, "load_average_before": os.getloadavg()},
        "matmul": matmul,
        "overhead_budget_percent": 100 * OVERHEAD_BUDGET,
        "shapes": {},
    }
    with tempfile.TemporaryDirectory(prefix="aios-bench-") as root:
        for shape in args.shapes:
            report["shapes"][shape] = bench_shape(shape, args, matmul["gflops"], Path(root))
    print_table(report)
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
