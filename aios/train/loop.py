"""The worker loop: one HRM ACT v1 training run on one rank. Pure PyTorch; it never imports ray.

Whoever runs it passes a `Session` (rank, world size, device, restore, report, stop requests): the
in-process `LocalSession` here, the Ray runner on a cluster.

ACT streaming. One optimizer step runs one segment for every row of every micro-batch. A sample stays in
its row across steps until the row halts; only halted rows draw a new sample from the chunk sampler.

A step is a transaction. Nothing it does is kept until it has completed: if CUDA runs out of memory at any
point (forward, backward, unscale, clip, inside the optimizer step), the sampler, carries, RNG, gradients,
optimizer and GradScaler state are put back exactly, the micro-batch is halved (accumulation doubled, the
global batch and the sample order unchanged) and the step runs again, so the run continues bit for bit as
one that had the smaller micro-batch from that step on. With several workers every rank backs off together
(they agree on it); only an OOM inside the optimizer step cannot be retried there (the others have
updated) and stops the job with a message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aios.bundle import BrainBundle
from aios.config import TrainingConfig, field_group
from aios.data import (
    ChunkSampler,
    PreparedDataset,
    PrepareOptions,
    flags,
    prepare_dataset,
    sampler_progress,
    warn_unused_options,
)
from aios.errors import AiosError
from aios.experts import ExpertRun, expert_bundle
from aios.inference import autocast_context, evaluate_lm_sums, lm_eval_result
from aios.models.hrm_act_v1 import ACTCarry, HRMACTv1, HRMACTv1Config, act_loss, shift_labels
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint
from aios.train import checkpoint as ckpt
from aios.train.metrics import Console, MetricsLog, NullLog
from aios.train.optim import (
    OptimizerTransaction,
    Schedule,
    build_optimizer,
    optimizer_kind_hint,
    set_hyperparameters,
)
from aios.train.precision import autocast_dtype, dtype_name
from aios.train.remote import RemoteBrain
from aios.train.session import Session
from aios.train.zero import ZeroEngine

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.05  # held-out tail of the training text when no --eval-file is given
MAX_NONFINITE_STEPS = 10  # consecutive skipped steps before the run gives up
FAULT_POINTS = ("forward", "backward", "unscale", "clip", "optimizer_step")
EXPLORATION_STREAM = 0x68726D  # the exploration generator's key: [seed, EXPLORATION_STREAM, step]
_OOM = "out_of_memory"  # a step attempt that some rank could not fit in memory: retried smaller


class TrainCallbacks:
    """Hooks for tests and tools; the defaults do nothing."""

    def at(self, trainer: Trainer, point: str, micro_step: int | None) -> None:
        """Called at each point of a step where it can fail (FAULT_POINTS; `micro_step` for forward and
        backward), e.g. to inject an out-of-memory error."""

    def after_step(self, trainer: Trainer, record: dict) -> None:
        """Called after each completed optimizer step with its metrics record."""


@dataclass
class TrainResult:
    step: int
    reason: str  # steps | end_of_data | stop | already_reached
    final_eval: dict | None
    bundle: Path
    unigram_entropy: float | None = None
    trained_steps: int = 0  # optimizer steps of this attempt
    plot: Path | None = None  # training_curves.png, drawn at the end of an attempt that trained


@dataclass
class Counters:
    """How far the run is; saved in every checkpoint's state.json."""

    step: int = 0
    samples_drawn: int = 0
    sample_tokens_seen: int = 0  # tokens of the samples drawn, each sample counted once (data seen)
    segment_tokens_seen: int = 0  # tokens processed, each row counted on every segment (compute)
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0


# TrainingConfig fields that set a model config field of another name (the rest match, ignoring case).
_MODEL_FIELD_OF = {"max_seq_len": "seq_len"}


def model_config_for(config: TrainingConfig, vocab_size: int) -> HRMACTv1Config:
    """The model config of a run: every "Model" setting, by name, plus the sequence length and vocab."""
    by_lower_name = {f.name.lower(): f.name for f in dataclasses.fields(HRMACTv1Config)}
    values = {}
    for name in TrainingConfig.model_fields:
        if field_group(name) != "Model" and name not in _MODEL_FIELD_OF:
            continue
        values[_MODEL_FIELD_OF.get(name) or by_lower_name[name]] = getattr(config, name)
    return HRMACTv1Config(vocab_size=vocab_size, causal=True, **values)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    """This process's resident memory now (Linux /proc), NaN where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")


def _nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of parameters holding NaN or infinity (one reduction per tensor, one host read in all)."""
    named = list(model.named_parameters())
    finite = torch.stack([p.detach().isfinite().all() for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


@dataclass
class _SavePoint:
    """What a step changes before it completes, as it was before the step."""

    sampler: dict
    carries: list[ACTCarry]
    halted: list[np.ndarray]
    rng: dict


def prepare_training_data(cfg: TrainingConfig, tokenizer, *, progress: bool = False
                          ) -> tuple[PreparedDataset, PreparedDataset]:
    """The training data and the evaluation data of a run (the same dataset without --eval-file).

    The training data always holds out its last HOLDOUT_FRACTION, so that adding or removing --eval-file
    leaves its fingerprint, and so `--resume`, unchanged; with --eval-file evaluation reads that file
    instead (refused when it is part of the training data) and the tail goes unused.
    """
    options = PrepareOptions(max_seq_len=cfg.max_seq_len, chunk_size=cfg.dataset_chunk_size,
                             text_mode=cfg.text_mode, text_field=cfg.text_field, ascii_only=cfg.ascii_only,
                             holdout_fraction=HOLDOUT_FRACTION)
    common = dict(cache_dir=cfg.data_cache_dir, progress=progress)
    train = evaluation = prepare_dataset(cfg.dataset_file, tokenizer, cfg.model, options,
                                         flags=flags.TRAIN, **common)
    if cfg.eval_file:
        try:
            evaluation = prepare_dataset(cfg.eval_file, tokenizer, cfg.model,
                                         dataclasses.replace(options, holdout_fraction=0.0),
                                         flags=flags.TRAIN.for_source("--eval-file"), disjoint_from=train,
                                         **common)
        except AiosError as exc:
            raise AiosError(f"--eval-file: {exc}") from None
    warn_unused_options(options, [train] if evaluation is train else [train, evaluation], flags.TRAIN)
    return train, evaluation


class Trainer:
    def __init__(self, config: TrainingConfig, session: Session, callbacks: TrainCallbacks | None = None,
                 datasets: tuple[PreparedDataset, PreparedDataset] | None = None):
        """`datasets`: the (train, eval) data opened by the caller (a Ray worker reading them from run
        storage); by default they are prepared, or found prepared, in --data-cache-dir."""
        self.config = config
        self.session = session
        self.callbacks = callbacks or TrainCallbacks()
        self.rank, self.world = session.rank, session.world_size
        self.device = session.device
        self.is_main = self.rank == 0
        # Expert training (--expert-id): the base brain is read, never written; the run writes the expert's dir.
        self.expert = ExpertRun.of(config)
        self.remote = None if self.expert else RemoteBrain.of(config)  # a remote --bundle-dir: pushed at every save
        if self.expert:
            self.bundle: BrainBundle = expert_bundle(config)
        else:
            self.bundle = self.remote.local if self.remote else BrainBundle.for_run(config.bundle_dir, config.brain_name)
        self.base_eval: dict | None = None  # expert training: the base brain alone on the eval data
        self.started_at = time.time()

        random.seed(config.seed + self.rank)
        np.random.seed(config.seed + self.rank)
        torch.manual_seed(config.seed + self.rank)

        self.tokenizer = load_tokenizer(config.model)
        self.dataset, self.eval_dataset = datasets or self._prepare_data()
        if datasets is not None:  # prepared elsewhere: this node's tokenizer must be the one that prepared it
            prepared_with = self.dataset.manifest["tokenizer"].get("fingerprint")
            if prepared_with != tokenizer_fingerprint(self.tokenizer):
                raise AiosError(f"--model {config.model} on this node is not the tokenizer the data in "
                                f"{getattr(self.dataset, 'location', self.dataset.path)} was prepared with (its "
                                f"fingerprint differs): give every node the same tokenizer (a bundled one, or the "
                                f"same files in the image)")
        # Chunks read over the network: their cache counters go into every step's metrics
        self.cached = hasattr(self.dataset, "cache_counters")
        self._cache_seen = [0.0] * 4

        vocab_size = len(self.tokenizer)
        if self.dataset.vocab_size > vocab_size:
            raise AiosError(f"the prepared data in {self.dataset.path} has a vocabulary of {self.dataset.vocab_size}, "
                            f"the tokenizer --model {config.model} has {vocab_size}: delete {self.dataset.path} so "
                            f"that it is prepared again")
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = HRMACTv1(model_config_for(config, vocab_size), gradient_checkpointing=config.gradient_checkpointing,
                              use_flash_attn=config.use_flash_attn).to(self.device)
        if self.expert:  # the base's weights, frozen, and one new expert per MoE layer: all that trains
            self.expert.prepare(self.model)
        if config.compile:
            self.model.compile_segments()  # compiled on first use; eager, with a warning, where it cannot
        torch.manual_seed(config.seed + self.rank)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp_dtype = autocast_dtype(config.amp, config.amp_dtype, self.device)
        built = build_optimizer(self.model, name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                use_8bit=config.use_8bit_optimizer, device=self.device)
        self.optimizer, self.optimizer_kind = built.optimizer, built.kind
        self.schedule = Schedule(lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.steps,
                                 min_ratio=config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

        # The split this run asks for at this world size: --batch-size, and the accumulation that keeps the
        # global batch (--batch-size x --gradient-accumulation-steps x MAX workers) with this many workers.
        self.asked_split = (config.batch_size, config.accumulation_at(self.world))
        self.micro_batch, self.grad_accum = self.asked_split
        # --zero-stage: DeepSpeed takes the optimizer, the accumulation and the gradient reduction (aios/train/zero.py)
        self.zero: ZeroEngine | None = None
        self.transaction: OptimizerTransaction | None = None
        if config.zero_stage != "none":
            self.zero = ZeroEngine(self.model, self.optimizer, zero_stage=config.zero_stage,
                                   micro_batch=self.micro_batch, grad_accum=self.grad_accum, world_size=self.world,
                                   grad_clip=config.grad_clip, device=self.device)
            self.optimizer_kind = f"{self.optimizer_kind}+{config.zero_stage}"  # its state loads into ZeRO only
        else:
            self.transaction = OptimizerTransaction(self.optimizer, self.params)
        self.sampler = self._new_sampler()
        self._set_carries([self._empty_carry() for _ in range(self.grad_accum)])
        self.counters = Counters()
        self.epoch = 0  # the lowest epoch of any slot of any rank, as of the last step
        self.last_eval: dict | None = None
        self._preemption_seen = False  # a drain notice was answered (once per worker group)
        self.unigram_entropy = self.dataset.unigram_entropy() if self.is_main else None
        self.log: MetricsLog | NullLog = NullLog()
        self.console = Console(False, total=config.steps, start=0)
        self.restored_from = self.session.restore(self._load_checkpoint)

    @property
    def step(self) -> int:
        return self.counters.step

    # -- setup ------------------------------------------------------------------------------------------
    def _prepare_data(self) -> tuple[PreparedDataset, PreparedDataset]:
        return prepare_training_data(self.config, self.tokenizer, progress=self.config.progress and self.is_main)

    def _new_sampler(self) -> ChunkSampler:
        return ChunkSampler(self.dataset, seed=self.config.seed, micro_batch=self.micro_batch,
                            grad_accum=self.grad_accum, rank=self.rank, world_size=self.world,
                            iterate=self.config.iterate)

    def _empty_carry(self) -> ACTCarry:
        template = {"inputs": torch.zeros(self.micro_batch, self.config.max_seq_len, dtype=torch.long,
                                          device=self.device)}
        template["labels"] = template["inputs"].clone()
        return self.model.initial_carry(template)

    def _set_carries(self, carries: list[ACTCarry]) -> None:
        """The rows' ACT state, and on the host which rows halted (the sampler refills those): read here,
        where the device is idle anyway, so that a step does not wait for it."""
        self.carries = carries
        self.halted = [carry.halted.cpu().numpy() for carry in carries]

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    # -- resume -----------------------------------------------------------------------------------------
    def _load_checkpoint(self, directory: Path) -> None:
        """Resume from `directory` (the session picks it): refuse a checkpoint of another run with AiosError;
        raise CheckpointUnusable when its content cannot be used (the session then tries an older one)."""
        state = ckpt.read_state(directory)
        self._check_identity(directory, state)
        micro_batch, grad_accum = self._resume_split(directory, state)
        first = self.rank * micro_batch * grad_accum  # this rank's slots under its layout
        try:
            saved, unreadable = ckpt.read_checkpoint(directory, self.rank, (first, first + micro_batch * grad_accum),
                                                     self.device), None
        except ckpt.CheckpointUnusable as exc:
            saved, unreadable = None, exc
        # ZeRO: DeepSpeed's load (in _apply_checkpoint) holds collectives; a rank that could not read its files
        # must not leave the others in them: all agree first, and all give this checkpoint up together.
        if self.zero is not None and self.world > 1 and self._agree(unreadable is not None)[0] and not unreadable:
            unreadable = ckpt.CheckpointUnusable("another rank could not read its files of it")
        if unreadable is not None:
            raise unreadable
        try:
            self._apply_checkpoint(saved, micro_batch, grad_accum)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # the device is full: nothing is known about the checkpoint
        except Exception as exc:  # noqa: BLE001 - content that does not fit is treated like corruption
            if "cuda" in f"{type(exc).__name__} {exc}".lower():
                raise  # a device error, not the checkpoint's
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ckpt.CheckpointUnusable(f"{type(exc).__name__}: {reason}") from exc
        log.info("resumed from %s at step %d (micro-batch %d x %d)", self.session.describe_checkpoint(directory),
                 self.step, self.micro_batch,
                 self.grad_accum)

    def _check_identity(self, directory: Path, state: dict) -> None:
        """The checkpoint must be of this run: same model, global batch, data, seed and kind of optimizer."""
        ours = self.model.config.to_dict()
        theirs = state["model_config"]
        if theirs != ours:
            changed = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
            raise AiosError(f"checkpoint {directory} was made with a different model ({', '.join(changed)} "
                            f"differ): resume with the same model flags or use a new --brain-name")
        if state["world_size"] == self.world and state["global_batch"] != self.global_batch:
            raise AiosError(f"checkpoint {directory} used a global batch of {state['global_batch']} sequences, "
                            f"this run {self.global_batch}: keep --batch-size x --gradient-accumulation-steps "
                            f"x workers the same to resume")
        if state["dataset_fingerprint"] != self.dataset.fingerprint:
            raise AiosError(f"checkpoint {directory} trained on other data (fingerprint "
                            f"{state['dataset_fingerprint'][:12]}): resume with the same dataset and tokenizer")
        if state["seed"] != self.config.seed:
            raise AiosError(f"checkpoint {directory} was trained with --seed {state['seed']}, which fixes its data "
                            f"order: resume with --seed {state['seed']}")
        ours_expert = self.expert.identity() if self.expert else None
        if state.get("expert") != ours_expert:
            theirs = state.get("expert") or {}
            raise AiosError(f"checkpoint {directory} is not of this expert run (expert {theirs.get('expert_id')!r}, "
                            f"base sha256 {str(theirs.get('base_fingerprint'))[:12]}; this run: expert "
                            f"{self.config.expert_id!r}, base {str((ours_expert or {}).get('base_fingerprint'))[:12]}): "
                            f"resume it with the base brain it was trained on, or choose a new --expert-id")
        if state["optimizer_kind"] != self.optimizer_kind:
            theirs = state["optimizer_kind"]
            hint = optimizer_kind_hint(theirs) + (", with --zero-stage none" if self.zero and "+" not in theirs else "")
            raise AiosError(f"checkpoint {directory} holds {theirs} optimizer state, this run uses "
                            f"{self.optimizer_kind}: resume with {hint} (optimizer state does not convert)")
        if state.get("zero_stage") and state["world_size"] != self.world:
            raise AiosError(f"checkpoint {directory} holds ZeRO optimizer state sharded over {state['world_size']} "
                            f"workers, this run has {self.world}: resume it with --world-size {state['world_size']} "
                            f"(DeepSpeed's shards are per rank)")

    def _resume_split(self, directory: Path, state: dict) -> tuple[int, int]:
        """The micro-batch and accumulation to resume with. With the saved world size: the checkpoint's (an
        OOM back-off persists), unless this run asks for another split of the same global batch. With another
        world size (elastic): the checkpoint's global batch kept, at this run's --batch-size, the
        accumulation adjusted; refused when that is not a whole number of steps."""
        cfg, G = self.config, state["global_batch"]
        if state["world_size"] == self.world:
            if self.asked_split != (state["config_micro_batch"], state["config_grad_accum"]):
                return self.asked_split
            return state["micro_batch"], state["grad_accum"]
        per_rank, b = G // self.world, cfg.batch_size
        if G % self.world or per_rank % b:
            raise AiosError(f"checkpoint {directory} was saved by {state['world_size']} workers with a global batch "
                            f"of {G}: {self.world} workers x --batch-size {b} cannot keep it; resume with a world "
                            f"size dividing {G} and a --batch-size dividing {G} / workers")
        if G != cfg.global_batch:  # an elastic job's resize keeps its own global batch: nothing to say
            log.warning("resuming a %d-worker checkpoint with %d workers: %d accumulation steps of --batch-size %d "
                        "keep its global batch of %d", state["world_size"], self.world, per_rank // b, b, G)
        return b, per_rank // b

    def _apply_checkpoint(self, saved: ckpt.Checkpoint, micro_batch: int, grad_accum: int) -> None:
        """Everything from `saved`, replacing all an earlier, failed attempt may have applied."""
        cfg, state = self.config, saved.state
        if self.zero is not None:  # DeepSpeed's own files: this rank's optimizer shard and the master weights
            self.zero.load(saved.directory)
            self.zero.set_weight_decay(cfg.weight_decay)  # flags typed on resume (the lr is set every step)
        else:
            self.model.load_state_dict(saved.weights)
            self.optimizer.load_state_dict(saved.optimizer_state["optimizer"])
            set_hyperparameters(self.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)  # flags typed on resume
        if self.scaler is not None:
            self.scaler = torch.amp.GradScaler(self.device.type)
            if saved.optimizer_state.get("scaler"):
                self.scaler.load_state_dict(saved.optimizer_state["scaler"])
        # This rank's slots, regrouped into its micro-batches (slot order is rank-major: see the sampler).
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        carries = [ACTCarry.from_state_dict({k: v[m * micro_batch:(m + 1) * micro_batch]
                                             for k, v in saved.carry_rows.items()}) for m in range(grad_accum)]
        _check_carries(carries, self.micro_batch, self.grad_accum, self.carries[0])
        self.sampler = self._new_sampler()
        try:  # identity (seed, global batch, data) was checked: what is left to refuse is a malformed state
            self.sampler.load_state_dict(saved.sampler_state)
        except AiosError as exc:
            raise ValueError(str(exc)) from exc
        self._set_carries(carries)
        if saved.rng is not None:  # else saved by fewer workers: this rank keeps its seeded generators
            if self.device.type == "cuda" and "cuda" not in saved.rng:  # a checkpoint of a CPU run
                torch.cuda.manual_seed(cfg.seed + self.rank)
            ckpt.restore_rng_state(saved.rng, self.device)
        self.counters = Counters(**{f.name: state[f.name] for f in dataclasses.fields(Counters)})
        self.epoch = state["epoch"]

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> dict | str:
        """One optimizer step with OOM back-off: its metrics record, or "stop" / "end_of_data" when the ranks
        agreed not to take it (nothing consumed)."""
        point = self._save_point()
        while True:
            try:
                outcome = self._step()  # an OOM comes back as _OOM, once the failed step's frames are freed
            except torch.cuda.OutOfMemoryError:  # an allocation outside the agreed parts of the step
                if self.world > 1:
                    raise AiosError(f"out of memory on rank {self.rank} of {self.world} outside the parts of step "
                                    f"{self.step + 1} the workers can retry together; lower --batch-size or "
                                    f"--max-seq-len and resume") from None
                outcome = _OOM
            if isinstance(outcome, dict):
                return outcome
            self._roll_back(point)
            if outcome != _OOM:
                return outcome
            if self.zero is not None:  # DeepSpeed reduced gradients inside the backward passes: no exact retry
                raise AiosError(f"out of memory in step {self.step + 1} with --zero-stage {self.config.zero_stage} "
                                f"(DeepSpeed's accumulation and reduction cannot be retried at a smaller micro-batch): "
                                f"lower --batch-size (raising --gradient-accumulation-steps keeps the global batch) "
                                f"or --max-seq-len, and resume")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._back_off()
            point = self._save_point()

    def _save_point(self) -> _SavePoint:
        return _SavePoint(self.sampler.state_dict(), list(self.carries), list(self.halted),
                          ckpt.capture_rng_state(self.device))

    def _roll_back(self, point: _SavePoint) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.transaction is not None:
            self.transaction.roll_back()
        if self.scaler is not None:  # a fresh scaler with the same scale: no optimizer marked "unscaled"
            scaler = torch.amp.GradScaler(self.device.type)
            scaler.load_state_dict(self.scaler.state_dict())
            self.scaler = scaler
        self.sampler.load_state_dict(point.sampler)
        self.carries, self.halted = list(point.carries), list(point.halted)
        ckpt.restore_rng_state(point.rng, self.device)

    def _back_off(self) -> None:
        """The next smaller micro-batch that divides this one (half, for an even one), the accumulation
        raised to keep the global batch: 12 -> 6 -> 3 -> 1."""
        if self.micro_batch == 1:
            raise AiosError("out of memory at micro-batch 1: lower --max-seq-len or --hidden-size, or "
                            "enable --gradient-checkpointing and --amp") from None
        factor = next(f for f in range(2, self.micro_batch + 1) if self.micro_batch % f == 0)  # smallest prime
        self._resplit(self.micro_batch // factor, self.grad_accum * factor)
        log.warning("out of memory at step %d: retrying with micro-batch %d x %d accumulation steps "
                    "(same global batch and sample order)", self.step + 1, self.micro_batch, self.grad_accum)

    def _resplit(self, micro_batch: int, grad_accum: int) -> None:
        """Regroup this rank's rows into `grad_accum` micro-batches of `micro_batch` (same global batch).

        Rank r's row of micro-step m is slot r * R + m * b + row: the concatenated rows of its micro-steps are
        its slots in order, so regrouping them keeps every row's slot, sample and ACT state.
        """
        assert micro_batch * grad_accum == self.micro_batch * self.grad_accum
        state = self.sampler.state_dict()
        rows = [carry.state_dict() for carry in self.carries]
        every = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}  # (rows_per_rank, ...)
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self._set_carries([ACTCarry.from_state_dict({k: v[m * micro_batch:(m + 1) * micro_batch]
                                                     for k, v in every.items()}) for m in range(grad_accum)])
        self.sampler = self._new_sampler()
        self.sampler.load_state_dict(state)

    def _agree(self, *flags: bool) -> list[bool]:
        """Whether any rank raised each flag (one collective; nothing to ask on one worker)."""
        if self.world == 1:
            return list(flags)
        summed = self.session.all_reduce(torch.tensor([float(f) for f in flags], dtype=torch.float64,
                                                      device=self.device))
        return [v > 0 for v in summed.tolist()]

    def _step(self) -> dict | str:
        """Forward and backward every micro-batch, then update; state changes only at the end (commit).

        What one rank finds must be agreed by all, or the others wait forever in a collective: a stop request
        and the end of the data are agreed before any forward, an out-of-memory error after the backward passes
        (before the gradients are summed over the ranks) and again before the update (with the step's metrics,
        in one collective). Running out of memory inside the optimizer step of a multi-worker run cannot be
        retried in step (the other ranks have updated): it stops the job with a clear message."""
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        rows, drawn = self._draw_rows()
        stop, exhausted = self._agree(self.session.stop_requested(), rows is None)
        if stop:
            return "stop"
        if exhausted:
            return "end_of_data"
        accumulated = self._accumulate_gradients(rows)
        if accumulated is None:
            return _OOM
        carries, sums = accumulated
        keys = sorted(sums)
        out_of_memory, grad_norm = False, None
        try:
            grad_norm = self._unscale_and_clip() if self.zero is None else None  # DeepSpeed's, in its step
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            sums = {k: torch.zeros_like(v) for k, v in sums.items()}
        header = [float(out_of_memory), float(drawn)] + [0.0] * self.world  # + each rank's lowest epoch
        header[2 + self.rank] = float(self.sampler.epochs.min())
        if self.cached:  # + this step's chunk cache hits, downloads, bytes, stall seconds (every rank the same)
            counters = self.dataset.cache_counters()
            header += [now - seen for now, seen in zip(counters, self._cache_seen, strict=True)]
            self._cache_seen = counters
        local = torch.cat([torch.tensor(header, dtype=torch.float64, device=self.device),
                           torch.stack([sums[k] for k in keys])])
        reduced = self.session.all_reduce(local) if self.world > 1 else local  # the step's one metrics collective
        norm = (grad_norm.double().reshape(1) if grad_norm is not None
                else torch.zeros(1, dtype=torch.float64, device=self.device))
        flat = torch.cat([reduced.to(norm.device), norm]).tolist()  # one host read for every metric of the step
        if flat[0] > 0:
            return _OOM
        drawn = int(flat[1])
        self.epoch = int(min(flat[2:2 + self.world]))  # the lowest epoch of any slot of any rank
        rest = flat[2 + self.world:]
        cache = None
        if self.cached:
            hits, downloads, size, stall = rest[:4]
            cache = {"hits": int(hits), "downloads": int(downloads), "bytes": int(size), "stall_s": round(stall, 4)}
            rest = rest[4:]
        values = dict(zip([*keys, "grad_norm"], rest, strict=True))
        loss_finite = math.isfinite(values["loss"])
        finite = loss_finite and math.isfinite(values["grad_norm"])
        lr = self.schedule(self.step)
        counted_nonfinite = not (loss_finite if self.scaler is not None else finite)  # the scaler skips overflow
        try:
            if self.zero is not None:  # DeepSpeed skips a step whose gradient norm is not finite, on every rank
                applied, values["grad_norm"] = self._update_zero(lr)
                finite = loss_finite and applied
                counted_nonfinite = not finite
            else:
                self._update(lr, finite)
            self._commit(carries, drawn, counted_nonfinite)
        except torch.cuda.OutOfMemoryError:
            if self.world == 1:
                return _OOM
            raise AiosError(f"out of memory in the optimizer step on rank {self.rank} of {self.world} (step "
                            f"{self.step + 1}): the other workers have updated, so it cannot be retried; lower "
                            f"--batch-size or --max-seq-len, or use --use-8bit-optimizer, and resume") from None
        record = self._step_record(values, lr, drawn, skipped=not finite, elapsed=time.perf_counter() - started)
        if cache is not None:
            record["data_cache"] = cache  # summed over the ranks
        return record

    def _draw_rows(self) -> tuple[list[np.ndarray] | None, int]:
        """Every micro-step's input rows: a new sample for each halted row (zeros elsewhere: the row keeps its
        sample); None when some slot has finished the data (iterate off)."""
        rows, drawn = [], 0
        for m in range(self.grad_accum):
            halted = self.halted[m]
            tokens = np.zeros((self.micro_batch, self.dataset.window), dtype=np.int64)
            if halted.any():
                fresh, exhausted = self.sampler.draw(self.sampler.slots_for(m)[halted])
                if exhausted:
                    return None, 0
                tokens[halted] = fresh
                drawn += int(halted.sum())
            rows.append(tokens)
        return rows, drawn

    def _exploration(self) -> list[torch.Tensor] | None:
        """ACT exploration for this step: each slot's minimum segment count (0: none), drawn per global slot
        from (seed, step), so that it does not depend on the world size or the batch split."""
        cfg = self.model.config
        if cfg.halt_max_steps <= 1:
            return None
        rng = np.random.default_rng([self.config.seed, EXPLORATION_STREAM, self.step])
        G = self.global_batch
        explore = rng.random(G) < cfg.halt_exploration_prob
        minimum = np.where(explore, rng.integers(2, cfg.halt_max_steps + 1, G), 0).astype(np.int32)
        return [torch.from_numpy(minimum[self.sampler.slots_for(m)]).to(self.device) for m in range(self.grad_accum)]

    def _accumulate_gradients(self, rows: list[np.ndarray]) -> tuple[list[ACTCarry], dict[str, torch.Tensor]] | None:
        """Forward and backward of every micro-step, then the gradients summed over the ranks; None when some
        rank ran out of memory (every rank then retries with a smaller micro-batch).

        The ranks agree before the one all-reduce of the gradients, so that an out-of-memory error anywhere in
        the forward or backward passes is retried exactly on every rank. (torch's DistributedDataParallel
        would start reducing inside the last backward pass, before anything can be agreed; a rank that then
        abandons its step leaves DDP expecting a reduction the others never start.)"""
        sums: dict[str, torch.Tensor] = {}
        new_carries = []
        out_of_memory = False
        try:
            exploration = self._exploration()
            for m, carry in enumerate(self.carries):
                self.callbacks.at(self, "forward", m)
                batch = shift_labels(torch.from_numpy(rows[m]).to(self.device, non_blocking=True))
                if exploration is not None:
                    batch["min_halt_steps"] = exploration[m]
                with autocast_context(self.device, self.amp_dtype):
                    carry, outputs = self.model(carry, batch)
                    loss, metrics = act_loss(carry, outputs, self.model.config)
                self.callbacks.at(self, "backward", m)
                if self.zero is not None:  # DeepSpeed divides by the accumulation and averages over the ranks
                    self.zero.backward(loss, last=m == self.grad_accum - 1)
                else:
                    scaled = loss / self.global_batch  # summed over rows and ranks; one division per step
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                new_carries.append(carry)
                for key, value in (("loss", loss.detach()), *metrics.items()):
                    sums[key] = sums[key] + value.double() if key in sums else value.double()
        except torch.cuda.OutOfMemoryError:
            if self.zero is not None and self.world > 1:  # the others are in DeepSpeed's reductions: no agreement
                raise AiosError(f"out of memory on rank {self.rank} of {self.world} in step {self.step + 1} with "
                                f"--zero-stage {self.config.zero_stage} (DeepSpeed reduces gradients inside the "
                                f"backward passes, so the step cannot be retried): lower --batch-size (raising "
                                f"--gradient-accumulation-steps keeps the global batch) or --max-seq-len, and "
                                f"resume") from None
            out_of_memory = True
        if self._agree(out_of_memory)[0]:
            return None
        if self.world > 1 and self.zero is None:
            self.session.sum_gradients(self.params)
        return new_carries, sums

    def _unscale_and_clip(self) -> torch.Tensor:
        if self.scaler is not None:
            self.callbacks.at(self, "unscale", None)
            self.scaler.unscale_(self.optimizer)
        self.callbacks.at(self, "clip", None)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params, clip)  # the norm before clipping

    def _update(self, lr: float, finite: bool) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.callbacks.at(self, "optimizer_step", None)
        self.transaction.begin()
        if self.scaler is not None:  # the scaler skips steps whose scaled gradients overflowed, by design
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()

    def _update_zero(self, lr: float) -> tuple[bool, float]:
        self.callbacks.at(self, "optimizer_step", None)
        return self.zero.step(lr)

    def _commit(self, carries: list[ACTCarry], drawn: int, nonfinite: bool) -> None:
        """Keep the step. What can still fail (an allocation) comes first; then the counters move."""
        if nonfinite:  # the rows' state may be poisoned: start them on fresh samples
            carries = [dataclasses.replace(carry, halted=torch.ones_like(carry.halted)) for carry in carries]
        if self.transaction is not None:
            self.transaction.commit()
        counters = self.counters
        counters.step += 1
        counters.samples_drawn += drawn
        counters.sample_tokens_seen += drawn * self.config.max_seq_len
        counters.segment_tokens_seen += self.global_batch * self.config.max_seq_len
        self._set_carries(carries)
        if not nonfinite:
            counters.nonfinite_in_a_row = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        counters.nonfinite_in_a_row += 1
        counters.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", counters.step,
                    counters.nonfinite_in_a_row)
        if counters.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
            raise AiosError(f"the loss was non-finite for {MAX_NONFINITE_STEPS} steps in a row: lower --lr, "
                            f"use --grad-clip 1.0, or --no-amp")

    def _step_record(self, values: dict[str, float], lr: float, drawn: int, *, skipped: bool,
                     elapsed: float) -> dict:
        rows, halted_rows, T = values["rows"], values["count"], self.config.max_seq_len
        segment_tokens = self.global_batch * T
        record = {
            "event": "step", "step": self.step, "epoch": self.epoch, "lr": lr,
            "loss": values["loss"] / rows, "lm_loss": values["lm_loss"] / rows,
            "q_halt_loss": values["q_halt_loss"] / rows, "q_continue_loss": values["q_continue_loss"] / rows,
            "aux_loss": values["aux_loss"] / (self.grad_accum * self.world), "grad_norm": values["grad_norm"],
            "token_accuracy": values["token_accuracy_all"] / rows, "halted": int(halted_rows),
            "segments": values["steps"] / halted_rows if halted_rows else None,
            "halted_accuracy": values["accuracy"] / halted_rows if halted_rows else None,
            "samples_drawn": drawn, "sample_tokens": drawn * T, "segment_tokens": segment_tokens,
            "sample_tokens_seen": self.counters.sample_tokens_seen,
            "segment_tokens_seen": self.counters.segment_tokens_seen,
            "tokens_per_s": segment_tokens / elapsed, "step_time_s": elapsed, "skipped": skipped,
            "nonfinite_total": self.counters.nonfinite_total, "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum, "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if self.device.type == "cuda":
            record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return record

    # -- evaluation, checkpoints, bundle ------------------------------------------------------------------
    def eval_batches(self):
        """The first --eval-batches x --batch-size sequences of the eval file (all of it is held out) or of the
        training data's tail, in batches of at most the micro-batch (smaller after an OOM back-off: the same
        sequences, so the same evaluation)."""
        data = self.eval_dataset
        start = data.num_train if data is self.dataset else 0
        stop = min(start + self.config.eval_batches * self.config.batch_size, data.num_sequences)
        yield from data.sequential_batches(min(self.config.batch_size, self.micro_batch), start=start, stop=stop)

    def evaluate(self) -> dict:
        """The eval batches shared out over the ranks (batch i on rank i mod W), their sums reduced. Expert
        training also records the base brain alone on the same batches (once: the base does not change)."""
        result = self._evaluate_model()
        self.last_eval = {"step": self.step, **result}
        record = {"event": "eval", "step": self.step, **result}
        if self.expert:
            if self.base_eval is None:
                with self.model.added_experts_off():
                    self.base_eval = self._evaluate_model()
            record["base_loss"] = self.base_eval["loss"]
        self.log.write(record)
        if self.is_main:
            self.console.eval(self.step, result)
        return result

    def _evaluate_model(self) -> dict:
        mine = (batch for i, batch in enumerate(self.eval_batches()) if i % self.world == self.rank)
        sums = evaluate_lm_sums(self.model, mine, self.device, self.amp_dtype)
        if self.zero is not None and self.zero.stage == 3:
            self._match_zero3_forwards()
        if self.world > 1:
            keys = sorted(sums)
            reduced = self.session.all_reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64,
                                                           device=self.device)).tolist()
            sums = dict(zip(keys, reduced, strict=True))
        return lm_eval_result(sums, self.model.config.halt_max_steps)

    def _match_zero3_forwards(self) -> None:
        """ZeRO-3 may gather a layer's partitioned weights (a collective) in any forward, depending on what it
        still holds from the last one: a rank that evaluated one batch fewer than the others (batch i goes to rank
        i mod W) runs one more, on the first batch, and drops it, so that every rank runs as many forwards."""
        batches = list(self.eval_batches())
        if len(batches[self.rank::self.world]) < -(-len(batches) // self.world):
            evaluate_lm_sums(self.model, batches[:1], self.device, self.amp_dtype)

    def _expert_manifest(self) -> dict:
        """expert.json: the base, the data, and the last eval of the base alone vs base + expert."""
        cfg, last, base = self.config, self.last_eval, self.base_eval
        metrics = None
        if last is not None and base is not None:
            metrics = {"eval_step": last["step"], "eval_tokens": last["tokens"],
                       "eval_loss_base": base["loss"], "eval_loss_with_expert": last["loss"],
                       "eval_perplexity_base": base["perplexity"], "eval_perplexity_with_expert": last["perplexity"],
                       "eval_token_accuracy_base": base["token_accuracy"],
                       "eval_token_accuracy_with_expert": last["token_accuracy"]}
        return self.expert.manifest(
            self.model, steps=self.step,
            dataset={"source": cfg.dataset_file, "fingerprint": self.dataset.fingerprint},
            eval={"source": cfg.eval_file or "held-out tail of the training data",
                  "fingerprint": self.eval_dataset.fingerprint},
            metrics=metrics)

    def save(self, last_metrics: dict) -> Path | None:
        """A checkpoint of this step, then the bundle. Weights that became non-finite are never saved: the
        run stops and the last good checkpoint and bundle stay as they are. (ZeRO-3: every rank gathers the
        weights it partitions around what reads them: a collective.)"""
        with self._full_weights():
            bad = _nonfinite_weights(self.model)
        if bad:
            raise AiosError(f"the weights became non-finite by step {self.step} ({bad[0]}{' and others' if bad[1:] else ''}"
                            f"): nothing was saved, the bundle keeps its last good state; resume with a lower --lr")
        path = self.save_checkpoint(last_metrics)
        with self._full_weights():
            self.write_bundle(last_metrics, path)
        self.log.write({"event": "checkpoint", "step": self.step, "path": self.session.describe_checkpoint(path)})
        self.log.sync()
        self._push()
        return path

    def _push(self) -> None:
        """Rank 0: the bundle, as now, as the remote bundle's next version (a remote --bundle-dir only)."""
        if self.remote is not None and self.is_main:
            record = self.remote.push()
            self.log.write({"event": "push", "step": self.step, "to": self.remote.describe(),
                            "version": record["version"], "uploaded_bytes": record["uploaded"]})

    def _full_weights(self):
        """A context in which the model holds all its weights (ZeRO-3 partitions them; otherwise it does)."""
        return self.zero.full_weights() if self.zero else contextlib.nullcontext()

    def save_checkpoint(self, metrics: dict) -> Path | None:
        staged = self.session.staging_dir(self.step)
        optimizer_state = state = None  # shared files: written by rank 0 only
        if self.is_main:
            optimizer_state = None if self.zero else {"optimizer": self.optimizer.state_dict(),
                                                      "scaler": self.scaler.state_dict() if self.scaler else None}
            state = {**dataclasses.asdict(self.counters), "world_size": self.world, "micro_batch": self.micro_batch,
                     "grad_accum": self.grad_accum, "config_micro_batch": self.asked_split[0],
                     "config_grad_accum": self.asked_split[1], "global_batch": self.global_batch,
                     "seed": self.config.seed, "optimizer_kind": self.optimizer_kind,
                     "config_hash": self.config.config_hash(), "model_config": self.model.config.to_dict(),
                     "dataset_fingerprint": self.dataset.fingerprint, "epoch": self.epoch}
            if self.expert:
                state["expert"] = self.expert.identity()
            if self.zero:
                state["zero_stage"] = self.config.zero_stage
        with self._full_weights():
            ckpt.write_checkpoint_files(staged, rank=self.rank, model=self.model if self.is_main else None,
                                        optimizer_state=optimizer_state, rng_state=ckpt.capture_rng_state(self.device),
                                        carries=self.carries, sampler_state=self.sampler.state_dict(), state=state)
        if self.zero:  # every rank its optimizer shard (a collective), flushed before the seal
            ckpt.sync_files(staged, self.zero.save(staged))
        return self.session.report({"step": self.step, **metrics}, staged)  # sealed once every rank has written

    def write_bundle(self, last_metrics: dict | None, checkpoint: Path | None = None) -> None:
        """The bundle, from rank 0; its chunk tracker from every rank's sampler state in `checkpoint`."""
        if not self.is_main:
            return
        bundle, cfg = self.bundle, self.config
        if self.expert:  # the added experts alone; the tokenizer is the base's
            bundle.write_expert(self.model, self._expert_manifest())
        else:
            bundle.write_model(self.model)
            bundle.write_tokenizer(self.tokenizer)
        bundle.write_training_args(cfg)
        states = ([json.loads((checkpoint / f"sampler-rank{r}.json").read_text()) for r in range(self.world)]
                  if checkpoint is not None else [self.sampler.state_dict()])
        bundle.write_tracker(sampler_progress(self.dataset, self.config.seed, states))
        bundle.update_metadata(
            created=self.started_at, steps=self.step, samples_drawn=self.counters.samples_drawn,
            sample_tokens_seen=self.counters.sample_tokens_seen,
            segment_tokens_seen=self.counters.segment_tokens_seen, autocast=dtype_name(self.amp_dtype),
            tokenizer={"name": cfg.model, "fingerprint": tokenizer_fingerprint(self.tokenizer)},
            datasets={"train": {"source": cfg.dataset_file, "fingerprint": self.dataset.fingerprint},
                      "eval": {"source": cfg.eval_file or "held-out tail of the training data",
                               "fingerprint": self.eval_dataset.fingerprint}},
            parameters=self.model.num_parameters(), last_metrics=last_metrics, last_eval=self.last_eval,
            unigram_entropy=self.unigram_entropy,
            run={**self.session.run_info(), **({"run_name": cfg.run_name} if cfg.run_name else {})},
        )

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        start = self.step
        self.session.enter_loop()  # from here a stop request is graceful (and recorded), not an interruption
        if self.is_main:
            self.log = MetricsLog(Path(cfg.log_file) if cfg.log_file else self.bundle.metrics_path,
                                  resume_step=start, sink=self.session.metrics_sink(cfg.brain_name, cfg.run_name))
        self.console = Console(cfg.progress and self.is_main, total=cfg.steps, start=start)
        self.log.write({"event": "start", "step": start, "brain": cfg.brain_name,
                        "resumed_from": self.session.describe_checkpoint(self.restored_from) if self.restored_from else "",
                        "parameters": self.model.num_parameters(), "device": str(self.device),
                        "autocast": dtype_name(self.amp_dtype), "unigram_entropy": self.unigram_entropy,
                        "global_batch": self.global_batch, "train_sequences": self.dataset.num_train,
                        "eval_sequences": (self.dataset.num_holdout if self.eval_dataset is self.dataset
                                           else self.eval_dataset.num_sequences)})
        reason, last, saved_at, evaluated_at = "steps", None, None, None
        try:
            with self.console:
                while self.step < cfg.steps:
                    record = self.train_step()  # a stop request is agreed by the ranks inside it
                    if isinstance(record, str):
                        reason = record
                        break
                    last = record
                    self.log.write(last)
                    self.console.step(last)
                    self.callbacks.after_step(self, last)
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self.evaluate()
                        evaluated_at = self.step
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save(last)
                        saved_at = self.step
                    if self._preempted(saved_at):
                        self.save(last)  # just in time: the restart on the nodes left resumes from here
                        saved_at = self.step
            if reason == "stop":
                self.log.write({"event": "stop", "step": self.step,
                            "reason": self.session.stop_reason() or "a stop request seen by another worker"})
            plot = None
            if self.step > start:  # an attempt that trained nothing leaves the bundle as it was
                if evaluated_at != self.step:
                    self.evaluate()
                if saved_at != self.step:
                    self.save(last)
                elif evaluated_at != self.step and self.is_main:  # saved before this final eval: record it
                    self.bundle.update_metadata(last_eval=self.last_eval)
                    if self.expert:
                        self.bundle.write_expert(self.model, self._expert_manifest())
                plot = self._plot()
            self.log.write({"event": "end", "step": self.step, "reason": reason, "eval": self.last_eval,
                            "sample_tokens_seen": self.counters.sample_tokens_seen,
                            "segment_tokens_seen": self.counters.segment_tokens_seen})
            if self.step > start:  # the plot and the end record too
                self.log.sync()
                self._push()
        finally:
            self.log.close()
        return TrainResult(step=self.step, reason=reason, final_eval=self.last_eval, bundle=self.bundle.root,
                           unigram_entropy=self.unigram_entropy, trained_steps=self.step - start, plot=plot)

    def _preempted(self, saved_at: int | None) -> bool:
        """Every --preemption-check-every steps all ranks ask the session whether a node of the job is being
        drained; the first notice of this worker group is answered with a checkpoint (unless this step has one),
        and training goes on until the node goes."""
        every = self.config.preemption_check_every
        if not every or self.step % every or self.step >= self.config.steps or self._preemption_seen:
            return False
        notice = self.session.preemption_notice()
        if notice is None:
            return False
        self._preemption_seen = True
        if self.is_main:  # every rank got the same notice
            log.warning("preemption: %s; saving a checkpoint at step %d", notice, self.step)
        self.log.write({"event": "preemption", "step": self.step, "notice": notice})
        return saved_at != self.step

    def _plot(self) -> Path | None:
        """training_curves.png in the bundle; a plot that cannot be drawn is worth a warning, not the run."""
        if not isinstance(self.log, MetricsLog):
            return None
        from aios.bundle.plot import plot_training_curves

        self.log.file.flush()
        try:
            return plot_training_curves(self.bundle.root, metrics_path=self.log.path)
        except Exception as exc:  # noqa: BLE001 - the weights and checkpoints are saved; the picture is extra
            log.warning("could not draw the training curves (%s: %s); `aios brains plot %s` tries again",
                        type(exc).__name__, exc, self.bundle.name)
            return None


def _check_carries(carries: list[ACTCarry], micro_batch: int, grad_accum: int, like: ACTCarry) -> None:
    """A checkpoint's carries must have the layout its state.json claims and this model's shapes."""
    if len(carries) != grad_accum:
        raise ValueError(f"{len(carries)} carries for {grad_accum} micro-steps")
    expected_state = like.state_dict()
    for carry in carries:
        if carry.state_dict().keys() != expected_state.keys():
            raise ValueError(f"a carry holds {sorted(carry.state_dict())}, not {sorted(expected_state)}")
        for name, value in carry.state_dict().items():
            expected = expected_state[name]
            if value.shape[1:] != expected.shape[1:] or value.shape[0] != micro_batch or value.dtype != expected.dtype:
                raise ValueError(f"carry {name} has shape {tuple(value.shape)} {value.dtype}")


def train_worker(config: TrainingConfig, session: Session, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """The per-worker entry point (the Ray runner calls this on every worker)."""
    return Trainer(config, session, callbacks).run()
