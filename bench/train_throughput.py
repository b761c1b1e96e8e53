"""Training-step throughput: the aios Trainer against a bare loop and the reference HRM code, side by side.

    python bench/train_throughput.py --reference ~/src/HRM        # everything (about 11 minutes on 2 cores)
    python bench/train_throughput.py --shapes d256 --no-compile    # a quick look, no reference
    python bench/train_throughput.py --reference ~/src/HRM --steps 20 --no-rss

Two model shapes, both on an 8192-token BPE trained (in a temporary directory) on the shipped Shakespeare
sample, seq 128, rope, H_cycles = L_cycles = 2, AdamW (lr 1e-4, betas 0.9/0.95, wd 0.1):
  d256     D 256, 4 heads, expansion 4, 2+2 layers, halt_max_steps 2, batch 8
  hrm-27m  the reference 27M puzzle shape: D 512, 8 heads, expansion 4, 4+4 layers, halt_max_steps 16, batch 4
           (35.6M parameters here: the 8192-token embedding and head; the Sudoku model's 27.3M has vocab 11)

Every variant of a shape lives in one process and they take turns step by step: each round runs every
variant once, a lane's variants back to back (their order reversing each round) and the lanes in rotating
order, so machine noise and drift hit all alike; the table shows medians, the ratios also as the median
of each round's ratio:
  lanes     fp32 | bf16 autocast, each eager | compiled (HRMACTv1.compile_segments; the reference:
            torch.compile(model, dynamic=False) as its pretrain.py does)
  trainer   `Trainer(config, LocalSession).train_step()`: one optimizer step as `aios` runs it (sampler refill
            of halted rows, forward, act_loss, backward, clip, step, schedule, metrics); causal LM mode
  bare      the minimum the same step needs, on the trainer's model object, with batches drawn once:
            model(carry, batch) -> act_loss -> (loss / B).backward() -> clip -> step -> zero_grad
  bare non-causal   the same on an aios model with causal=False: the reference's attention (eager lanes)
  reference the reference's training step as its pretrain.py runs it, on the bare loop's batches: its
            ACTLossHead(HierarchicalReasoningModel_ACTV1) (forward_dtype float32 | bfloat16, its way of
            running bf16) -> ((1 / B) * loss).backward() -> step -> zero_grad -> metrics to host

The reference (github.com/sapientinc/HRM) is not part of aios: pass a checkout with --reference DIR; without
it those rows are skipped. It is imported from DIR as it is, except that its `flash_attn_interface` import is
served by a module of our own over torch's scaled_dot_product_attention (same layout, non-causal). Its
optimizer, AdamATan2 (the adam-atan2 package), is a CUDA-only build, so both sides use torch AdamW; both use
softmax cross-entropy (aios's default; the reference's config picks stablemax); the reference does not clip
gradients, aios does (--grad-clip 1.0). aios trains causal LM mode, the reference is bidirectional: causal
attention skips about a third of the score blocks at seq 128, so the "bare non-causal" row shows aios at the
reference's exact attention work. A numeric check loads the same weights into both and compares one segment.

Reading the table:
  step ms / tokens/s   median step; rows x seq_len per step / median step time
  vs reference         median reference step / median step of this row, same lane (target: trainer >= 1.2x)
  GFLOP/s, % peak      the matmul FLOPs this implementation executes per step (see `step_flops`) / median step,
                       against this machine's best matmul rate for the lane's dtype, measured first
  peak RSS             each eager variant alone in a fresh process (ru_maxrss only grows); --no-rss skips it
The trainer's overhead over the bare loop has a budget of 3%. Results go to bench/results/train_throughput.json
(git-ignored) with every step time, machine info and a timestamp.

Run it on an otherwise idle machine: when other processes hold the cores, torch's OpenMP threads wait for
each other at every parallel op and small ops get many times slower. The script measures how busy the CPUs
are before and after, and how much CPU time other processes took during the run, and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from aios.atomic import atomic_write_json
from aios.config.training import TrainingConfig
from aios.data import PreparedDataset
from aios.inference import autocast_context
from aios.models import hrm_act_v1 as hrm
from aios.models.hrm_act_v1 import HRMACTv1, HRMACTv1Config, act_loss, shift_labels
from aios.train.loop import Trainer, current_rss_mb, model_config_for, peak_rss_mb, prepare_training_data
from aios.train.optim import BETAS, build_optimizer
from aios.train.session import LocalSession

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "training_data" / "curated_datasets" / "test_sample.txt"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "train_throughput.json"
VOCAB_SIZE = 8192
SEQ_LEN = 128


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_heads: int
    expansion: float
    layers: int  # H_layers = L_layers
    halt_max_steps: int
    batch_size: int
    steps: int  # default timed rounds


SHAPES = {
    "d256": Shape(hidden_size=256, num_heads=4, expansion=4, layers=2, halt_max_steps=2, batch_size=8, steps=12),
    "hrm-27m": Shape(hidden_size=512, num_heads=8, expansion=4, layers=4, halt_max_steps=16, batch_size=4, steps=6),
}
CYCLES = 2  # H_cycles = L_cycles
LR, WEIGHT_DECAY = 1e-4, 0.1
WARMUP_STEPS = {False: 2, True: 3}  # per variant before timing, by lane compiled or not (compiling happens here)
FIXED_BATCHES = 4  # pre-drawn batches the bare loops and the reference cycle through
OVERHEAD_BUDGET = 0.03
SPEED_TARGET = 1.2
BUSY_WARNING = 0.15  # share of the CPUs busy before the run above which the results are suspect
LANES = [(dtype, compiled) for compiled in (False, True) for dtype in ("fp32", "bf16")]


def lane_name(dtype: str, compiled: bool) -> str:
    return f"{dtype} {'compiled' if compiled else 'eager'}"


# ----------------------------------------------------------------------------------------------------
# Configs and data


def shape_config(name: str, work_dir: Path, tokenizer: Path, amp: bool) -> TrainingConfig:
    """The TrainingConfig of one benchmark shape, writing only under `work_dir`."""
    s = SHAPES[name]
    return TrainingConfig.from_dict(dict(
        model=str(tokenizer), dataset_file=str(DATASET), text_mode="document", max_seq_len=SEQ_LEN,
        dataset_chunk_size=1024, data_cache_dir=str(work_dir / "prepared_data"), hidden_size=s.hidden_size,
        num_heads=s.num_heads, expansion=s.expansion, h_layers=s.layers, l_layers=s.layers, h_cycles=CYCLES,
        l_cycles=CYCLES, halt_max_steps=s.halt_max_steps, pos_encodings="rope", loss_type="softmax",
        batch_size=s.batch_size, optimizer="adamw", lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=0,
        amp=amp, gradient_checkpointing=False, steps=100_000, iterate=True, eval_every=0, checkpoint_every=0,
        progress=False, bundle_dir=str(work_dir / "brains"), brain_name=f"bench-{name}-{'bf16' if amp else 'fp32'}",
    ))


def train_tokenizer(root: Path) -> Path:
    """An 8192-token byte-level BPE of the Shakespeare sample (deterministic; a few seconds)."""
    from aios.tokenizers.training import train_bpe_tokenizer

    return train_bpe_tokenizer([DATASET], VOCAB_SIZE, root / f"bpe-{VOCAB_SIZE}")


def draw_fixed_batches(dataset: PreparedDataset, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(dataset.num_train, size=FIXED_BATCHES * batch_size, replace=False)
    windows = dataset.get(ids).reshape(FIXED_BATCHES, batch_size, dataset.window)
    return [shift_labels(torch.from_numpy(w.astype(np.int64))) for w in windows]


# ----------------------------------------------------------------------------------------------------
# FLOPs


def step_flops(cfg: HRMACTv1Config, batch_size: int, implementation: str) -> dict[str, int]:
    """Matmul FLOPs of one training step (one ACT segment per row, plus the q_continue target's segment).

    B rows of S tokens (N = B S), width D, SwiGLU width I, vocab V; a multiply-add is 2 FLOPs.
      block   = 2 N (4 D^2 + 3 D I) + 4 B S^2 D    projections; QK^T and AV over the full S x S (not halved
                                                   for the causal mask: the FlopCounterMode convention)
      segment = (H_cycles L_cycles L_layers + H_cycles H_layers) blocks + lm_head 2 N D V + q_head
      backward of the one-step gradient: 2 x (L_layers + H_layers blocks + lm_head + q_head)
    The q_continue target's segment: the reference runs a whole segment; aios skips lm_head and runs the last
    block of the final H update for the Q-head's position alone (its q/k/v projection still for all S).
    Elementwise work (norms, RoPE, softmax, loss, optimizer) is not counted.
    """
    B, S, D, I, V = batch_size, cfg.seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N = B * S
    block = 2 * N * (4 * D * D + 3 * D * I) + 4 * B * S * S * D
    blocks = cfg.H_cycles * cfg.L_cycles * cfg.L_layers + cfg.H_cycles * cfg.H_layers
    heads = 2 * N * D * V + 2 * B * D * 2
    segment = blocks * block + heads
    if implementation == "aios":
        last_block = 2 * N * 3 * D * D + 2 * B * (D * D + 3 * D * I) + 4 * B * S * D  # qkv for all; 1 query row
        target = (blocks - 1) * block + last_block + 2 * B * D * 2
    else:
        target = segment
    backward = 2 * ((cfg.L_layers + cfg.H_layers) * block + heads)
    return {"forward": segment + target, "backward": backward, "total": segment + target + backward}


def counted_flops(step) -> int:
    """FLOPs FlopCounterMode sees while `step()` runs, CPU attention and the oneDNN linear included."""
    aten = torch.ops.aten

    def linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:  # the mode passes shapes
        return 2 * math.prod(x_shape) * weight_shape[0]

    custom = {  # torch counts SDPA only for its CUDA kernels; the CPU kernel has the same shapes and work
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
        torch.ops.mkldnn._linear_pointwise: linear_flops,  # aios's eager no-grad float32 products
        torch.ops.aios.onednn_linear: linear_flops,  # the op around them (a mode does not see inside it)
    }
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return counter.get_total_flops()


def matmul_peaks(n: int = 2048, repeats: int = 8) -> dict[str, float]:
    """This machine's best matmul GFLOP/s at torch's thread count: float32 by torch.matmul (MKL) and by aios's
    linear (oneDNN), bf16 by torch.matmul (oneDNN)."""

    def best(fn) -> float:
        for _ in range(2):
            fn()
        fastest = min(timed(fn) for _ in range(repeats))
        return 2 * n**3 / fastest / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    results = {"fp32_mkl": best(lambda: torch.matmul(a, b)), "fp32_onednn": best(lambda: hrm.linear(a, b)),
               "bf16": best(lambda: torch.matmul(a.bfloat16(), b.bfloat16()))}
    return {**results, "fp32": max(results["fp32_mkl"], results["fp32_onednn"]), "size": n}


# ----------------------------------------------------------------------------------------------------
# The reference, imported from the user's checkout


def flash_attn_interface_module() -> types.ModuleType:
    """A stand-in for the `flash_attn_interface` package the reference imports, over torch's SDPA.

    flash_attn_func takes and returns (B, S, H, hd), like flash-attn's."""
    module = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, causal=False):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal)
        return out.transpose(1, 2).contiguous()

    module.flash_attn_func = flash_attn_func
    return module


def import_reference(directory: Path):
    """(HierarchicalReasoningModel_ACTV1, ACTLossHead) from a checkout of sapientinc/HRM."""
    if not (directory / "models" / "hrm" / "hrm_act_v1.py").is_file():
        raise SystemExit(f"error: --reference: {directory} has no models/hrm/hrm_act_v1.py; pass a checkout of "
                         f"github.com/sapientinc/HRM")
    sys.modules.setdefault("flash_attn_interface", flash_attn_interface_module())
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1  # noqa: PLC0415
    from models.losses import ACTLossHead  # noqa: PLC0415

    return HierarchicalReasoningModel_ACTV1, ACTLossHead


def reference_model(directory: Path, cfg: HRMACTv1Config, batch_size: int, dtype: str):
    model_cls, loss_head_cls = import_reference(directory)
    arch = dict(batch_size=batch_size, seq_len=cfg.seq_len, puzzle_emb_ndim=0, num_puzzle_identifiers=1,
                vocab_size=cfg.vocab_size, H_cycles=cfg.H_cycles, L_cycles=cfg.L_cycles, H_layers=cfg.H_layers,
                L_layers=cfg.L_layers, hidden_size=cfg.hidden_size, expansion=cfg.expansion,
                num_heads=cfg.num_heads, pos_encodings="rope", rope_theta=cfg.rope_theta,
                rms_norm_eps=cfg.rms_norm_eps, halt_max_steps=cfg.halt_max_steps,
                halt_exploration_prob=cfg.halt_exploration_prob,
                forward_dtype="bfloat16" if dtype == "bf16" else "float32")
    return loss_head_cls(model_cls(arch), loss_type="softmax_cross_entropy")


def reference_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rows = batch["inputs"].shape[0]
    return {**batch, "puzzle_identifiers": torch.zeros(rows, dtype=torch.int32)}


class ReferenceLoop:
    """The reference's training step as its pretrain.py `train_batch` runs it (one process, CPU)."""

    def __init__(self, model, batches: list[dict[str, torch.Tensor]], compiled: bool):
        self.model = model.train()
        self.forward = torch.compile(model, dynamic=False) if compiled else model
        self.batches = [reference_batch(b) for b in batches]
        self.rows = self.batches[0]["inputs"].shape[0]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.carry = model.initial_carry(self.batches[0])
        self.calls = 0

    def step(self) -> None:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.carry, loss, metrics, _, _ = self.forward(carry=self.carry, batch=batch, return_keys=[])
        ((1 / self.rows) * loss).backward()
        for group in self.optimizer.param_groups:
            group["lr"] = LR
        self.optimizer.step()
        self.optimizer.zero_grad()
        torch.stack([metrics[k] for k in sorted(metrics)]).cpu().numpy()  # pretrain.py's metric reduction


def reference_agreement(directory: Path, cfg: HRMACTv1Config) -> dict[str, float]:
    """Same weights in the reference and in aios (causal=False, its bidirectional mode): max |difference| of
    one segment's logits and q logits, float32. Near 1e-5 says both compute the same model."""
    torch.manual_seed(0)
    ref = reference_model(directory, cfg, batch_size=2, dtype="fp32").model
    ours = HRMACTv1(HRMACTv1Config(**{**vars(cfg), "causal": False}))
    state = {k.replace("embed_tokens.weight", "embed_tokens.embedding_weight"): v
             for k, v in ours.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    inputs = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": inputs, "labels": inputs, "puzzle_identifiers": torch.zeros(2, dtype=torch.int32)}
    with torch.no_grad():
        z = ref.inner.reset_carry(torch.ones(2, dtype=torch.bool), ref.inner.empty_carry(2))
        _, ref_logits, (ref_halt, ref_continue) = ref.inner(z, batch)
        _, _, logits, q, _ = ours.inner(z.z_H, z.z_L, inputs)
    return {"logits_max_abs_diff": float((ref_logits - logits).abs().max()),
            "logits_max_abs": float(logits.abs().max()),
            "q_max_abs_diff": float((torch.stack((ref_halt, ref_continue), -1) - q).abs().max())}


# ----------------------------------------------------------------------------------------------------
# The aios variants


class BareLoop:
    """The minimal aios training step on `model`: fixed batches, a carry of its own, a fresh optimizer."""

    def __init__(self, model: HRMACTv1, config: TrainingConfig, batches: list[dict[str, torch.Tensor]],
                 amp_dtype: torch.dtype | None):
        self.model, self.batches, self.amp_dtype = model, batches, amp_dtype
        self.grad_clip = config.grad_clip if config.grad_clip > 0 else float("inf")  # as the Trainer clips
        self.rows = batches[0]["inputs"].shape[0]
        self.optimizer = build_optimizer(model, name=config.optimizer, lr=config.lr,
                                         weight_decay=config.weight_decay, use_8bit=False,
                                         device=torch.device("cpu")).optimizer
        self.carry = model.initial_carry(batches[0])  # every row halted: the first step takes batch 0
        self.calls = 0

    def step(self) -> None:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        with autocast_context(torch.device("cpu"), self.amp_dtype):
            self.carry, outputs = self.model(self.carry, batch)
            loss, _ = act_loss(self.carry, outputs, self.model.config)
        (loss / self.rows).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def new_trainer(config: TrainingConfig, work_dir: Path, compiled: bool) -> Trainer:
    session = LocalSession(work_dir / f"checkpoints-{config.brain_name}", device=torch.device("cpu"),
                           keep_checkpoints=1, resume=False)
    trainer = Trainer(config, session)
    if compiled:  # what `if config.compile: self.model.compile_segments()` in the Trainer will do
        trainer.model.compile_segments()
    return trainer


def trainer_step(trainer: Trainer) -> None:
    if trainer.train_step() is None:
        raise RuntimeError("the training data ran out during the benchmark")


def prepared_dataset(config: TrainingConfig) -> PreparedDataset:
    """The Trainer's prepared training data (from the cache it made), without building a Trainer."""
    from aios.tokenizers import load_tokenizer

    return prepare_training_data(config, load_tokenizer(config.model))[0]


def build_variants(shape: str, work_dir: Path, tokenizer: Path, reference: Path | None,
                   lanes: list[tuple[str, bool]], only: str | None = None) -> tuple[dict, dict]:
    """{(lane, variant): step function} for one shape, and facts about it. `only` builds one variant alone."""
    steps, facts = {}, {}
    for dtype, compiled in lanes:
        lane = lane_name(dtype, compiled)
        config = shape_config(shape, work_dir, tokenizer, amp=dtype == "bf16")
        amp_dtype = torch.bfloat16 if dtype == "bf16" else None
        model_cfg = model_config_for(config, VOCAB_SIZE)
        trainer = new_trainer(config, work_dir, compiled) if only in (None, "trainer") else None
        batches = draw_fixed_batches(trainer.dataset if trainer else prepared_dataset(config), config.batch_size)
        facts.update(config=model_cfg, batch_size=config.batch_size)
        if trainer:
            steps[lane, "trainer"] = lambda trainer=trainer: trainer_step(trainer)
            facts["parameters"] = trainer.model.num_parameters()
        if only in (None, "bare"):  # on the trainer's model object when there is one
            model = trainer.model if trainer else standalone_model(model_cfg, config.seed)
            steps[lane, "bare"] = BareLoop(model, config, batches, amp_dtype).step
        if not compiled and only is None:
            model = standalone_model(HRMACTv1Config(**{**vars(model_cfg), "causal": False}), config.seed)
            steps[lane, "bare non-causal"] = BareLoop(model, config, batches, amp_dtype).step
        if reference is not None and only in (None, "reference"):
            torch.manual_seed(config.seed)
            model = reference_model(reference, model_cfg, config.batch_size, dtype)
            steps[lane, "reference"] = ReferenceLoop(model, batches, compiled).step
    return steps, facts


def standalone_model(cfg: HRMACTv1Config, seed: int) -> HRMACTv1:
    torch.manual_seed(seed)
    return HRMACTv1(cfg).train()


# ----------------------------------------------------------------------------------------------------
# Measuring


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def run_rounds(steps: dict, rounds: int) -> dict[tuple[str, str], list[float]]:
    """Each step once per round. A lane's variants run back to back, so the ratios between them come from
    neighbouring steps; the lane order rotates round by round, and the order inside a lane reverses."""
    lanes = list(dict.fromkeys(lane for lane, _ in steps))
    times = {key: [] for key in steps}
    for r in range(rounds):
        for lane in lanes[r % len(lanes):] + lanes[:r % len(lanes)]:
            keys = [key for key in steps if key[0] == lane]
            for key in keys if r % 2 == 0 else keys[::-1]:
                times[key].append(timed(steps[key]))
    return times


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def own_cpu_ticks() -> float:
    """CPU time of this process and its finished children, in clock ticks."""
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(r.ru_utime + r.ru_stime for r in own) * os.sysconf("SC_CLK_TCK")


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds`: other work on the machine skews timings."""
    busy_before, total_before = cpu_ticks()
    time.sleep(seconds)
    busy_after, total_after = cpu_ticks()
    return (busy_after - busy_before) / max(1, total_after - total_before)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess


def timing_worker(args: argparse.Namespace) -> dict:
    """Every variant of one shape in this process, warmed up, then timed in rounds."""
    work_dir, tokenizer = Path(args.work_dir), Path(args.tokenizer)
    lanes = [lane for lane in LANES if args.compile or not lane[1]]
    steps, facts = build_variants(args.shape, work_dir, tokenizer, args.reference, lanes)
    warmup = {}
    for key, step in steps.items():
        print(f"[{args.shape}] warming up {key[0]} {key[1]} ...", flush=True)
        started = time.perf_counter()
        for _ in range(WARMUP_STEPS["compiled" in key[0]]):
            step()
        warmup[key] = time.perf_counter() - started
    print(f"[{args.shape}] timing {args.steps} rounds of {len(steps)} variants ...", flush=True)
    times = run_rounds(steps, args.steps)
    cfg, batch_size = facts["config"], facts["batch_size"]
    result = {
        "times": [{"lane": lane, "variant": variant, "step_s": t, "warmup_s": warmup[lane, variant]}
                  for (lane, variant), t in times.items()],
        "parameters": facts["parameters"], "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
        "model": {k: v for k, v in vars(cfg).items()},
        "flops": {impl: step_flops(cfg, batch_size, impl) for impl in ("aios", "reference")},
        "flop_counter_trainer_fp32": counted_flops(steps[lane_name("fp32", False), "trainer"]),
        "peak_rss_mb_all_in_one_process": peak_rss_mb(),
    }
    if args.reference is not None:
        result["flop_counter_reference_fp32"] = counted_flops(steps[lane_name("fp32", False), "reference"])
        result["reference_agreement"] = reference_agreement(args.reference, cfg)
    return result


def rss_worker(args: argparse.Namespace) -> dict:
    """One eager variant alone in this process: its RSS before the first step and its peak after a few."""
    dtype, variant = args.variant.split(":")
    steps, _ = build_variants(args.shape, Path(args.work_dir), Path(args.tokenizer), args.reference,
                              [(dtype, False)], only=variant)
    (step,) = steps.values()
    setup_rss = current_rss_mb()
    for _ in range(WARMUP_STEPS[False] + 1):
        step()
    return {"setup_rss_mb": setup_rss, "peak_rss_mb": peak_rss_mb()}


def spawn(args: argparse.Namespace, work_dir: Path, tokenizer: Path, shape: str, worker: str,
          variant: str | None = None) -> dict:
    output = work_dir / f"{worker}-{(variant or 'all').replace(':', '-').replace(' ', '-')}.json"
    command = [sys.executable, __file__, "--worker", worker, "--worker-output", str(output), "--work-dir",
               str(work_dir), "--tokenizer", str(tokenizer), "--shape", shape, "--steps", str(args.steps or
               SHAPES[shape].steps)]
    command += ["--compile"] if args.compile else ["--no-compile"]
    if args.reference is not None:
        command += ["--reference", str(args.reference)]
    if variant:
        command += ["--variant", variant]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads(output.read_text())


# ----------------------------------------------------------------------------------------------------
# The benchmark


def bench_shape(shape: str, args: argparse.Namespace, peaks: dict, root: Path, tokenizer: Path) -> dict:
    work_dir = root / shape
    work_dir.mkdir()
    timing = spawn(args, work_dir, tokenizer, shape, "timing")
    rss = {}
    if args.rss:
        variants = ["trainer", "bare"] + (["reference"] if args.reference else [])
        for dtype in ("fp32", "bf16"):
            for variant in variants:
                print(f"[{shape}] peak RSS of {dtype} {variant} alone ...", flush=True)
                rss[lane_name(dtype, False), variant] = spawn(args, work_dir, tokenizer, shape, "rss",
                                                              f"{dtype}:{variant}")
    tokens = timing["batch_size"] * SEQ_LEN
    rows = []
    for entry in timing["times"]:
        lane, variant, times = entry["lane"], entry["variant"], entry["step_s"]
        median = statistics.median(times)
        flops = timing["flops"]["reference" if variant == "reference" else "aios"]["total"]
        gflops = flops / median / 1e9
        peak = peaks["bf16" if lane.startswith("bf16") else "fp32"]
        rows.append({"lane": lane, "variant": variant, "step_s_median": median, "step_s": times,
                     "warmup_s": entry["warmup_s"], "tokens_per_s": tokens / median, "gflops": gflops,
                     "percent_of_peak": 100 * gflops / peak, **rss.get((lane, variant), {})})
    by_key = {(r["lane"], r["variant"]): r for r in rows}
    comparisons = {}
    for lane in dict.fromkeys(r["lane"] for r in rows):
        entry = {}
        trainer, bare, ref = (by_key.get((lane, v)) for v in ("trainer", "bare", "reference"))
        if trainer and bare:
            entry["trainer_overhead_percent"] = 100 * (trainer["step_s_median"] / bare["step_s_median"] - 1)
            entry["trainer_overhead_percent_of_rounds"] = 100 * (statistics.median(
                t / b for t, b in zip(trainer["step_s"], bare["step_s"], strict=True)) - 1)
            entry["within_overhead_budget"] = entry["trainer_overhead_percent"] <= 100 * OVERHEAD_BUDGET
        if ref:
            for variant in ("trainer", "bare", "bare non-causal"):
                row = by_key.get((lane, variant))
                if row:
                    row["vs_reference"] = ref["step_s_median"] / row["step_s_median"]
                    entry[f"{variant}_speedup_vs_reference"] = row["vs_reference"]
                    entry[f"{variant}_speedup_vs_reference_of_rounds"] = statistics.median(
                        r / t for r, t in zip(ref["step_s"], row["step_s"], strict=True))
            if trainer:
                entry["meets_speed_target"] = trainer["vs_reference"] >= SPEED_TARGET
        comparisons[lane] = entry
    s = SHAPES[shape]
    return {
        "model": timing["model"], "parameters": timing["parameters"], "batch_size": s.batch_size,
        "seq_len": SEQ_LEN, "timed_rounds": args.steps or s.steps, "torch_threads": timing["torch_threads"],
        "flops_per_step": timing["flops"], "flop_counter_trainer_fp32": timing["flop_counter_trainer_fp32"],
        "flop_counter_reference_fp32": timing.get("flop_counter_reference_fp32"),
        "reference_agreement": timing.get("reference_agreement"),
        "peak_rss_mb_all_in_one_process": timing["peak_rss_mb_all_in_one_process"],
        "variants": rows, "comparisons": comparisons,
    }


def print_table(report: dict) -> None:
    peaks = report["matmul_peak_gflops"]
    table = Table(title=f"Training step, {report['machine']['torch_threads']} threads (matmul peak fp32 "
                        f"{peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s)")
    columns = ("shape", "lane", "variant", "step ms", "tokens/s", "vs reference", "GFLOP/s", "% peak",
               "peak RSS MiB")
    for column in columns:
        table.add_column(column, justify="left" if column in ("shape", "lane", "variant") else "right")
    for shape, result in report["shapes"].items():
        for row in result["variants"]:
            vs = row.get("vs_reference")
            table.add_row(shape, row["lane"], row["variant"], f"{1000 * row['step_s_median']:.0f}",
                          f"{row['tokens_per_s']:,.0f}", f"{vs:.2f}x" if vs else "",
                          f"{row['gflops']:.0f}", f"{row['percent_of_peak']:.0f}",
                          f"{row['peak_rss_mb']:,.0f}" if "peak_rss_mb" in row else "")
    console = Console() if sys.stdout.isatty() else Console(width=140)  # whole rows in logs and pipes
    console.print(table)
    for shape, result in report["shapes"].items():
        m = result["model"]
        console.print(f"{shape}: D {m['hidden_size']}, {m['num_heads']} heads, expansion {m['expansion']:g}, "
                      f"{m['H_layers']}+{m['L_layers']} layers, M {m['halt_max_steps']}, "
                      f"{result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']} x "
                      f"{result['seq_len']}, {result['timed_rounds']} rounds")
        flops = result["flops_per_step"]
        console.print(f"  GFLOP/step: aios {flops['aios']['total'] / 1e9:.1f} (FlopCounterMode on a trainer step: "
                      f"{result['flop_counter_trainer_fp32'] / 1e9:.1f}), reference "
                      f"{flops['reference']['total'] / 1e9:.1f}" + (
                          f" (counted: {result['flop_counter_reference_fp32'] / 1e9:.1f})"
                          if result["flop_counter_reference_fp32"] else ""))
        for lane, c in result["comparisons"].items():
            parts = []
            if "trainer_overhead_percent" in c:
                parts.append(f"trainer overhead over bare {c['trainer_overhead_percent']:+.1f}% "
                             f"({'ok' if c['within_overhead_budget'] else 'OVER'} {100 * OVERHEAD_BUDGET:.0f}%)")
            if "trainer_speedup_vs_reference" in c:
                parts.append(f"trainer {c['trainer_speedup_vs_reference']:.2f}x the reference (median of rounds "
                             f"{c['trainer_speedup_vs_reference_of_rounds']:.2f}x; target {SPEED_TARGET}x: "
                             f"{'met' if c['meets_speed_target'] else 'NOT met'})")
            console.print(f"  {lane}: " + "; ".join(parts))
        agreement = result["reference_agreement"]
        if agreement:
            console.print(f"  same weights, one segment, aios causal=False vs reference: max |d logits| "
                          f"{agreement['logits_max_abs_diff']:.1e} (of |logits| up to "
                          f"{agreement['logits_max_abs']:.1f}), max |d q| {agreement['q_max_abs_diff']:.1e}")
    machine = report["machine"]
    console.print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs; other processes used "
                  f"{machine['others_busy_during_run_percent']:.1f}% of them during the run")
    for note in report["notes"]:
        console.print(f"note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, default=None,
                        help="a checkout of github.com/sapientinc/HRM; without it the reference rows are skipped")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: " +
                        ", ".join(f"{name} {s.steps}" for name, s in SHAPES.items()) + ")")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the compiled lanes (compiling takes minutes)")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                        help="peak RSS of each eager variant alone in a fresh process")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    # Internal: one measurement in a fresh process.
    for internal in ("--worker", "--worker-output", "--work-dir", "--tokenizer", "--shape", "--variant"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        parser.error(f"--shapes: unknown shape(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SHAPES)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.reference is not None:
        args.reference = args.reference.expanduser().resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        if args.reference is not None:
            import_reference(args.reference)  # before any model is built: fails early, names the directory
        result = timing_worker(args) if args.worker == "timing" else rss_worker(args)
        Path(args.worker_output).write_text(json.dumps(result))
        return
    if args.reference is not None:
        import_reference(args.reference)
    busy = busy_fraction()
    if busy > BUSY_WARNING:
        print(f"warning: {100 * busy:.0f}% of the CPUs are busy before the benchmark starts; with torch's "
              f"threads competing for cores the numbers will be low and noisy", flush=True)
    print(f"matmul peaks, {torch.get_num_threads()} threads ...", flush=True)
    peaks = matmul_peaks()  # measured again at the end; the better of the two counts (a busy second halves it)
    notes = ["both sides use torch AdamW (lr 1e-4, betas 0.9/0.95, wd 0.1): the reference's AdamATan2 package "
             "builds for CUDA only", "both use softmax cross-entropy; the reference does not clip gradients, aios "
             "clips at 1.0", "aios trains causal LM mode, the reference is bidirectional: causal attention does "
             "less score work; 'bare non-causal' is aios at the reference's attention"]
    if args.reference is None:
        notes.insert(0, "no --reference: the reference rows are skipped (pass a checkout of "
                        "github.com/sapientinc/HRM)")
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch_version": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "cpu_model": cpu_model(),
                    "busy_before_start_percent": 100 * busy, "load_average_before": os.getloadavg()},
        "matmul_peak_gflops": peaks, "overhead_budget_percent": 100 * OVERHEAD_BUDGET,
        "speed_target": SPEED_TARGET, "reference": str(args.reference) if args.reference else None,
        "notes": notes, "shapes": {},
    }
    (busy_start, total_start), own_start = cpu_ticks(), own_cpu_ticks()
    with tempfile.TemporaryDirectory(prefix="aios-bench-") as root:
        print("training an 8192-token BPE on the Shakespeare sample ...", flush=True)
        tokenizer = train_tokenizer(Path(root))
        for shape in args.shapes:
            report["shapes"][shape] = bench_shape(shape, args, peaks, Path(root), tokenizer)
    (busy_end, total_end), own_end = cpu_ticks(), own_cpu_ticks()
    peaks_after = matmul_peaks()
    report["matmul_peak_gflops_runs"] = [dict(peaks), peaks_after]
    for key in ("fp32_mkl", "fp32_onednn", "fp32", "bf16"):
        peaks[key] = max(peaks[key], peaks_after[key])
    for result in report["shapes"].values():
        for row in result["variants"]:
            row["percent_of_peak"] = 100 * row["gflops"] / peaks["bf16" if row["lane"].startswith("bf16") else "fp32"]
    # CPU time the rest of the machine used while the benchmark ran: what it had to share the cores with.
    others = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / max(1, total_end - total_start)
    busy_after = busy_fraction()
    report["machine"].update(busy_after_percent=100 * busy_after, load_average_after=os.getloadavg(),
                             others_busy_during_run_percent=100 * others)
    if others > BUSY_WARNING / 2:
        report["notes"].append(f"other processes used {100 * others:.0f}% of the CPUs during the run: the timings "
                               f"are disturbed; run it again on an idle machine")
    if busy_after > BUSY_WARNING:
        report["notes"].append(f"{100 * busy_after:.0f}% of the CPUs were busy right after the run")
    print_table(report)
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
