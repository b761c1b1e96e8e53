"""`TrainingConfig`: every training parameter, in one place.

One list of pydantic fields drives everything: validation, the JSON saved next to a run
(`training_args.json`), YAML presets (`config/train/*.yaml`) and the `aios hrm-hf train-actv1` flags
(generated in `aios/cli/options.py`). Each field carries its help text and its `--help` group, so adding
a parameter means adding one field here and nothing else.

Validation errors are rendered as one line that names the CLI flag and the fix
(`format_validation_error`); the loaders (`from_dict`, `from_json`, `load_json`, `load_yaml`) raise
`AiosError` with that line. Path checks (does `--dataset-file` exist?) can be switched off with the
pydantic validation context `{"check_paths": False}`, for configs saved on another machine.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from aios.errors import AiosError
from aios.paths import (  # HIDDEN: not listed
    DEFAULT_BUNDLE_DIR,
    DEFAULT_DATA_CACHE_DIR,
    DEFAULT_EXPERTS_DIR,
    HIDDEN_PREFIX,
)

# The `--help` panels, in the order they are shown (and the order of fields in the class).
GROUPS = ("Data", "Model", "Training", "Memory", "Distributed", "Storage", "Bundle")

# Error type of the checks written in this module: their message is already the whole one-line text.
_SETTING_ERROR = "aios_setting"

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME_LENGTH = 100
MAX_WORKERS = 1024  # --world-size: more is a typo (and the range check would take forever)


def setting(default: Any, help: str, group: str, **constraints: Any) -> Any:
    """A TrainingConfig field: its default, `--help` text, `--help` group and pydantic constraints."""
    assert group in GROUPS, f"unknown group {group!r}"
    return Field(default, description=help, json_schema_extra={"group": group}, **constraints)


def flag_name(field_name: str) -> str:
    """The CLI flag of a field: `hidden_size` -> `--hidden-size`."""
    return "--" + field_name.replace("_", "-")


def negative_flag_name(field_name: str) -> str:
    """The off switch of a boolean field: `amp` -> `--no-amp`."""
    return "--no-" + field_name.replace("_", "-")


def _setting_error(message: str, field: str | None = None) -> PydanticCustomError:
    """A check's error; `field` names the setting to blame when the check spans several (loc is empty)."""
    # Braces in user input must not be read as template placeholders, so the text goes in the context.
    return PydanticCustomError(_SETTING_ERROR, "{message}", {"message": message, "field": field})


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _path_is_missing(path: str) -> bool:
    """True when nothing is at `path`; a glob pattern counts as missing when it matches nothing."""
    if _is_glob(path):
        return not glob.glob(path, recursive=True)
    return not os.path.exists(path)


def _checks_paths(info: ValidationInfo) -> bool:
    return not (isinstance(info.context, dict) and info.context.get("check_paths", True) is False)


class TrainingConfig(BaseModel):
    """Everything one `train-actv1` run needs. Immutable: derive changed copies with `replace`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- Data ---------------------------------------------------------------------------------------
    model: str = setting(
        "gpt2", "Tokenizer: a local tokenizer directory, a cached Hugging Face id, or gpt2.", "Data", min_length=1
    )
    dataset_file: str | None = setting(
        None, "Training text: a .txt/.jsonl/.csv file, a directory of them, or a glob; or s3://BUCKET/KEY (a file, "
        "or a prefix of them), downloaded once into --data-cache-dir.", "Data"
    )
    ascii_only: bool = setting(
        False, "Drop samples (lines, records, or whole documents in document mode) with non-ASCII characters.",
        "Data")
    text_mode: Literal["lines", "document"] = setting(
        "lines", "For .txt files: each non-blank line is a sample, or the whole file is one document.", "Data"
    )
    text_field: str = setting("text", "Field of each .jsonl record / column of a .csv that holds the text.",
                              "Data", min_length=1)
    eval_file: str | None = setting(None, "Held-out text for evaluation (same formats as --dataset-file).",
                                       "Data")
    eval_batches: int = setting(10, "Batches per evaluation.", "Data", gt=0)
    eval_every: int = setting(0, "Evaluate every N steps; 0 = only at the end.", "Data", ge=0)
    max_seq_len: int = setting(128, "Tokens per training sequence.", "Data", gt=0)
    dataset_chunk_size: int = setting(4000, "Sequences per prepared data chunk.", "Data", gt=0)
    data_cache_dir: str = setting(DEFAULT_DATA_CACHE_DIR, "Where tokenized data chunks are cached.", "Data",
                                  min_length=1)

    # ---- Model (HRM ACT v1, see docs/HRM_ACTV1.md) ----------------------------------------------------
    h_layers: int = setting(2, "Blocks in the high-level (H) module.", "Model", gt=0)
    l_layers: int = setting(2, "Blocks in the low-level (L) module.", "Model", gt=0)
    hidden_size: int = setting(512, "Model width D; must be a multiple of --num-heads.", "Model", gt=0)
    expansion: float = setting(2.0, "SwiGLU width factor.", "Model", gt=0)
    num_heads: int = setting(8, "Attention heads.", "Model", gt=0)
    h_cycles: int = setting(2, "H recurrences per segment.", "Model", gt=0)
    l_cycles: int = setting(2, "L recurrences per H cycle.", "Model", gt=0)
    window_size: int | None = setting(
        None, "Attend to the N most recent tokens only; unset or 0 = full causal attention.", "Model", ge=0
    )
    pos_encodings: Literal["rope", "learned"] = setting("rope", "Position encoding.", "Model")
    halt_max_steps: int = setting(8, "Most ACT segments per sequence.", "Model", gt=0)
    halt_exploration_prob: float = setting(
        0.1, "Chance of a random minimum segment count while training (0..1).", "Model", ge=0, le=1
    )
    loss_type: Literal["softmax", "stablemax"] = setting("softmax", "Token cross-entropy flavour.", "Model")
    use_moe: bool = setting(False, "Mixture-of-experts feed-forward layers.", "Model")
    num_experts: int = setting(4, "Experts per MoE layer (with --use-moe).", "Model", gt=0)
    num_experts_per_tok: int = setting(2, "Experts each token is routed to (with --use-moe).", "Model", gt=0)
    moe_capacity_factor: float = setting(1.25, "Expert capacity factor (with --use-moe).", "Model", gt=0)
    moe_aux_loss_coef: float = setting(0.01, "Load-balancing loss weight (with --use-moe).", "Model", ge=0)

    # ---- Training -------------------------------------------------------------------------------------
    steps: int = setting(200, "Optimizer steps.", "Training", gt=0)
    batch_size: int = setting(8, "Sequences per micro-batch (per worker).", "Training", gt=0)
    lr: float = setting(1e-4, "Peak learning rate.", "Training", gt=0)
    min_lr_ratio: float = setting(0.1, "Cosine schedule floor as a fraction of --lr (0..1).", "Training",
                                  ge=0, le=1)
    warmup_steps: int = setting(10, "Linear warmup steps.", "Training", ge=0)
    weight_decay: float = setting(0.1, "Decoupled weight decay.", "Training", ge=0)
    grad_clip: float = setting(1.0, "Clip the gradient norm to this; 0 = off.", "Training", ge=0)
    optimizer: Literal["adamw", "adam-atan2"] = setting("adamw", "Optimizer.", "Training")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.", "Training", gt=0)
    iterate: bool = setting(False, "At the end of the data start a new epoch (new shuffle) instead of stopping; "
                            "training still ends at --steps or the stop file.", "Training")
    stop_file: str | None = setting(None, "Stop cleanly (with a checkpoint) when this file appears.",
                                       "Training")
    resume: bool = setting(False, "Continue from the newest checkpoint of the brain bundle.", "Training")
    seed: int = setting(1337, "Random seed (weights, data order, halting exploration).", "Training", ge=0)
    log_file: str | None = setting(None, "Metrics JSONL file; default: metrics.jsonl in the bundle.",
                                      "Training")
    checkpoint_every: int = setting(100, "Save a checkpoint every N steps; 0 = only at the end.", "Training",
                                    ge=0)
    keep_checkpoints: int = setting(3, "Newest checkpoints kept.", "Training", gt=0)
    progress: bool = setting(True, "Show a progress bar.", "Training")

    # ---- Memory ---------------------------------------------------------------------------------------
    gradient_checkpointing: bool = setting(
        False, "Recompute each block's activations in backward: about 30% less training memory at the 27M shape "
        "for about 1.35x the step time (bench/memory.py).", "Memory")
    use_flash_attn: bool = setting(False, "Use FlashAttention kernels when installed (CUDA).", "Memory")
    amp: bool | None = setting(
        None, "Mixed-precision autocast; unset = auto: bf16 where the GPU or CPU computes it natively, else "
        "float32. --no-amp forces float32.", "Memory")
    amp_dtype: Literal["bf16", "fp16"] = setting(
        "bf16", "Autocast dtype with --amp: bf16 (CPU and CUDA) or fp16 with a GradScaler (CUDA only).", "Memory"
    )
    use_8bit_optimizer: bool = setting(False, "8-bit AdamW states (bitsandbytes; CUDA or CPU): 2 bytes of optimizer state a parameter instead of 8.", "Memory")
    compile: bool = setting(
        False, "torch.compile each ACT segment (the reference's default); falls back to eager, loudly, where it "
        "cannot compile.", "Memory")

    # ---- Distributed ----------------------------------------------------------------------------------
    ddp: bool = setting(False, "Data-parallel training over several workers (implied by --world-size N > 1; "
                        "accepted for the original tool's command lines).", "Distributed")
    cuda_ids: str | None = setting(
        None, "GPUs to use, comma-separated (e.g. 0,1): the GPUs of the embedded Ray cluster, one per worker (with "
        "--launcher local: the one it trains on).", "Distributed")
    world_size: str | None = setting(
        None, "Ray Train workers: N (data-parallel when more than one), or MIN-MAX for an elastic job that Ray "
        "runs with as many workers as the cluster has room for, resized as nodes come and go (the global batch "
        "stays --batch-size x --gradient-accumulation-steps x MAX).", "Distributed")
    zero_stage: Literal["none", "zero1", "zero2", "zero3"] = setting(
        "none", "DeepSpeed ZeRO inside the Ray workers: zero1 shards the optimizer state over the workers, zero2 "
        "also the gradients, zero3 also the weights (settings in config/deepspeed/<stage>.json).", "Distributed"
    )
    expert_id: str | None = setting(
        None, "Expert training: add one expert to every MoE layer of --base-brain (frozen) and train only it and "
        "its router row on --dataset-file, into <experts-dir>/<expert-id>/ (attach it with --experts on "
        "generate/eval).", "Distributed")
    base_brain: str | None = setting(
        None, "With --expert-id: the trained MoE brain (--use-moe) the expert extends, by name under --bundle-dir "
        "or a bundle directory; its model settings and tokenizer are the expert's.", "Distributed", min_length=1)
    parallel_independent: bool = setting(False, "Train independent model copies in parallel.", "Distributed")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "Where to train; auto = cuda when available.",
                                                     "Distributed")
    launcher: Literal["local", "ray"] = setting(
        "ray", "ray = a Ray Train job (TorchTrainer) on the cluster of --ray-address, or on an embedded local "
        "Ray cluster; local = one worker in this process (debugging).", "Distributed")
    ray_address: str | None = setting(
        None, "Ray cluster to run on with --launcher ray (e.g. ray://head:10001 or auto); default: $RAY_ADDRESS, "
        "else an embedded local cluster.", "Distributed", min_length=1)
    cpus_per_worker: int | None = setting(
        None, "With --launcher ray: CPUs (and torch threads) of each worker; default: the node's CPUs shared out "
        "over the workers.", "Distributed", gt=0)
    max_failures: int = setting(
        0, "With --launcher ray: worker failures (an exception, a killed process) Ray recovers from by "
        "restarting the workers from the newest checkpoint.", "Distributed", ge=0)
    preemption_check_every: int = setting(
        10, "With --launcher ray: every N steps the workers ask Ray whether a node of theirs is being drained "
        "(a spot reclaim, a scale-down) and then save a checkpoint at once; 0 = never ask.", "Distributed", ge=0)

    # ---- Storage / Bundle -----------------------------------------------------------------------------
    bundle_dir: str = setting(DEFAULT_BUNDLE_DIR, "Directory that holds brain bundles: local, or s3://BUCKET/PREFIX "
                              "(the run trains in a local copy, pushed there at every checkpoint and at the end).",
                              "Storage", min_length=1)
    storage_path: str | None = setting(
        None, "Where the run's checkpoints and Ray's run directory live: a local directory (e.g. one every node "
        "mounts) or s3://BUCKET/PREFIX, as <storage-path>/<brain-name>/checkpoints/; default: the bundle's "
        "checkpoints/.", "Storage", min_length=1)
    local_bundle_dir: str = setting(
        DEFAULT_BUNDLE_DIR, "With an s3:// --bundle-dir: the local bundle directory whose .remote/ holds the copy "
        "the run trains in (the copy `generate --brain s3://...` opens too).", "Storage", min_length=1)
    s3_endpoint_url: str | None = setting(
        None, "Endpoint of an S3-compatible service (MinIO, Ceph, R2) for the s3:// locations; default: "
        "$AWS_ENDPOINT_URL, else AWS. Credentials: the standard AWS variables, profile or instance role.", "Storage",
        min_length=1)
    experts_dir: str = setting(DEFAULT_EXPERTS_DIR, "Directory that holds experts (--expert-id): "
                               "<experts-dir>/<expert-id>/.", "Storage", min_length=1)
    brain_name: str = setting("default", "Bundle name: <bundle-dir>/<brain-name>/ (letters, digits, . _ -; "
                              "not starting with . or -).", "Bundle")
    run_name: str | None = setting(
        None, "Name of this training run, kept in the bundle: running the same command again with the same "
        "--run-name continues it from its newest checkpoint (as --resume would), e.g. after the driver was "
        "killed or a cluster retried the job.", "Bundle")

    # ---- field checks ---------------------------------------------------------------------------------
    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalar(cls, value: Any, info: ValidationInfo) -> Any:
        """Presets and saved configs get no silent coercion: `steps: true` is not 1, `amp: 1` is not true,
        and no number may be NaN or infinite (an `--lr inf` run would save NaN weights)."""
        flag = flag_name(info.field_name)
        if info.field_name == "world_size" and isinstance(value, (int, bool)):
            if isinstance(value, bool):
                raise _setting_error(f"--world-size must be N or MIN-MAX, got {value!r}; pass e.g. --world-size 2")
            value = str(value)  # `world_size: 2` in a preset or an older training_args.json
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if value is None or not kinds:
            return value
        if "float" in kinds:
            number = value
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text; it is still the number meant
                try:
                    number = float(value)
                except ValueError:
                    raise _setting_error(f"{flag} must be a number, got {value!r}; pass e.g. {flag}=0.5") from None
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise _setting_error(f"{flag} must be a number, got {value!r}; pass e.g. {flag}=0.5")
            try:
                finite = math.isfinite(number)
            except OverflowError:  # an integer beyond any float
                finite = False
            if not finite:
                raise _setting_error(f"{flag} must be a finite number, got {value!r}; pass e.g. {flag}=0.5")
            return number
        if "int" in kinds and (isinstance(value, bool) or not isinstance(value, int)):
            raise _setting_error(f"{flag} must be a whole number, got {value!r}; pass e.g. {flag}=4")
        if "bool" in kinds and not isinstance(value, bool):
            raise _setting_error(f"{flag} must be true or false, got {value!r}; write true or false")
        if "str" in kinds and not isinstance(value, str):
            raise _setting_error(f"{flag} must be text, got {value!r}; quote the value")
        return value

    @field_validator("dataset_file", "eval_file")
    @classmethod
    def _data_path_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        flag = flag_name(info.field_name)
        if value is None:
            return value
        if value == "":
            raise _setting_error(f"{flag} is empty; pass a .txt/.jsonl/.csv file, a directory or a glob")
        if _checks_paths(info) and not value.startswith("s3://") and _path_is_missing(value):
            what = "glob" if _is_glob(value) else "file"
            matches = " matches nothing" if what == "glob" else " does not exist"
            raise _setting_error(
                f"{flag}: {what} {value!r}{matches}; pass an existing .txt/.jsonl/.csv file, directory or glob"
            )
        return value

    @field_validator("run_name")
    @classmethod
    def _run_name_is_plain(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", value):
            raise _setting_error(f"--run-name {value!r} is not a plain name: use up to 128 letters, digits, '.', "
                                 f"'_' and '-', not starting with '.' or '-', e.g. --run-name nightly-1")
        return value

    @field_validator("world_size")
    @classmethod
    def _world_size_is_n_or_a_range(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
        if not match or low < 1 or high < low or high > MAX_WORKERS:
            raise _setting_error(f"--world-size {value!r} is not a number of workers or a range of them: pass N "
                                 f"(e.g. --world-size 2) or MIN-MAX with 1 <= MIN <= MAX <= {MAX_WORKERS} (e.g. "
                                 f"--world-size 1-4)")
        return str(low) if low == high else f"{low}-{high}"  # canonical, so that equal configs hash equal

    @property
    def min_workers(self) -> int:
        """The fewest Ray Train workers the job runs with (--world-size N or MIN-MAX; default 1)."""
        return int((self.world_size or "1").split("-")[0])

    @property
    def max_workers(self) -> int:
        """The most workers (N, or MAX of a range): the global batch is counted at this size."""
        return int((self.world_size or "1").split("-")[-1])

    @property
    def elastic(self) -> bool:
        """--world-size MIN-MAX with MIN < MAX: Ray picks the size, and changes it as the cluster does."""
        return self.min_workers < self.max_workers

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: --batch-size x --gradient-accumulation-steps x MAX workers."""
        return self.batch_size * self.gradient_accumulation_steps * self.max_workers

    def accumulation_at(self, workers: int) -> int:
        """The accumulation that keeps the global batch with `workers` workers (checked to be whole)."""
        return self.global_batch // (self.batch_size * workers)

    @field_validator("brain_name", "expert_id")
    @classmethod
    def _brain_name_is_one_safe_path_component(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The name becomes a directory under --bundle-dir (--experts-dir): it must not climb out of it or be
        # an option.
        if value is None:
            return value
        flag = flag_name(info.field_name)
        example = "my-brain" if info.field_name == "brain_name" else "legal-v1"
        fix = f"use letters, digits, '.', '_' and '-', e.g. {flag} {example}"
        if value == "":
            raise _setting_error(f"{flag} is empty; {fix}")
        if value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise _setting_error(f"{flag} {value!r} is not a single directory name; {fix}")
        if value.startswith("-"):
            raise _setting_error(f"{flag} {value!r} starts with '-'; {fix}")
        if value.startswith(HIDDEN_PREFIX):
            listing = "`aios brains list`" if info.field_name == "brain_name" else "listings"
            raise _setting_error(f"{flag} {value!r} starts with '{HIDDEN_PREFIX}', which would hide it from "
                                 f"{listing}; drop the leading '{HIDDEN_PREFIX}', e.g. {flag} {example}")
        if len(value) > _MAX_NAME_LENGTH:
            raise _setting_error(f"{flag} is {len(value)} characters long; use at most {_MAX_NAME_LENGTH}")
        if not _SAFE_NAME.fullmatch(value):
            raise _setting_error(f"{flag} {value!r} has characters that are not allowed; {fix}")
        return value

    @field_validator("cuda_ids")
    @classmethod
    def _cuda_ids_are_integers(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = [part.strip() for part in value.split(",")]
        if not all(part.isdigit() for part in parts):
            raise _setting_error(f"--cuda-ids {value!r} is not a comma-separated list of GPU numbers; pass e.g. 0,1")
        if len(set(parts)) != len(parts):
            raise _setting_error(f"--cuda-ids {value!r} names a GPU twice; list each GPU once, e.g. 0,1")
        return ",".join(str(int(part)) for part in parts)  # canonical "0,1" so equal configs hash equal

    # ---- cross-field checks ---------------------------------------------------------------------------
    @model_validator(mode="after")
    def _fields_agree(self) -> TrainingConfig:
        heads = self.num_heads
        if self.hidden_size % heads:
            raise _setting_error(
                f"--hidden-size: {self.hidden_size} is not divisible by --num-heads {heads}; "
                f"pick a multiple of {heads}",
                "hidden_size",
            )
        head_dim = self.hidden_size // heads
        if self.pos_encodings == "rope" and head_dim % 2:
            raise _setting_error(
                f"--hidden-size: head size {self.hidden_size}/{heads} = {head_dim} is odd but rope needs it "
                f"even; pick a multiple of {2 * heads} or pass --pos-encodings learned",
                "hidden_size",
            )
        if self.num_experts_per_tok > self.num_experts:
            raise _setting_error(
                f"--num-experts-per-tok: {self.num_experts_per_tok} is more than --num-experts "
                f"{self.num_experts}; pass at most {self.num_experts}",
                "num_experts_per_tok",
            )
        if not self.use_moe:
            # No silently ignored options: MoE knobs only mean something with --use-moe.
            fields = type(self).model_fields
            for name in ("num_experts", "num_experts_per_tok", "moe_capacity_factor", "moe_aux_loss_coef"):
                if getattr(self, name) != fields[name].default:
                    raise _setting_error(
                        f"{flag_name(name)} has no effect without --use-moe; add --use-moe or drop {flag_name(name)}",
                        name,
                    )
        if self.expert_id is None:
            for name in ("base_brain", "experts_dir"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise _setting_error(f"{flag_name(name)} has no effect without --expert-id; add --expert-id ID "
                                         f"(expert training) or drop {flag_name(name)}", name)
        elif self.base_brain is None:
            raise _setting_error(f"--expert-id {self.expert_id} needs --base-brain NAME: the trained MoE brain "
                                 f"(--use-moe) the expert extends; add --base-brain", "base_brain")
        if self.launcher != "ray":
            for name in ("ray_address", "max_failures", "cpus_per_worker", "preemption_check_every"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise _setting_error(f"{flag_name(name)} has no effect with --launcher {self.launcher}; add "
                                         f"--launcher ray or drop {flag_name(name)}", name)
            if self.max_workers > 1:
                raise _setting_error(f"--world-size {self.world_size} needs --launcher ray (the in-process launcher "
                                     f"runs one worker); add --launcher ray", "world_size")
        if self.s3_endpoint_url is not None and not any(
                str(value or "").startswith("s3://")
                for value in (self.bundle_dir, self.storage_path, self.dataset_file, self.eval_file)):
            raise _setting_error("--s3-endpoint-url has no effect without an s3:// location; pass --bundle-dir, "
                                 "--storage-path or --dataset-file s3://BUCKET/... or drop --s3-endpoint-url",
                                 "s3_endpoint_url")
        if self.local_bundle_dir != DEFAULT_BUNDLE_DIR and not self.bundle_dir.startswith("s3://"):
            raise _setting_error("--local-bundle-dir has no effect with a local --bundle-dir (the run trains there); "
                                 "drop --local-bundle-dir", "local_bundle_dir")
        if self.elastic:
            self._check_elastic_batch()
        if self.cuda_ids is not None:
            self._check_cuda_ids()

        if self.amp is False and self.amp_dtype != type(self).model_fields["amp_dtype"].default:
            raise _setting_error("--amp-dtype has no effect with --no-amp; add --amp or drop --amp-dtype", "amp_dtype")
        return self

    def _check_cuda_ids(self) -> None:
        """--cuda-ids: the GPUs this run may use, one per worker (the in-process launcher: its one GPU)."""
        ids = self.cuda_ids.split(",")
        if self.device == "cpu":
            raise _setting_error("--cuda-ids has no effect with --device cpu; drop --cuda-ids or use --device cuda",
                                 "cuda_ids")
        if self.launcher == "local" and len(ids) > 1:
            raise _setting_error(f"--cuda-ids {self.cuda_ids}: the in-process launcher trains on one GPU; pass one "
                                 f"(e.g. --cuda-ids {ids[0]}) or use --launcher ray with --world-size "
                                 f"{len(ids)}", "cuda_ids")
        if self.launcher == "ray" and self.ray_address is not None:
            raise _setting_error("--cuda-ids chooses the GPUs of the embedded local Ray cluster; a cluster you attach "
                                 "to with --ray-address has its own (set CUDA_VISIBLE_DEVICES where its nodes "
                                 "start): drop --cuda-ids or --ray-address", "cuda_ids")
        if self.launcher == "ray" and self.max_workers > len(ids):
            raise _setting_error(f"--world-size {self.world_size} needs {self.max_workers} GPUs (one per worker) but "
                                 f"--cuda-ids {self.cuda_ids} lists {len(ids)}: list more GPUs or lower --world-size",
                                 "cuda_ids")

    def _check_elastic_batch(self) -> None:
        """Every size of a MIN-MAX range must keep the global batch in whole micro-batches of --batch-size."""
        low, high = self.min_workers, self.max_workers
        per_max = self.gradient_accumulation_steps * high  # G / --batch-size: every size must divide it
        bad = [w for w in range(low, high + 1) if per_max % w]
        if not bad:
            return
        need = math.lcm(*range(low, high + 1))
        fix = need // math.gcd(need, high)  # the smallest accumulation at MAX whose global batch all sizes split
        raise _setting_error(
            f"--world-size {self.world_size}: the global batch of {self.global_batch} (--batch-size {self.batch_size}"
            f" x --gradient-accumulation-steps {self.gradient_accumulation_steps} x {high} workers) must stay the "
            f"same at every size, but {bad[0]} workers cannot share it in micro-batches of {self.batch_size}; pass "
            f"--gradient-accumulation-steps {fix} (or a multiple) or a narrower range", "world_size")

    # ---- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, check_paths: bool = True, source: str | None = None
    ) -> TrainingConfig:
        """Validate a mapping of settings (snake_case or kebab-case keys); raises AiosError.

        `source` (a file name) prefixes error messages so the user knows where the bad value came from.
        """
        settings = normalize_keys(data, source)
        try:
            return cls.model_validate(settings, context={"check_paths": check_paths})
        except ValidationError as exc:
            prefix = f"{source}: " if source else ""
            raise AiosError(prefix + format_validation_error(exc)) from None

    @classmethod
    def from_json(cls, text: str, *, check_paths: bool = True, source: str = "JSON config") -> TrainingConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AiosError(f"{source} is not valid JSON ({exc}); fix the file or save it again") from None
        if not isinstance(data, dict):
            raise AiosError(f"{source} holds a {type(data).__name__}, not a JSON object of settings")
        return cls.from_dict(data, check_paths=check_paths, source=source)

    @classmethod
    def load_json(cls, path: str | os.PathLike[str], *, check_paths: bool = True) -> TrainingConfig:
        """Read a saved `training_args.json`. Pass check_paths=False for a config made on another machine."""
        return cls.from_json(_read_text(path, "config file"), check_paths=check_paths, source=str(path))

    @classmethod
    def load_yaml(cls, path: str | os.PathLike[str], *, check_paths: bool = True) -> TrainingConfig:
        """Read a preset (config/train/*.yaml); defaults fill whatever it leaves out."""
        return cls.from_dict(read_yaml_settings(path), check_paths=check_paths, source=str(path))

    # ---- saving ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Human-readable JSON, fields in `--help` order; `from_json` reads it back to an equal config."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash or a full disk never leaves a half-written file at `path`."""
        from aios.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    def config_hash(self, exclude: Iterable[str] = ()) -> str:
        """sha256 of the canonical JSON (sorted keys, no spaces): equal configs, equal hash.

        `exclude` leaves out fields that may differ between a run and its resumption (e.g. `steps`).
        """
        unknown = set(exclude) - set(type(self).model_fields)
        assert not unknown, f"config_hash(exclude=...) names unknown fields {sorted(unknown)}"
        settings = {name: value for name, value in self.to_dict().items() if name not in set(exclude)}
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_cli_args(self) -> list[str]:
        """Flags that reproduce this config on `aios hrm-hf train-actv1` (only non-default fields)."""
        args: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value == field.default:
                continue
            if isinstance(value, bool):
                args.append(flag_name(name) if value else negative_flag_name(name))
            elif value is None:  # every None-able field defaults to None, so this means a bug in a default
                raise ValueError(f"{name}=None cannot be written as a flag: its default is {field.default!r}")
            else:
                # --flag=value also survives values that start with '-'; str(float) round-trips exactly.
                args.append(f"{flag_name(name)}={value}")
        return args

    # ---- derived --------------------------------------------------------------------------------------
    def replace(self, *, check_paths: bool = True, **changes: Any) -> TrainingConfig:
        """A validated copy with some fields changed (the config itself is immutable)."""
        return type(self).from_dict({**self.to_dict(), **changes}, check_paths=check_paths)

    def unavailable_features(self) -> list[str]:
        """One message per flag (or combination of flags) whose behaviour is not built; `launch` refuses to run
        with any of them."""
        zero = self.zero_stage != "none"
        checks = [
            (zero and self.launcher == "local", f"--zero-stage {self.zero_stage} runs inside the Ray job's workers "
                                                "(DeepSpeed on their process group): use --launcher ray, or "
                                                "--zero-stage none"),
            (zero and self.use_8bit_optimizer, f"--zero-stage {self.zero_stage} with --use-8bit-optimizer: DeepSpeed "
                                               "does not shard bitsandbytes' 8-bit state; choose one of the two"),
            (zero and self.elastic, f"--zero-stage {self.zero_stage} with an elastic --world-size {self.world_size}: "
                                    "DeepSpeed's optimizer shards are per rank and do not follow a resize; give "
                                    "a fixed --world-size N, or --zero-stage none"),
            (zero and self.amp_dtype == "fp16", f"--zero-stage {self.zero_stage} with --amp-dtype fp16: the GradScaler "
                                                "cannot wrap DeepSpeed's optimizer; use --amp-dtype bf16 (or --no-amp)"),
            (zero and bool(self.expert_id), f"--zero-stage {self.zero_stage} with --expert-id: expert training trains "
                                            "a few frozen-base rows and runs without ZeRO; use --zero-stage none"),
            (self.parallel_independent, "--parallel-independent is not supported: data-parallel training over "
                                        "--world-size N workers (--launcher ray) replaces it; run without "
                                        "--parallel-independent"),
        ]
        return [message for is_set, message in checks if is_set]


# ---- helpers shared by the loaders and the CLI ---------------------------------------------------------

def field_group(field_name: str) -> str:
    extra = TrainingConfig.model_fields[field_name].json_schema_extra
    assert isinstance(extra, dict)
    return str(extra["group"])


def _scalar_kinds(annotation: Any) -> set[str]:
    """The scalar kinds a field annotation admits, by name: {"int"}, {"float"}, {"str"} (Literals too)..."""
    if typing.get_origin(annotation) is Literal:
        return {"str"}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(arg) for arg in typing.get_args(annotation) if arg is not type(None)))
    return {annotation.__name__} if annotation in (int, float, bool, str) else set()


def field_choices(field_name: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal field, else None."""
    annotation = TrainingConfig.model_fields[field_name].annotation
    if typing.get_origin(annotation) is Literal:
        return tuple(str(choice) for choice in typing.get_args(annotation))
    return None


def closest_field_name(key: str) -> str | None:
    candidates = difflib.get_close_matches(key, list(TrainingConfig.model_fields), n=1, cutoff=0.6)
    return candidates[0] if candidates else None


def _unknown_key_message(key: str, source: str | None) -> str:
    suggestion = closest_field_name(str(key).replace("-", "_"))
    fix = f"did you mean {suggestion!r}?" if suggestion else "see `aios hrm-hf train-actv1 --help` for valid names"
    prefix = f"{source}: " if source else ""
    return f"{prefix}unknown setting {key!r}; {fix}"


def normalize_keys(data: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """kebab-case keys -> snake_case; unknown or repeated keys -> AiosError naming the closest valid name."""
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in TrainingConfig.model_fields:
            raise AiosError(_unknown_key_message(key, source))
        if name in settings:
            prefix = f"{source}: " if source else ""
            raise AiosError(f"{prefix}{name!r} is set twice (as snake_case and kebab-case); keep one")
        settings[name] = value
    return settings


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AiosError(f"{what} {str(path)!r} does not exist; pass an existing file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise AiosError(f"{what} {str(path)!r} cannot be read ({exc.__class__.__name__}); pass a readable "
                        "UTF-8 text file") from None


def read_yaml_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a YAML preset as a snake_case dict, not yet validated (the CLI layers flags on top)."""
    text = _read_text(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise AiosError(f"config file {str(path)!r} is not valid YAML{line}; fix the syntax") from None
    if data is None:  # an empty (or all-comments) preset changes nothing
        return {}
    if not isinstance(data, dict):
        raise AiosError(f"config file {str(path)!r} holds a YAML {type(data).__name__}, not a mapping of "
                        "settings; write one 'name: value' per line")
    return normalize_keys(data, str(path))


def error_field(exc: ValidationError) -> str | None:
    """The setting the first error of `exc` is about (for cross-field checks: the one they blame)."""
    error = exc.errors(include_url=False)[0]
    blamed = (error.get("ctx") or {}).get("field")
    if blamed:
        return str(blamed)
    return str(error["loc"][0]) if error["loc"] else None


def format_validation_error(exc: ValidationError) -> str:
    """The first error of `exc` as one line that names the CLI flag and the fix."""
    error = exc.errors(include_url=False)[0]
    kind, loc, value = error["type"], error["loc"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind == _SETTING_ERROR:
        return str(ctx.get("message", error["msg"]))
    if kind == "extra_forbidden" and loc:
        return _unknown_key_message(str(loc[0]), None)
    name = str(loc[0]) if loc else ""
    flag = flag_name(name) if name else "settings"
    choices = field_choices(name) if name in TrainingConfig.model_fields else None
    if kind == "literal_error" and choices:
        return f"{flag}: {value!r} is not a valid choice; choose one of: {', '.join(choices)}"
    if kind == "greater_than":
        bound = ctx["gt"]
        fix = "pass a positive number" if bound == 0 else f"pass a value above {bound}"
        return f"{flag} must be greater than {bound}, got {value!r}; {fix}"
    if kind == "greater_than_equal":
        return f"{flag} must be at least {ctx['ge']}, got {value!r}; pass {ctx['ge']} or more"
    if kind == "less_than_equal":
        return f"{flag} must be at most {ctx['le']}, got {value!r}; pass {ctx['le']} or less"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{flag} must be a whole number, got {value!r}; pass e.g. {flag}=4"
    if kind in ("float_parsing", "float_type"):
        return f"{flag} must be a number, got {value!r}; pass e.g. {flag}=0.5"
    if kind in ("bool_parsing", "bool_type"):
        return f"{flag} must be true or false, got {value!r}; write true or false"
    if kind == "string_too_short":
        return f"{flag} is empty; pass a value"
    if kind == "string_type":
        return f"{flag} must be text, got {value!r}; quote the value"
    return f"{flag}: {error['msg']} (got {value!r}); see --help for the allowed values"
