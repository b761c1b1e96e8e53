"""TrainingConfig: validation messages, serialisation, presets, unavailable features."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from aios.config import GROUPS, TrainingConfig, field_group, format_validation_error
from aios.errors import AiosError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS = REPO_ROOT / "config" / "train"


def refusal_message(**settings) -> str:
    with pytest.raises(ValidationError) as info:
        TrainingConfig.model_validate(settings)
    return format_validation_error(info.value)


# ---- the field list itself ----------------------------------------------------------------------------

def test_every_field_has_help_a_group_and_groups_are_in_order():
    groups_in_field_order = []
    for name, field in TrainingConfig.model_fields.items():
        assert field.description, f"{name} has no help text"
        group = field_group(name)
        if not groups_in_field_order or groups_in_field_order[-1] != group:
            groups_in_field_order.append(group)
    # each group is one contiguous run of fields, in --help order, and none is empty
    assert groups_in_field_order == list(GROUPS)


def test_defaults_are_valid_and_as_documented():
    config = TrainingConfig()
    assert (config.model, config.dataset_file, config.hidden_size, config.num_heads) == ("gpt2", None, 512, 8)
    assert (config.steps, config.batch_size, config.lr, config.optimizer) == (200, 8, 1e-4, "adamw")
    assert (config.gradient_checkpointing, config.amp, config.progress) == (False, None, True)  # amp None = auto
    assert (config.brain_name, config.bundle_dir, config.device) == ("default", "artifacts/brains/actv1", "auto")
    assert config.unavailable_features() == []


def test_every_none_able_field_defaults_to_none():
    # to_cli_args can only express None as "flag absent", which is only right when None is the default.
    for name, field in TrainingConfig.model_fields.items():
        if "None" in str(field.annotation) or "Optional" in str(field.annotation):
            assert field.default is None, name


# ---- refusals -----------------------------------------------------------------------------------------

REFUSALS = [
    ({"hidden_size": 500}, "--hidden-size: 500 is not divisible by --num-heads 8; pick a multiple of 8"),
    ({"hidden_size": 24, "num_heads": 8},
     "--hidden-size: head size 24/8 = 3 is odd but rope needs it even; pick a multiple of 16 or pass "
     "--pos-encodings learned"),
    ({"hidden_size": 0}, "--hidden-size must be greater than 0, got 0; pass a positive number"),
    ({"num_heads": -2}, "--num-heads must be greater than 0, got -2; pass a positive number"),
    ({"steps": 0}, "--steps must be greater than 0, got 0; pass a positive number"),
    ({"batch_size": -1}, "--batch-size must be greater than 0, got -1; pass a positive number"),
    ({"max_seq_len": 0}, "--max-seq-len must be greater than 0, got 0; pass a positive number"),
    ({"halt_max_steps": 0}, "--halt-max-steps must be greater than 0, got 0; pass a positive number"),
    ({"world_size": 0}, "--world-size '0' is not a number of workers or a range of them: pass N (e.g. "
                        "--world-size 2) or MIN-MAX with 1 <= MIN <= MAX <= 1024 (e.g. --world-size 1-4)"),
    ({"world_size": "3-2"}, "--world-size '3-2' is not a number of workers or a range of them: pass N (e.g. "
                            "--world-size 2) or MIN-MAX with 1 <= MIN <= MAX <= 1024 (e.g. --world-size 1-4)"),
    ({"world_size": "1-100000"}, "--world-size '1-100000' is not a number of workers or a range of them: pass N "
                                 "(e.g. --world-size 2) or MIN-MAX with 1 <= MIN <= MAX <= 1024 (e.g. --world-size "
                                 "1-4)"),
    ({"world_size": True}, "--world-size must be N or MIN-MAX, got True; pass e.g. --world-size 2"),
    ({"world_size": "1-3", "batch_size": 8},
     "--world-size 1-3: the global batch of 24 (--batch-size 8 x --gradient-accumulation-steps 1 x 3 workers) must "
     "stay the same at every size, but 2 workers cannot share it in micro-batches of 8; pass "
     "--gradient-accumulation-steps 2 (or a multiple) or a narrower range"),
    ({"cuda_ids": "0", "device": "cpu"}, "--cuda-ids has no effect with --device cpu; drop --cuda-ids or use "
                                         "--device cuda"),
    ({"cuda_ids": "0,1", "launcher": "local"},
     "--cuda-ids 0,1: the in-process launcher trains on one GPU; pass one (e.g. --cuda-ids 0) or use --launcher ray "
     "with --world-size 2"),
    ({"cuda_ids": "0", "ray_address": "10.0.0.5:6379"},
     "--cuda-ids chooses the GPUs of the embedded local Ray cluster; a cluster you attach to with --ray-address has "
     "its own (set CUDA_VISIBLE_DEVICES where its nodes start): drop --cuda-ids or --ray-address"),
    ({"cuda_ids": "0", "world_size": "1-2"},
     "--world-size 1-2 needs 2 GPUs (one per worker) but --cuda-ids 0 lists 1: list more GPUs or lower --world-size"),
    ({"preemption_check_every": 5, "launcher": "local"},
     "--preemption-check-every has no effect with --launcher local; add --launcher ray or drop "
     "--preemption-check-every"),
    ({"lr": 0.0}, "--lr must be greater than 0.0, got 0.0; pass a positive number"),
    ({"warmup_steps": -1}, "--warmup-steps must be at least 0, got -1; pass 0 or more"),
    ({"window_size": -4}, "--window-size must be at least 0, got -4; pass 0 or more"),
    ({"halt_exploration_prob": 1.5}, "--halt-exploration-prob must be at most 1.0, got 1.5; pass 1.0 or less"),
    ({"min_lr_ratio": -0.1}, "--min-lr-ratio must be at least 0.0, got -0.1; pass 0.0 or more"),
    ({"pos_encodings": "alibi"}, "--pos-encodings: 'alibi' is not a valid choice; choose one of: rope, learned"),
    ({"optimizer": "sgd"}, "--optimizer: 'sgd' is not a valid choice; choose one of: adamw, adam-atan2"),
    ({"zero_stage": "zero4"},
     "--zero-stage: 'zero4' is not a valid choice; choose one of: none, zero1, zero2, zero3"),
    ({"steps": "many"}, "--steps must be a whole number, got 'many'; pass e.g. --steps=4"),
    ({"use_moe": True, "num_experts": 2, "num_experts_per_tok": 3},
     "--num-experts-per-tok: 3 is more than --num-experts 2; pass at most 2"),
    ({"num_experts": 8}, "--num-experts has no effect without --use-moe; add --use-moe or drop --num-experts"),
    ({"max_failures": 2, "launcher": "local"},
     "--max-failures has no effect with --launcher local; add --launcher ray or drop --max-failures"),
    ({"ray_address": "10.0.0.5:6379", "launcher": "local"},
     "--ray-address has no effect with --launcher local; add --launcher ray or drop --ray-address"),
    ({"launcher": "slurm"}, "--launcher: 'slurm' is not a valid choice; choose one of: local, ray"),
    ({"cuda_ids": "0,gpu1"}, "--cuda-ids '0,gpu1' is not a comma-separated list of GPU numbers; pass e.g. 0,1"),
    ({"cuda_ids": "1,1"}, "--cuda-ids '1,1' names a GPU twice; list each GPU once, e.g. 0,1"),
    ({"dataset_file": "no/such/file.txt"},
     "--dataset-file: file 'no/such/file.txt' does not exist; pass an existing .txt/.jsonl/.csv file, "
     "directory or glob"),
    ({"eval_file": "no/such/*.jsonl"},
     "--eval-file: glob 'no/such/*.jsonl' matches nothing; pass an existing .txt/.jsonl/.csv file, "
     "directory or glob"),
    ({"brain_name": "../x"},
     "--brain-name '../x' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": "/abs"},
     "--brain-name '/abs' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": "a/b"},
     "--brain-name 'a/b' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": "a\\b"},
     "--brain-name 'a\\\\b' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": ".."},
     "--brain-name '..' is not a single directory name; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": ""}, "--brain-name is empty; use letters, digits, '.', '_' and '-', e.g. --brain-name my-brain"),
    ({"brain_name": "-rf"},
     "--brain-name '-rf' starts with '-'; use letters, digits, '.', '_' and '-', e.g. --brain-name my-brain"),
    ({"brain_name": ".hidden"},  # `aios brains list` skips hidden directories: it would never be listed
     "--brain-name '.hidden' starts with '.', which would hide it from `aios brains list`; drop the leading '.', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": "my brain"},
     "--brain-name 'my brain' has characters that are not allowed; use letters, digits, '.', '_' and '-', "
     "e.g. --brain-name my-brain"),
    ({"brain_name": "x" * 101}, "--brain-name is 101 characters long; use at most 100"),
    ({"hidden_sise": 128}, "unknown setting 'hidden_sise'; did you mean 'hidden_size'?"),
    # no number may be non-finite (an --lr inf run saved NaN weights), and no coercion between kinds
    ({"lr": float("inf")}, "--lr must be a finite number, got inf; pass e.g. --lr=0.5"),
    ({"weight_decay": float("inf")}, "--weight-decay must be a finite number, got inf; pass e.g. --weight-decay=0.5"),
    ({"grad_clip": float("nan")}, "--grad-clip must be a finite number, got nan; pass e.g. --grad-clip=0.5"),
    ({"expansion": float("-inf")}, "--expansion must be a finite number, got -inf; pass e.g. --expansion=0.5"),
    ({"lr": "nan"}, "--lr must be a finite number, got 'nan'; pass e.g. --lr=0.5"),
    ({"min_lr_ratio": 10**400}, f"--min-lr-ratio must be a finite number, got {10**400!r}; pass e.g. --min-lr-ratio=0.5"),
    ({"steps": True}, "--steps must be a whole number, got True; pass e.g. --steps=4"),
    ({"batch_size": 4.0}, "--batch-size must be a whole number, got 4.0; pass e.g. --batch-size=4"),
    ({"lr": False}, "--lr must be a number, got False; pass e.g. --lr=0.5"),
    ({"amp": 1}, "--amp must be true or false, got 1; write true or false"),
    ({"iterate": "yes"}, "--iterate must be true or false, got 'yes'; write true or false"),
    ({"brain_name": 12}, "--brain-name must be text, got 12; quote the value"),
    ({"optimizer": 3}, "--optimizer must be text, got 3; quote the value"),
]


@pytest.mark.parametrize(("settings", "message"), REFUSALS, ids=[str(s) for s, _ in REFUSALS])
def test_refused_values_name_the_flag_and_the_fix(settings, message):
    assert refusal_message(**settings) == message
    assert "\n" not in message
    # the loaders turn the same message into a user error
    with pytest.raises(AiosError) as info:
        TrainingConfig.from_dict(settings)
    assert str(info.value) == message


def test_accepted_edge_values():
    config = TrainingConfig(
        brain_name="x" * 100, window_size=0, halt_exploration_prob=1.0, min_lr_ratio=0.0, grad_clip=0.0,
        hidden_size=96, num_heads=3, cuda_ids=" 0, 2", use_moe=True, num_experts=2, num_experts_per_tok=2,
    )
    assert config.cuda_ids == "0,2"  # canonical form
    assert config.hidden_size // config.num_heads == 32
    # an odd head size is fine without rope
    assert TrainingConfig(hidden_size=24, num_heads=8, pos_encodings="learned").hidden_size == 24
    assert TrainingConfig(brain_name="v1.2-brain.").brain_name == "v1.2-brain."  # '.' is refused only first


def test_path_checks_accept_files_directories_and_matching_globs(tmp_path):
    text = tmp_path / "corpus" / "a.txt"
    text.parent.mkdir()
    text.write_text("to be or not to be\n")
    assert TrainingConfig(dataset_file=str(text)).dataset_file == str(text)
    assert TrainingConfig(dataset_file=str(text.parent)).dataset_file == str(text.parent)
    assert TrainingConfig(dataset_file=str(tmp_path / "corpus" / "*.txt")).dataset_file.endswith("*.txt")
    assert "matches nothing" in refusal_message(dataset_file=str(tmp_path / "corpus" / "*.csv"))


def test_path_checks_are_skipped_with_the_validation_context():
    settings = {"dataset_file": "/elsewhere/train.txt", "eval_file": "/elsewhere/eval.txt"}
    with pytest.raises(ValidationError):
        TrainingConfig.model_validate(settings)
    config = TrainingConfig.model_validate(settings, context={"check_paths": False})
    assert config.dataset_file == "/elsewhere/train.txt"
    assert TrainingConfig.from_dict(settings, check_paths=False) == config
    # other checks still run
    with pytest.raises(ValidationError):
        TrainingConfig.model_validate({**settings, "brain_name": "../up"}, context={"check_paths": False})


# ---- serialisation ------------------------------------------------------------------------------------

def unusual_config(tmp_path: Path) -> TrainingConfig:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    return TrainingConfig(
        dataset_file=str(data), eval_file=str(data), text_field="body", window_size=0, lr=3e-5,
        expansion=8 / 3, min_lr_ratio=0.0, seed=0, optimizer="adam-atan2", amp=False, progress=False,
        cuda_ids="0,1", world_size=2, launcher="ray", brain_name="exp.1_b-2", stop_file="STOP",
    )


def test_json_round_trip_is_lossless(tmp_path):
    config = unusual_config(tmp_path)
    assert TrainingConfig.from_json(config.to_json()) == config
    assert TrainingConfig.from_json(config.to_json()).expansion == 8 / 3  # floats exact, not rounded
    assert list(json.loads(config.to_json())) == list(TrainingConfig.model_fields)  # --help order


def test_save_json_is_atomic_and_load_json_skips_paths_on_request(tmp_path):
    config = unusual_config(tmp_path)
    target = tmp_path / "bundle" / "training_args.json"
    TrainingConfig().save_json(target)
    config.save_json(target)  # replaces the earlier file
    assert sorted(p.name for p in target.parent.iterdir()) == ["training_args.json"]  # no temp files left
    assert TrainingConfig.load_json(target) == config

    # on another machine the data files are gone: loading still works with check_paths=False
    Path(config.dataset_file).unlink()
    with pytest.raises(AiosError, match="--dataset-file: file .* does not exist"):
        TrainingConfig.load_json(target)
    assert TrainingConfig.load_json(target, check_paths=False) == config


def test_json_loader_errors_are_user_errors(tmp_path):
    with pytest.raises(AiosError, match="does not exist"):
        TrainingConfig.load_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AiosError, match="is not valid JSON"):
        TrainingConfig.load_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(AiosError, match="holds a list, not a JSON object"):
        TrainingConfig.load_json(bad)
    bad.write_text('{"hidden_size": 100}')
    with pytest.raises(AiosError) as info:
        TrainingConfig.load_json(bad)
    assert str(info.value) == f"{bad}: --hidden-size: 100 is not divisible by --num-heads 8; pick a multiple of 8"


def test_config_hash_is_sha256_of_canonical_json(tmp_path):
    config = unusual_config(tmp_path)
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert config.config_hash() == hashlib.sha256(canonical.encode()).hexdigest()
    assert TrainingConfig.from_json(config.to_json()).config_hash() == config.config_hash()
    assert config.replace(steps=config.steps + 1).config_hash() != config.config_hash()
    assert TrainingConfig().config_hash() == TrainingConfig().config_hash()
    # a resumed run may train longer: hashing without `steps` ignores exactly that change
    longer = config.replace(steps=config.steps * 2)
    assert longer.config_hash(exclude=["steps"]) == config.config_hash(exclude=["steps"])
    assert longer.replace(lr=1e-3).config_hash(exclude=["steps"]) != config.config_hash(exclude=["steps"])


def test_to_cli_args_lists_only_non_default_fields(tmp_path):
    assert TrainingConfig().to_cli_args() == []
    config = TrainingConfig(hidden_size=256, amp=False, iterate=True, window_size=0, seed=0, lr=3e-5)
    assert config.to_cli_args() == [
        "--hidden-size=256", "--window-size=0", "--lr=3e-05", "--iterate", "--seed=0", "--no-amp",
    ]


def test_replace_validates_and_leaves_the_original_alone():
    config = TrainingConfig()
    changed = config.replace(hidden_size=256)
    assert (config.hidden_size, changed.hidden_size) == (512, 256)
    with pytest.raises(AiosError, match="--hidden-size: 250 is not divisible"):
        config.replace(hidden_size=250)
    with pytest.raises(ValidationError):  # frozen: no silent in-place edits after validation
        config.hidden_size = 256


# ---- YAML presets -------------------------------------------------------------------------------------

def test_load_yaml_accepts_snake_and_kebab_keys(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("hidden-size: 256\nnum_heads: 4\nlr: 1.0e-3\nuse-flash-attn: true\n")
    config = TrainingConfig.load_yaml(preset)
    assert (config.hidden_size, config.num_heads, config.lr, config.use_flash_attn) == (256, 4, 1e-3, True)
    assert config.steps == 200  # untouched fields keep their defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hiden_size: 128\n", "unknown setting 'hiden_size'; did you mean 'hidden_size'?"),
        ("batch-sise: 4\n", "unknown setting 'batch-sise'; did you mean 'batch_size'?"),
        ("zzzz: 1\n", "unknown setting 'zzzz'; see `aios hrm-hf train-actv1 --help` for valid names"),
        ("- hidden_size\n- 128\n", "holds a YAML list, not a mapping of settings"),
        ("just a string\n", "holds a YAML str, not a mapping of settings"),
        ("hidden_size: [\n", "is not valid YAML at line 2; fix the syntax"),
        ("hidden_size: 128\nhidden-size: 256\n", "'hidden_size' is set twice"),
        ("hidden_size: 100\n", "--hidden-size: 100 is not divisible by --num-heads 8; pick a multiple of 8"),
        ("lr: .inf\n", "--lr must be a finite number, got inf"),
        ("weight_decay: .nan\n", "--weight-decay must be a finite number, got nan"),
        ("steps: true\n", "--steps must be a whole number, got True"),
        ("gradient_checkpointing: 0\n", "--gradient-checkpointing must be true or false, got 0"),
    ],
)
def test_load_yaml_refusals(tmp_path, text, message):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(AiosError) as info:
        TrainingConfig.load_yaml(preset)
    assert message in str(info.value)
    assert str(preset) in str(info.value)  # says which file is wrong


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-3\nweight_decay: 0\n")  # YAML 1.1 reads 1e-3 (no dot) as text
    config = TrainingConfig.load_yaml(preset)
    assert (config.lr, config.weight_decay) == (1e-3, 0.0)


def test_empty_yaml_is_all_defaults(tmp_path):
    preset = tmp_path / "empty.yaml"
    preset.write_text("# nothing set yet\n")
    assert TrainingConfig.load_yaml(preset) == TrainingConfig()


def test_demo_cpu_preset():
    config = TrainingConfig.load_yaml(PRESETS / "demo-cpu.yaml", check_paths=False)
    assert config.model == "training_data/tokenizers/shakespeare-bpe-2k"
    assert config.dataset_file == "training_data/curated_datasets/test_sample.txt"
    assert config.eval_file == "training_data/eval_test_dataset.txt"
    assert (config.hidden_size, config.num_heads, config.expansion) == (256, 4, 2.0)
    assert (config.h_layers, config.l_layers, config.h_cycles, config.l_cycles) == (1, 1, 2, 2)
    assert (config.max_seq_len, config.batch_size, config.halt_max_steps, config.steps) == (64, 16, 4, 1000)
    assert (config.lr, config.warmup_steps, config.amp, config.gradient_checkpointing) == (2e-3, 50, None, False)
    assert (config.eval_every, config.checkpoint_every, config.dataset_chunk_size, config.eval_batches) == (
        250, 250, 1024, 8)
    assert (config.text_mode, config.iterate) == ("document", True)
    assert config.brain_name == "shakespeare-demo"
    assert config.unavailable_features() == []


def test_hrm_27m_preset():
    config = TrainingConfig.load_yaml(PRESETS / "hrm-27m.yaml", check_paths=False)
    assert (config.hidden_size, config.num_heads, config.expansion) == (512, 8, 4.0)
    assert (config.h_layers, config.l_layers, config.h_cycles, config.l_cycles) == (4, 4, 2, 2)
    assert (config.pos_encodings, config.halt_max_steps, config.max_seq_len) == ("rope", 16, 256)
    assert (config.optimizer, config.lr, config.weight_decay) == ("adam-atan2", 1e-4, 0.1)
    assert config.brain_name == "hrm-27m"


def test_demo_cpu_preset_data_paths_exist_from_the_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    config = TrainingConfig.load_yaml("config/train/demo-cpu.yaml")  # path checks on
    assert Path(config.dataset_file).is_file() and Path(config.eval_file).is_file()


# ---- flags, and combinations of flags, that are refused -------------------------------------------------

@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"zero_stage": "zero2", "launcher": "local"},
         "--zero-stage zero2 runs inside the Ray job's workers (DeepSpeed on their process group): use --launcher "
         "ray, or --zero-stage none"),
        ({"zero_stage": "zero1", "use_8bit_optimizer": True},
         "--zero-stage zero1 with --use-8bit-optimizer: DeepSpeed does not shard bitsandbytes' 8-bit state; choose "
         "one of the two"),
        ({"zero_stage": "zero3", "expert_id": "e", "base_brain": "b"},
         "--zero-stage zero3 with --expert-id: expert training trains a few frozen-base rows and runs without ZeRO; "
         "use --zero-stage none"),
        ({"zero_stage": "zero2", "world_size": "1-2"},
         "--zero-stage zero2 with an elastic --world-size 1-2: DeepSpeed's optimizer shards are per rank"),
        ({"zero_stage": "zero2", "amp": True, "amp_dtype": "fp16"},
         "--zero-stage zero2 with --amp-dtype fp16: the GradScaler cannot wrap DeepSpeed's optimizer"),
        ({"parallel_independent": True}, "--parallel-independent is not supported"),
    ],
)
def test_unavailable_features_are_named_not_ignored(settings, message):
    [found] = TrainingConfig(**settings).unavailable_features()
    assert found.startswith(message)


def test_unavailable_features_lists_every_one_set():
    config = TrainingConfig(world_size=2, launcher="ray", zero_stage="zero1", use_8bit_optimizer=True,
                            ddp=True, parallel_independent=True)
    assert [m.split()[0] for m in config.unavailable_features()] == ["--zero-stage", "--parallel-independent"]
    assert TrainingConfig(expert_id="e", base_brain="b").unavailable_features() == []  # expert training works
    assert TrainingConfig(world_size=2, launcher="ray", ddp=True).unavailable_features() == []
    assert TrainingConfig(world_size=2, zero_stage="zero2").unavailable_features() == []  # on the Ray job


def test_several_workers_need_the_ray_launcher_and_replace_parallel_independent():
    with pytest.raises(ValueError, match="--world-size 2 needs --launcher ray"):
        TrainingConfig(world_size=2, launcher="local")
    assert TrainingConfig(world_size=2).launcher == "ray"  # the default
    TrainingConfig(world_size=1)  # one worker runs in-process too
    [message] = TrainingConfig(parallel_independent=True, launcher="ray", world_size=2).unavailable_features()
    assert message.startswith("--parallel-independent is not supported: data-parallel training")



@pytest.mark.parametrize(("given", "canonical", "low", "high"),
                         [(2, "2", 2, 2), ("2", "2", 2, 2), (" 1 - 2 ", "1-2", 1, 2), ("3-3", "3", 3, 3), (None, None, 1, 1)])
def test_world_size_is_a_number_or_a_range_kept_in_one_spelling(given, canonical, low, high):
    config = TrainingConfig(world_size=given, launcher="ray", batch_size=2, gradient_accumulation_steps=1)
    assert (config.world_size, config.min_workers, config.max_workers) == (canonical, low, high)
    assert config.elastic == (low < high)
    assert config.global_batch == 2 * high  # counted at MAX workers


def test_an_elastic_range_keeps_the_global_batch_at_every_size():
    config = TrainingConfig(world_size="2-4", launcher="ray", batch_size=2, gradient_accumulation_steps=3)
    assert config.global_batch == 24
    assert [config.accumulation_at(w) * 2 * w for w in (2, 3, 4)] == [24, 24, 24]
    assert [config.accumulation_at(w) for w in (2, 3, 4)] == [6, 4, 3]
    assert TrainingConfig.from_json(config.to_json()) == config  # the range survives training_args.json
