"""`aios hrm-hf train-actv1`: generated flags, groups in --help, preset precedence, refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from aios.cli.hrm_hf import app, parse_cli_args
from aios.config import GROUPS, TrainingConfig, field_group, flag_name
from aios.errors import AiosError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_PRESET = REPO_ROOT / "config" / "train" / "demo-cpu.yaml"

# Wide, colourless output so rich neither wraps nor truncates the option table.
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "FORCE_COLOR": None, "TERM": "dumb"})


def train(*args: str):
    return runner.invoke(app, ["train-actv1", *args])


def printed_config(*args: str) -> TrainingConfig:
    result = train(*args, "--print-config")
    assert result.exception is None, result.output
    assert result.exit_code == 0
    return TrainingConfig.from_json(result.output)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n")
    return path


# ---- --help -------------------------------------------------------------------------------------------

REQUIRED_FLAGS = (
    "--model --dataset-file --ascii-only --steps --batch-size --halt-max-steps --eval-file --eval-batches "
    "--log-file --iterate --stop-file --brain-name --bundle-dir --h-layers --l-layers --hidden-size --expansion "
    "--num-heads --h-cycles --l-cycles --window-size --pos-encodings "
    "--gradient-checkpointing/--no-gradient-checkpointing --amp/--no-amp --use-8bit-optimizer --ddp --cuda-ids "
    "--world-size --zero-stage --expert-id --max-seq-len --dataset-chunk-size --use-flash-attn "
    "--parallel-independent --lr --gradient-accumulation-steps --resume"
).split()


def help_rows() -> dict[str, str]:
    """First flag of each option row in `--help` -> the whole row, its indented continuation lines included."""
    result = train("--help")
    assert result.exit_code == 0, result.output
    rows, current = {}, None
    for line in result.output.splitlines():
        match = re.match(r"│ (--[a-z0-9-]+)", line)  # a row starts with its flag at the panel's left edge
        if match:
            current = match.group(1)
            rows[current] = line
        elif current and line.startswith("│  "):
            rows[current] += "\n" + line
        else:
            current = None
    return rows


def help_panels() -> list[str]:
    return re.findall(r"╭─ (\w+) ─", train("--help").output)


@pytest.mark.parametrize("flag", REQUIRED_FLAGS)
def test_help_lists_flag(flag):
    rows = help_rows()
    on, _, off = flag.partition("/")
    assert on in rows, f"{on} missing from --help"
    if off:  # a --x/--no-x pair shares one row
        assert off in re.findall(r"--[a-z0-9-]+", rows[on]), rows[on]


def test_help_shows_the_groups_in_order_with_defaults():
    assert help_panels() == ["Options", *GROUPS]
    rows = help_rows()
    assert "[default: 512]" in rows["--hidden-size"]
    assert "[default: 0.0001]" in rows["--lr"]
    assert "<rope|learned>" in rows["--pos-encodings"] and "[default: rope]" in rows["--pos-encodings"]
    assert "<adamw|adam-atan2>" in rows["--optimizer"]
    assert "--no-use-flash-attn" in rows["--use-flash-attn"]
    assert "--config" in rows and "--print-config" in rows


def test_every_config_field_is_one_generated_option_in_its_group():
    command = typer.main.get_command(app).commands["train-actv1"]
    options = {param.name: param for param in command.params}
    for name, field in TrainingConfig.model_fields.items():
        option = options.pop(name)
        assert option.opts == [flag_name(name)]
        assert option.rich_help_panel == field_group(name)
        assert option.default == field.default
    assert sorted(options) == ["config", "debug", "print_config"]  # hand-written; --debug: every command has it


# ---- precedence: defaults < preset < typed flags ------------------------------------------------------

def test_preset_then_cli_override_then_json_round_trip(corpus):
    # The demo preset sets hidden_size 256 (and its own data paths); the CLI overrides a few values.
    config = printed_config("--config", str(DEMO_PRESET), "--hidden-size", "128",
                            "--dataset-file", str(corpus), "--eval-file", str(corpus))
    assert config.hidden_size == 128
    assert (config.num_heads, config.steps, config.lr, config.brain_name) == (4, 1000, 2e-3, "shakespeare-demo")
    assert (config.amp, config.gradient_checkpointing, config.max_seq_len) == (None, False, 64)
    assert config.dataset_file == str(corpus)
    assert config.batch_size == 16 and config.optimizer == "adamw"  # preset value kept / default kept
    assert TrainingConfig.from_json(config.to_json()) == config


def test_typed_flag_beats_preset_even_when_it_equals_the_default(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("hidden_size: 128\nnum_heads: 4\namp: false\nsteps: 7\n")
    assert printed_config("--config", str(preset)).amp is False
    # --amp and --hidden-size 512 are the defaults, yet typed by the user they override the preset
    config = printed_config("--config", str(preset), "--amp", "--hidden-size", "512")
    assert (config.amp, config.hidden_size, config.num_heads, config.steps) == (True, 512, 4, 7)


def test_without_a_preset_flags_apply_over_defaults():
    config = printed_config("--hidden-size", "256", "--no-amp", "--lr", "3e-4", "--window-size", "0",
                            "--pos-encodings", "learned", "--optimizer", "adam-atan2")
    assert config == TrainingConfig(hidden_size=256, amp=False, lr=3e-4, window_size=0,
                                    pos_encodings="learned", optimizer="adam-atan2")


def test_print_config_prints_the_whole_config_as_json():
    result = train("--print-config")
    assert result.exit_code == 0 and result.exception is None
    assert json.loads(result.output) == TrainingConfig().model_dump(mode="json")


# ---- refusals -----------------------------------------------------------------------------------------

CLI_REFUSALS = [
    (["--hidden-size", "500"], "--hidden-size: 500 is not divisible by --num-heads 8; pick a multiple of 8"),
    (["--hidden-size", "0"], "--hidden-size must be greater than 0, got 0; pass a positive number"),
    (["--batch-size", "-4"], "--batch-size must be greater than 0, got -4; pass a positive number"),
    (["--steps", "0"], "--steps must be greater than 0, got 0; pass a positive number"),
    (["--num-heads", "0"], "--num-heads must be greater than 0, got 0; pass a positive number"),
    (["--dataset-file", "no/such/corpus.txt"],
     "--dataset-file: file 'no/such/corpus.txt' does not exist; pass an existing .txt/.jsonl/.csv file, "
     "directory or glob"),
    (["--brain-name", "../x"],
     "--brain-name '../x' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    (["--brain-name", "/abs"],
     "--brain-name '/abs' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    (["--brain-name", "a/b"],
     "--brain-name 'a/b' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    (["--brain-name", ""],
     "--brain-name is empty; use letters, digits, '.', '_' and '-', e.g. --brain-name my-brain"),
]


@pytest.mark.parametrize(("args", "message"), CLI_REFUSALS, ids=[" ".join(a) for a, _ in CLI_REFUSALS])
def test_refused_values_through_the_cli(args, message):
    result = train(*args, "--print-config")
    assert isinstance(result.exception, AiosError), result.output
    assert str(result.exception) == message
    assert result.exit_code != 0 and "{" not in result.output  # nothing printed as if it were valid
    with pytest.raises(AiosError) as info:
        parse_cli_args(args)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [("--pos-encodings", "alibi", ("rope", "learned")), ("--optimizer", "sgd", ("adamw", "adam-atan2")),
     ("--zero-stage", "zero4", ("none", "zero1", "zero2", "zero3"))],
)
def test_unknown_choices_are_refused_by_the_parser_listing_the_choices(flag, value, choices):
    result = train(flag, value, "--print-config")
    assert result.exit_code == 2 and "{" not in result.output
    assert f"Invalid value for '{flag}'" in result.output and all(repr(c) in result.output for c in choices)
    with pytest.raises(AiosError, match=f"Invalid value for '{flag}'"):
        parse_cli_args([flag, value])


def test_bad_preset_value_names_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("hidden_size: 100\n")
    result = train("--config", str(preset), "--print-config")
    assert str(result.exception) == (
        f"{preset}: --hidden-size: 100 is not divisible by --num-heads 8; pick a multiple of 8")
    # the same value typed on the command line is the user's own flag: no file named
    result = train("--config", str(preset), "--hidden-size", "100", "--print-config")
    assert str(result.exception) == "--hidden-size: 100 is not divisible by --num-heads 8; pick a multiple of 8"


def test_preset_errors_are_user_errors(tmp_path):
    result = train("--config", str(tmp_path / "missing.yaml"), "--print-config")
    assert isinstance(result.exception, AiosError) and "does not exist" in str(result.exception)
    preset = tmp_path / "p.yaml"
    preset.write_text("hiden-size: 128\n")
    result = train("--config", str(preset), "--print-config")
    assert str(result.exception) == f"{preset}: unknown setting 'hiden-size'; did you mean 'hidden_size'?"


# ---- to_cli_args <-> parse_cli_args -------------------------------------------------------------------

def test_to_cli_args_round_trips_through_the_real_parser(corpus):
    config = TrainingConfig(
        dataset_file=str(corpus), eval_file=str(corpus), lr=3e-5, expansion=8 / 3, min_lr_ratio=0.0,
        halt_exploration_prob=0.0, grad_clip=0.0, window_size=0, seed=0, world_size=1, cuda_ids="0,1",
        expert_id="expert-3", base_brain="base-3", stop_file="STOP", log_file="logs/m.jsonl", amp=False, progress=False,
        gradient_checkpointing=False, iterate=True, pos_encodings="learned", loss_type="stablemax",
        optimizer="adam-atan2", zero_stage="zero2", device="cuda", brain_name="round.trip",
    )
    args = config.to_cli_args()
    assert "--no-amp" in args and "--window-size=0" in args and "--lr=3e-05" in args
    assert parse_cli_args(args) == config
    assert parse_cli_args([]) == TrainingConfig()


def test_to_cli_args_round_trips_every_field(corpus):
    # A config where every single field differs from its default: nothing may be lost on the way.
    everything = {
        "model": "tok-dir", "dataset_file": str(corpus), "ascii_only": True, "text_mode": "document",
        "text_field": "body",
        "eval_file": str(corpus), "eval_batches": 3, "eval_every": 5, "max_seq_len": 32,
        "dataset_chunk_size": 64, "data_cache_dir": "cache", "h_layers": 3, "l_layers": 1, "hidden_size": 96,
        "expansion": 1.5, "num_heads": 3, "h_cycles": 1, "l_cycles": 3, "window_size": 16,
        "pos_encodings": "learned", "halt_max_steps": 2, "halt_exploration_prob": 0.25, "loss_type": "stablemax",
        "use_moe": True, "num_experts": 6, "num_experts_per_tok": 3, "moe_capacity_factor": 2.0,
        "moe_aux_loss_coef": 0.0, "use_flash_attn": True, "steps": 9, "batch_size": 2, "lr": 0.5,
        "min_lr_ratio": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.5, "optimizer": "adam-atan2",
        "gradient_accumulation_steps": 4, "iterate": True, "stop_file": "STOP", "resume": True, "seed": 7,
        "log_file": "m.jsonl", "checkpoint_every": 0, "keep_checkpoints": 1, "progress": False,
        "gradient_checkpointing": True, "amp": False, "use_8bit_optimizer": True, "compile": True, "ddp": True,
        "cuda_ids": "2,3", "world_size": "1-2", "zero_stage": "zero3", "expert_id": "e1",
        "base_brain": "b1", "experts_dir": "exp",
        "parallel_independent": True, "device": "cuda", "launcher": "ray",
        "max_failures": 2, "cpus_per_worker": 1, "preemption_check_every": 3, "bundle_dir": "s3://bucket/brains",
        "storage_path": "s3://bucket/runs", "local_bundle_dir": "here/brains", "s3_endpoint_url": "http://127.0.0.1:9000",
        "brain_name": "all-fields", "run_name": "run-1",
    }
    # --amp-dtype means nothing with --no-amp, and --ray-address nothing with --cuda-ids (both are refused then):
    # they get configs of their own below; the launcher keeps its default, ray, which the Ray flags above need
    # (so it writes no flag).
    assert sorted(everything) == sorted(set(TrainingConfig.model_fields) - {"amp_dtype", "ray_address"})
    config = TrainingConfig(**everything)
    assert len(config.to_cli_args()) == len(TrainingConfig.model_fields) - 3
    attached = TrainingConfig(ray_address="10.0.0.5:6379")
    assert parse_cli_args(attached.to_cli_args()) == attached
    local = TrainingConfig(launcher="local")
    assert local.to_cli_args() == ["--launcher=local"] and parse_cli_args(local.to_cli_args()) == local
    assert parse_cli_args(config.to_cli_args()) == config
    fp16 = TrainingConfig(amp_dtype="fp16")
    assert fp16.to_cli_args() == ["--amp-dtype=fp16"] and parse_cli_args(fp16.to_cli_args()) == fp16
