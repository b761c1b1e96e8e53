"""The worker loop: one HRM ACT v1 training run on one rank. Pure PyTorch; it never imports ray.

Whoever runs it passes a `Session` (rank, world size, device, restore, report, stop_requested): the
in-process `LocalSession` here, the Ray runner on a cluster.

ACT streaming. One optimizer step runs one segment for every row of every micro-batch. A sample stays in
its row across steps until the row halts; only halted rows draw a new sample from the chunk sampler.
"""

from __future__ import annotations

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
from aios.data import ChunkSampler, PreparedDataset, prepare_dataset
from aios.errors import AiosError
from aios.inference import autocast_context, evaluate_lm
from aios.models.hrm_act_v1 import ACTCarry, HRMACTv1, HRMACTv1Config, act_loss, shift_labels
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint
from aios.train import checkpoint as ckpt
from aios.train.optim import Schedule, build_optimizer, optimizer_kind_hint, set_hyperparameters
from aios.train.precision import autocast_dtype
from aios.train.session import Session

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.05  # held-out tail of the training text when no --eval-file is given
MAX_NONFINITE_STEPS = 10  # consecutive skipped steps before the run gives up


class TrainCallbacks:
    """Hooks for tests and tools; the defaults do nothing."""

    def before_micro_step(self, trainer: Trainer, micro_step: int) -> None:
        """Called before each micro-batch forward (e.g. to inject a fault)."""

    def after_step(self, trainer: Trainer, record: dict) -> None:
        """Called after each completed optimizer step with its metrics record."""


@dataclass
class TrainResult:
    step: int
    reason: str  # steps | end_of_data | stop
    final_eval: dict | None
    bundle: Path
    unigram_entropy: float | None = None


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


class MetricsLog:
    """Append-only JSONL; one record per line, flushed as written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        self.file.close()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Trainer:
    def __init__(self, config: TrainingConfig, session: Session, callbacks: TrainCallbacks | None = None):
        self.config = config
        self.session = session
        self.callbacks = callbacks or TrainCallbacks()
        self.rank, self.world = session.rank, session.world_size
        self.device = session.device
        self.is_main = self.rank == 0
        self.bundle = BrainBundle.for_run(config.bundle_dir, config.brain_name)

        random.seed(config.seed + self.rank)
        np.random.seed(config.seed + self.rank)
        torch.manual_seed(config.seed + self.rank)

        self.tokenizer = load_tokenizer(config.model)
        self.dataset, self.eval_dataset = self._prepare_data()

        vocab_size = len(self.tokenizer)
        if self.dataset.vocab_size > vocab_size:
            raise AiosError(f"prepared data has vocab {self.dataset.vocab_size} > tokenizer {vocab_size}: "
                            f"delete {self.dataset.path} and rerun")
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = HRMACTv1(model_config_for(config, vocab_size), gradient_checkpointing=config.gradient_checkpointing,
                              use_flash_attn=config.use_flash_attn).to(self.device)
        torch.manual_seed(config.seed + self.rank)
        self.model.train()
        self.amp_dtype = autocast_dtype(config.amp, config.amp_dtype, self.device)
        built = build_optimizer(self.model, name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                use_8bit=config.use_8bit_optimizer, device=self.device)
        self.optimizer, self.optimizer_kind = built.optimizer, built.kind
        self.schedule = Schedule(lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.steps,
                                 min_ratio=config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.micro_batch = config.batch_size
        self.grad_accum = config.gradient_accumulation_steps
        self.sampler = self._new_sampler()
        self.carries = [self._empty_carry() for _ in range(self.grad_accum)]
        self.step = 0
        self.tokens_seen = 0
        self.samples_drawn = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_eval: dict | None = None
        self.unigram_entropy = self.dataset.unigram_entropy() if self.is_main else None
        self.restored_from = self._restore()

    # -- setup ------------------------------------------------------------------------------------------
    def _prepare_data(self) -> tuple[PreparedDataset, PreparedDataset]:
        """The training data and the evaluation data (the same dataset without --eval-file).

        The training data always holds out its last HOLDOUT_FRACTION, so that adding or removing --eval-file
        leaves its fingerprint, and so `--resume`, unchanged; with --eval-file evaluation reads that file
        instead (refused when it is part of the training data) and the tail goes unused.
        """
        from aios.data import PrepareOptions, flags, warn_unused_options

        cfg = self.config
        options = PrepareOptions(max_seq_len=cfg.max_seq_len, chunk_size=cfg.dataset_chunk_size,
                                 text_mode=cfg.text_mode, text_field=cfg.text_field, ascii_only=cfg.ascii_only,
                                 holdout_fraction=HOLDOUT_FRACTION)
        common = dict(cache_dir=cfg.data_cache_dir, progress=cfg.progress and self.is_main)
        train = evaluation = prepare_dataset(cfg.dataset_file, self.tokenizer, cfg.model, options,
                                             flags=flags.TRAIN, **common)
        if cfg.eval_file:
            try:
                evaluation = prepare_dataset(cfg.eval_file, self.tokenizer, cfg.model,
                                             dataclasses.replace(options, holdout_fraction=0.0),
                                             flags=flags.TRAIN.for_source("--eval-file"), disjoint_from=train,
                                             **common)
            except AiosError as exc:
                raise AiosError(f"--eval-file: {exc}") from None
        warn_unused_options(options, [train] if evaluation is train else [train, evaluation], flags.TRAIN)
        return train, evaluation

    def _new_sampler(self) -> ChunkSampler:
        return ChunkSampler(self.dataset, seed=self.config.seed, micro_batch=self.micro_batch,
                            grad_accum=self.grad_accum, rank=self.rank, world_size=self.world,
                            iterate=self.config.iterate)

    def _empty_carry(self) -> ACTCarry:
        template = {"inputs": torch.zeros(self.micro_batch, self.config.max_seq_len, dtype=torch.long,
                                          device=self.device)}
        template["labels"] = template["inputs"].clone()
        return self.model.initial_carry(template)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _restore(self) -> Path | None:
        directory = self.session.restore()
        if directory is None:
            return None
        cfg = self.config
        state = ckpt.load_state(directory)
        saved_model = state["model_config"]
        if saved_model != self.model.config.to_dict():
            changed = sorted(k for k in saved_model if saved_model.get(k) != self.model.config.to_dict().get(k))
            raise AiosError(f"checkpoint {directory} was made with a different model ({', '.join(changed)} "
                            f"differ): resume with the same model flags or use a new --brain-name")
        if state["global_batch"] != self.global_batch:
            raise AiosError(f"checkpoint {directory} used a global batch of {state['global_batch']} sequences, "
                            f"this run {self.global_batch}: keep --batch-size x --gradient-accumulation-steps "
                            f"x workers the same to resume")
        if state["dataset_fingerprint"] != self.dataset.fingerprint:
            raise AiosError(f"checkpoint {directory} trained on other data (fingerprint "
                            f"{state['dataset_fingerprint'][:12]}): resume with the same dataset and tokenizer")
        if state["optimizer_kind"] != self.optimizer_kind:
            raise AiosError(f"checkpoint {directory} holds {state['optimizer_kind']} optimizer state, this run "
                            f"uses {self.optimizer_kind}: resume with {optimizer_kind_hint(state['optimizer_kind'])} "
                            f"(optimizer state does not convert)")
        self.model.load_state_dict(ckpt.load_model_weights(directory, self.device))
        opt = ckpt.load_optimizer_state(directory)
        self.optimizer.load_state_dict(opt["optimizer"])
        set_hyperparameters(self.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)  # flags typed on resume
        if self.scaler is not None and opt.get("scaler"):
            self.scaler.load_state_dict(opt["scaler"])
        rng, carries, sampler_state = ckpt.load_rank_files(directory, self.rank, self.device)
        # The checkpoint's batch split, unless this run asks for a different one (same global batch): an OOM
        # back-off of the earlier run persists until then.
        asked = (cfg.batch_size, cfg.gradient_accumulation_steps)
        saved = (state["micro_batch"], state["grad_accum"])
        self.micro_batch, self.grad_accum = saved
        self.sampler = self._new_sampler()
        self.sampler.load_state_dict(sampler_state)
        self.carries = carries
        if asked != (state["config_micro_batch"], state["config_grad_accum"]) and asked != saved:
            self._resplit(*asked)
        ckpt.restore_rng_state(rng)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.samples_drawn = state["samples_drawn"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.nonfinite_total = state["nonfinite_total"]
        log.info("resumed from %s at step %d (micro-batch %d x %d)", directory, self.step, self.micro_batch,
                 self.grad_accum)
        return directory

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step with OOM back-off; None at the end of the data (nothing consumed)."""
        sampler_state = self.sampler.state_dict()
        carries = list(self.carries)
        rng = ckpt.capture_rng_state()

        def roll_back() -> None:
            self.optimizer.zero_grad(set_to_none=True)
            self.carries = carries
            self.sampler.load_state_dict(sampler_state)
            ckpt.restore_rng_state(rng)

        while True:
            try:
                record = self._step_once()
            except torch.cuda.OutOfMemoryError:
                roll_back()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro_batch == 1:
                    raise AiosError("out of memory at micro-batch 1: lower --max-seq-len or --hidden-size, or "
                                    "enable --gradient-checkpointing and --amp") from None
                if self.micro_batch % 2:
                    raise AiosError(f"out of memory at micro-batch {self.micro_batch}: it is odd, so it cannot be "
                                    f"halved keeping the global batch; use an even or smaller --batch-size") from None
                self._resplit(self.micro_batch // 2, self.grad_accum * 2)
                log.warning("out of memory at step %d: retrying with micro-batch %d x %d accumulation steps "
                            "(same global batch and sample order)", self.step + 1, self.micro_batch, self.grad_accum)
                continue
            if record is None:  # the data ran out part-way through the step: it never happened
                roll_back()
            return record

    def _resplit(self, micro_batch: int, grad_accum: int) -> None:
        """Regroup this rank's rows into `grad_accum` micro-batches of `micro_batch` (same global batch).

        With one worker, slot s = m * b + row: the concatenated rows of all micro-steps are the slots in
        order, so regrouping them keeps every row's slot, sample and ACT state.
        """
        if self.world != 1:
            raise AiosError("changing the micro-batch split needs a single worker; keep --batch-size and "
                            "--gradient-accumulation-steps as they were")
        assert micro_batch * grad_accum == self.micro_batch * self.grad_accum
        state = self.sampler.state_dict()
        rows = [carry.state_dict() for carry in self.carries]
        every = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}  # (rows_per_rank, ...)
        self.carries = [ACTCarry.from_state_dict({k: v[m * micro_batch:(m + 1) * micro_batch]
                                                  for k, v in every.items()}) for m in range(grad_accum)]
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.sampler = self._new_sampler()
        self.sampler.load_state_dict(state)

    def _step_once(self) -> dict | None:
        cfg, model = self.config, self.model
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        new_carries, drawn = [], 0
        rows_per_rank = self.micro_batch * self.grad_accum
        for m, carry in enumerate(self.carries):
            self.callbacks.before_micro_step(self, m)
            halted = carry.halted.cpu().numpy()
            tokens = np.zeros((self.micro_batch, self.dataset.window), dtype=np.int64)
            if halted.any():
                fresh, exhausted = self.sampler.draw(self.sampler.slots_for(m)[halted])
                if exhausted:
                    return None
                tokens[halted] = fresh
                drawn += int(halted.sum())
            batch = shift_labels(torch.from_numpy(tokens).to(self.device))
            with autocast_context(self.device, self.amp_dtype):
                carry, outputs = model(carry, batch)
                loss, metrics = act_loss(carry, outputs, model.config)
            scaled = loss / rows_per_rank  # summed over rows; one division for the whole step
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            new_carries.append(carry)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        self.carries = new_carries
        self.samples_drawn += drawn
        loss_finite = math.isfinite(sums["loss"])
        finite = loss_finite and math.isfinite(grad_norm)
        if self.scaler is not None:  # the scaler skips steps whose scaled gradients overflowed, by design
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if loss_finite if self.scaler is not None else finite:
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            for carry in self.carries:  # the rows' state may be poisoned: start them on fresh samples
                carry.halted = torch.ones_like(carry.halted)
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)",
                        self.step + 1, self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
                raise AiosError(f"the loss was non-finite for {MAX_NONFINITE_STEPS} steps in a row: lower --lr, "
                                f"use --grad-clip 1.0, or --no-amp")

        elapsed = time.perf_counter() - started
        step_tokens = rows_per_rank * cfg.max_seq_len * self.world
        self.tokens_seen += step_tokens
        rows, halted_rows = sums["rows"], sums["count"]
        record = {
            "event": "step", "step": self.step + 1, "epoch": int(self.sampler.epochs.min()), "lr": lr,
            "loss": sums["loss"] / rows, "lm_loss": sums["lm_loss"] / rows,
            "q_halt_loss": sums["q_halt_loss"] / rows, "q_continue_loss": sums["q_continue_loss"] / rows,
            "aux_loss": sums["aux_loss"] / self.grad_accum, "grad_norm": _finite_or_none(grad_norm),
            "token_accuracy": sums["token_accuracy_all"] / rows, "halted": int(halted_rows),
            "segments": sums["steps"] / halted_rows if halted_rows else None,
            "halted_accuracy": sums["accuracy"] / halted_rows if halted_rows else None,
            "samples_drawn": drawn, "tokens": step_tokens, "tokens_seen": self.tokens_seen,
            "tokens_per_s": step_tokens / elapsed, "step_time_s": elapsed, "skipped": not finite,
            "nonfinite_total": self.nonfinite_total, "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum, "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if not math.isfinite(record["loss"]):
            record["loss"] = None
        if self.device.type == "cuda":
            record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return record

    # -- evaluation, checkpoints, bundle ------------------------------------------------------------------
    def eval_batches(self):
        """--eval-batches batches of the eval file (all of it is held out) or of the training data's tail."""
        size, limit = self.config.batch_size, self.config.eval_batches
        if self.eval_dataset is self.dataset:
            yield from self.dataset.holdout_batches(size, limit)
            return
        yield from self.eval_dataset.sequential_batches(size, limit)

    def evaluate(self) -> dict:
        batches = self.eval_batches()
        result = evaluate_lm(self.model, batches, self.device, self.amp_dtype)
        self.last_eval = {"step": self.step, **result}
        return result

    def save_checkpoint(self, metrics: dict) -> Path | None:
        staged = self.session.staging_dir(self.step)
        optimizer_state = state = None  # shared files: written by rank 0 only
        if self.is_main:
            optimizer_state = {"optimizer": self.optimizer.state_dict(),
                               "scaler": self.scaler.state_dict() if self.scaler else None}
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "samples_drawn": self.samples_drawn,
                     "world_size": self.world, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                     "config_micro_batch": self.config.batch_size,
                     "config_grad_accum": self.config.gradient_accumulation_steps,
                     "optimizer_kind": self.optimizer_kind,
                     "global_batch": self.global_batch, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                     "nonfinite_total": self.nonfinite_total, "config_hash": self.config.config_hash(),
                     "model_config": self.model.config.to_dict(), "dataset_fingerprint": self.dataset.fingerprint,
                     "epoch": int(self.sampler.epochs.min())}
        ckpt.write_checkpoint_files(staged, rank=self.rank, model=self.model if self.is_main else None,
                                    optimizer_state=optimizer_state, carries=self.carries,
                                    sampler_state=self.sampler.state_dict(), state=state)
        if self.is_main:
            ckpt.seal_checkpoint(staged)
        return self.session.report({"step": self.step, **metrics}, staged)

    def write_bundle(self, last_metrics: dict | None) -> None:
        if not self.is_main:
            return
        self.bundle.write_model(self.model)
        self.bundle.write_tracker(self.sampler.progress())
        self.bundle.update_metadata(
            steps=self.step, tokens_seen=self.tokens_seen, samples_drawn=self.samples_drawn,
            tokenizer={"name": self.config.model, "fingerprint": tokenizer_fingerprint(self.tokenizer)},
            datasets={"train": {"source": self.config.dataset_file, "fingerprint": self.dataset.fingerprint},
                      "eval": {"source": self.config.eval_file or "held-out tail of the training data",
                               "fingerprint": self.eval_dataset.fingerprint}},
            parameters=self.model.num_parameters(), last_metrics=last_metrics, last_eval=self.last_eval,
            unigram_entropy=self.unigram_entropy,
        )

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        metrics_log = MetricsLog(Path(cfg.log_file) if cfg.log_file else self.bundle.metrics_path) \
            if self.is_main else None
        if self.is_main:
            self.bundle.write_tokenizer(self.tokenizer)
            self.bundle.write_training_args(cfg)
            metrics_log.write({"event": "start", "step": self.step, "resumed_from": str(self.restored_from or ""),
                               "parameters": self.model.num_parameters(), "device": str(self.device),
                               "unigram_entropy": self.unigram_entropy,
                               "global_batch": self.global_batch, "train_sequences": self.dataset.num_train,
                               "eval_sequences": (self.dataset.num_holdout if self.eval_dataset is self.dataset
                                                  else self.eval_dataset.num_sequences)})
        reason, last, last_ckpt_step, last_eval_step = "steps", None, None, None
        progress = _Progress(cfg.progress and self.is_main, total=cfg.steps, start=self.step)
        try:
            with progress:
                while self.step < cfg.steps:
                    if self.session.stop_requested():
                        reason = "stop"
                        break
                    record = self.train_step()
                    if record is None:
                        reason = "end_of_data"
                        break
                    self.step += 1
                    last = record
                    if metrics_log:
                        metrics_log.write(record)
                    progress.update(record)
                    self.callbacks.after_step(self, record)
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        result = self.evaluate()
                        last_eval_step = self.step
                        if metrics_log:
                            metrics_log.write({"event": "eval", "step": self.step, **result})
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        path = self.save_checkpoint(record)
                        self.write_bundle(record)
                        last_ckpt_step = self.step
                        if metrics_log:
                            metrics_log.write({"event": "checkpoint", "step": self.step, "path": str(path)})
            if reason == "stop" and metrics_log:
                metrics_log.write({"event": "stop", "step": self.step, "reason": self.session.stop_reason()})
            if last_eval_step != self.step:
                result = self.evaluate()
                if metrics_log:
                    metrics_log.write({"event": "eval", "step": self.step, **result})
            if last_ckpt_step != self.step:
                path = self.save_checkpoint(last or {"step": self.step})
                if metrics_log:
                    metrics_log.write({"event": "checkpoint", "step": self.step, "path": str(path)})
            self.write_bundle(last)
            if metrics_log:
                metrics_log.write({"event": "end", "step": self.step, "reason": reason,
                                   "eval": self.last_eval, "tokens_seen": self.tokens_seen})
        finally:
            if metrics_log:
                metrics_log.close()
        return TrainResult(step=self.step, reason=reason, final_eval=self.last_eval, bundle=self.bundle.root,
                           unigram_entropy=self.unigram_entropy)


class _Progress:
    """A rich progress bar with the latest loss and throughput, or nothing."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, record: dict) -> None:
        if self.enabled:
            loss = record["loss"]
            info = f"loss {loss:.3f}" if loss is not None else "loss nan"
            self.bar.update(self.task, completed=record["step"],
                            info=f"{info}  {record['tokens_per_s']:.0f} tok/s  lr {record['lr']:.2e}")


def train_worker(config: TrainingConfig, session: Session, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """The per-worker entry point (the Ray runner calls this on every worker)."""
    return Trainer(config, session, callbacks).run()
