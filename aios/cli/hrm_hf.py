"""`aios hrm-hf ...`: HRM ACT v1 models with Hugging Face tokenizers.

`train-actv1` has one option per `TrainingConfig` field, generated (aios/cli/options.py), plus `--config`
(a YAML preset) and `--print-config`. Precedence: field defaults < the preset < flags typed by the user.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError

# typer ships its own click; its exception base class is how a parse error is recognised in-process.
from typer._click.exceptions import ClickException

from aios.cli.app import App
from aios.cli.options import finite_number, typed_by_user, with_config_options
from aios.config.training import TrainingConfig, error_field, format_validation_error, read_yaml_settings
from aios.errors import AiosError
from aios.paths import DEFAULT_BUNDLE_DIR, DEFAULT_DATA_CACHE_DIR, DEFAULT_EXPERTS_DIR

app = App(no_args_is_help=True)


@app.callback()
def _hrm_hf() -> None:
    """HRM ACT v1 models with Hugging Face tokenizers."""


# Passed as the click context object by `parse_cli_args`: build the config, return it, launch nothing.
_PARSE_ONLY = object()

_COMMAND_PARAMETERS = [
    inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--config",
                metavar="FILE.yaml",
                help="YAML preset (e.g. config/train/demo-cpu.yaml); flags you type override its values.",
            ),
        ],
    ),
    inspect.Parameter(
        "print_config",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool, typer.Option("--print-config", help="Print the resolved config as JSON and exit; no training.")
        ],
    ),
]


def resolve_config(ctx: typer.Context, preset: str | None, flag_values: dict[str, Any], *,
                   check_paths: bool = True) -> TrainingConfig:
    """defaults < preset < flags the user typed (a flag left at its default does not undo the preset).
    `check_paths=False`: the data paths are another machine's (aios submit), not looked for here."""
    preset_settings = read_yaml_settings(preset) if preset else {}
    typed = typed_by_user(ctx, flag_values)
    settings = {**preset_settings, **{name: flag_values[name] for name in typed}}
    try:
        return TrainingConfig.model_validate(settings, context={"check_paths": check_paths})
    except ValidationError as exc:
        message = format_validation_error(exc)
        field = error_field(exc)
        from_preset = field in preset_settings and field not in typed  # then say which file to fix
        raise AiosError(f"{preset}: {message}" if from_preset else message) from None


@app.command("train-actv1")
@with_config_options(TrainingConfig, _COMMAND_PARAMETERS)
def train_actv1(ctx: typer.Context, config: str | None, print_config: bool, **flag_values: Any) -> Any:
    """Train an HRM ACT v1 model on text into a brain bundle (<bundle-dir>/<brain-name>/).

    Settings come from the field defaults, then --config FILE.yaml, then the flags you type.
    """
    training_config = resolve_config(ctx, config, flag_values)
    if ctx.obj is _PARSE_ONLY:
        return training_config
    if print_config:
        typer.echo(training_config.to_json(), nl=False)
        return None
    from aios.cluster.submit import check_required_env
    from aios.train import already_reached_message, launch  # here: --help must not pay for torch

    check_required_env()  # a job of `aios submit --require-env`: the cluster must provide those variables
    result = launch(training_config)
    if result.reason == "already_reached":
        typer.echo(already_reached_message(training_config, result.step))
        return None
    summary = f"{result.reason}: {result.step} steps; bundle {result.bundle}"
    if result.final_eval:
        ev = result.final_eval
        summary += (f"; eval loss {ev['loss']:.3f} (perplexity {ev['perplexity']:.1f}), "
                    f"token accuracy {ev['token_accuracy']:.3f}; unigram entropy of the data "
                    f"{result.unigram_entropy:.3f}")
    typer.echo(summary)
    if result.plot:
        typer.echo(f"training curves: {result.plot}")
    return None


_EXPERTS_HELP = ("Experts to attach, comma-separated (ID or ID,ID): trained with `train-actv1 --expert-id ID "
                 "--base-brain` for this brain, from --experts-dir.")


def _load_brain(brain: str, bundle_dir: str, device: str, experts: str | None = None,
                experts_dir: str = DEFAULT_EXPERTS_DIR):
    """(bundle, model, tokenizer, device) of a bundle, by name, path or s3:// URI (a cached local copy), with
    the `experts` (ID[,ID]) attached."""
    from aios.bundle import BrainBundle
    from aios.experts import attach_experts, parse_expert_ids
    from aios.storage import is_remote
    from aios.train.session import resolve_device

    if is_remote(brain):
        from aios.bundle.remote import cached_brain

        bundle = cached_brain(brain, Path(bundle_dir))
    else:
        bundle = BrainBundle.open(brain, bundle_dir)
    ids = parse_expert_ids(experts)
    dev = resolve_device(device)
    model = bundle.load_model(dev)
    attach_experts(model, bundle, ids, experts_dir)
    return bundle, model, bundle.load_tokenizer(), dev


@app.command("generate")
def generate_command(
    brain: Annotated[str, typer.Option("--brain", help="Bundle name under --bundle-dir, a bundle directory, or "
                                       "s3://BUCKET/PREFIX/NAME (pulled into <bundle-dir>/.remote/, endpoint: "
                                       "$AWS_ENDPOINT_URL).")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, callback=finite_number,
                                               help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k likeliest tokens; 0 = all.")] = 40,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    bundle_dir: Annotated[str, typer.Option("--bundle-dir", help="Directory that holds brain bundles.")]
    = DEFAULT_BUNDLE_DIR,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device", help="Where to run.")] = "auto",
    experts: Annotated[str | None, typer.Option("--experts", metavar="ID[,ID]", help=_EXPERTS_HELP)] = None,
    experts_dir: Annotated[str, typer.Option("--experts-dir", help="Directory that holds experts.")]
    = DEFAULT_EXPERTS_DIR,
) -> None:
    """Continue a prompt with a trained brain (ACT inference: segments until the Q-head halts, at most M)."""
    import torch

    from aios.inference import generate

    bundle, model, tokenizer, dev = _load_brain(brain, bundle_dir, device, experts, experts_dir)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.eos_token_id]
    generator = torch.Generator(device=dev).manual_seed(seed)
    new_ids, segments = generate(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k or None, eos_id=tokenizer.eos_token_id, device=dev, generator=generator)
    typer.echo(prompt + tokenizer.decode(new_ids, skip_special_tokens=True))
    typer.echo(f"[{len(new_ids)} tokens, {segments:.2f} ACT segments per token (max "
               f"{model.config.halt_max_steps})]", err=True)


# TrainingConfig fields that decide what the trainer's evaluation computes (besides the model and the file).
_EVAL_SETTINGS = ("text_mode", "text_field", "ascii_only", "dataset_chunk_size", "batch_size", "eval_batches",
                  "amp", "amp_dtype")


def _as_trained(name: str) -> str:
    """Help text for an eval setting that defaults to the training run's value."""
    default = TrainingConfig.model_fields[name].default
    return f"Default: as trained, else {'off' if default is False else default}."


def _eval_settings(bundle, typed: dict[str, Any]) -> TrainingConfig:
    """The evaluation settings of the run that trained `bundle` (its training_args.json; the TrainingConfig
    defaults without one), with the flags the user typed on top, so that `eval` of the run's --eval-file
    computes what the run's own evaluation did."""
    from aios.bundle import TRAINING_ARGS

    trained = bundle.training_args()
    inherited = {name: trained[name] for name in _EVAL_SETTINGS if name in trained}
    base = TrainingConfig.from_dict(inherited, check_paths=False, source=str(bundle.root / TRAINING_ARGS))
    # Typed values are already checked by their options; `--no-amp` simply overrides an inherited dtype.
    return base.model_copy(update=typed)


@app.command("eval")
def eval_command(
    brain: Annotated[str, typer.Option("--brain", help="Bundle name under --bundle-dir, a bundle directory, or "
                                       "s3://BUCKET/PREFIX/NAME (pulled into <bundle-dir>/.remote/, endpoint: "
                                       "$AWS_ENDPOINT_URL).")],
    eval_file: Annotated[str, typer.Option("--eval-file", help="Text to evaluate on (.txt/.jsonl/.csv).")],
    eval_batches: Annotated[int | None, typer.Option(
        "--eval-batches", min=1, help=f"Batches to evaluate. {_as_trained('eval_batches')}")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help=f"Sequences per batch. {_as_trained('batch_size')}")] = None,
    text_field: Annotated[str | None, typer.Option(
        "--text-field", help=f".jsonl field / .csv column. {_as_trained('text_field')}")] = None,
    text_mode: Annotated[Literal["lines", "document"] | None, typer.Option(
        "--text-mode", help=f".txt: a sample per line, or one document. {_as_trained('text_mode')}")] = None,
    ascii_only: Annotated[bool | None, typer.Option(
        "--ascii-only/--no-ascii-only", show_default=False,
        help=f"Drop samples with non-ASCII characters. {_as_trained('ascii_only')}")] = None,
    amp: Annotated[bool | None, typer.Option(
        "--amp/--no-amp", show_default=False,
        help="Autocast (bf16, or --amp-dtype). Default: as trained, else auto: bf16 where the CPU or GPU computes "
        "it natively.")] = None,
    amp_dtype: Annotated[Literal["bf16", "fp16"] | None, typer.Option(
        "--amp-dtype", help=f"Autocast dtype (fp16 needs CUDA). {_as_trained('amp_dtype')}")] = None,
    data_cache_dir: Annotated[str, typer.Option("--data-cache-dir", help="Prepared-data cache.")]
    = DEFAULT_DATA_CACHE_DIR,
    bundle_dir: Annotated[str, typer.Option("--bundle-dir", help="Directory that holds brain bundles.")]
    = DEFAULT_BUNDLE_DIR,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device", help="Where to run.")] = "auto",
    experts: Annotated[str | None, typer.Option("--experts", metavar="ID[,ID]", help=_EXPERTS_HELP)] = None,
    experts_dir: Annotated[str, typer.Option("--experts-dir", help="Directory that holds experts.")]
    = DEFAULT_EXPERTS_DIR,
) -> None:
    """Loss, perplexity, token accuracy and ACT segments of a brain on a text file (prints JSON).

    "As trained" settings come from the bundle's training_args.json: text options, batches, autocast.
    So the run's --eval-file gives the numbers of the run's last eval record. Flags you type win.
    """
    import json

    from aios.data import PrepareOptions, flags, prepare_dataset, warn_unused_options
    from aios.data.sources import OPTION_SUFFIXES
    from aios.experts import parse_expert_ids
    from aios.inference import evaluate_lm
    from aios.train.precision import autocast_dtype, dtype_name

    bundle, model, tokenizer, dev = _load_brain(brain, bundle_dir, device, experts, experts_dir)
    typed = {name: value for name, value in dict(
        eval_batches=eval_batches, batch_size=batch_size, text_field=text_field, text_mode=text_mode,
        ascii_only=ascii_only, amp=amp, amp_dtype=amp_dtype).items() if value is not None}
    settings = _eval_settings(bundle, typed)
    options = PrepareOptions(max_seq_len=model.config.seq_len, chunk_size=settings.dataset_chunk_size,
                             text_mode=settings.text_mode, text_field=settings.text_field,
                             ascii_only=settings.ascii_only)
    try:
        data = prepare_dataset(eval_file, tokenizer, str(bundle.root), options, flags=flags.EVAL,
                               cache_dir=data_cache_dir)
    except AiosError as exc:
        raise AiosError(f"--eval-file: {exc}") from None
    typed_text_options = [name for name in OPTION_SUFFIXES if name in typed]  # not those taken from the brain
    warn_unused_options(options, [data], flags.EVAL, names=typed_text_options)
    amp_dtype_used = autocast_dtype(settings.amp, settings.amp_dtype, dev)
    result = evaluate_lm(model, data.sequential_batches(settings.batch_size, settings.eval_batches), dev,
                         amp_dtype_used)
    used = {name: getattr(settings, name) for name in ("text_mode", "text_field", "ascii_only", "batch_size",
                                                        "eval_batches")}
    used["autocast"] = dtype_name(amp_dtype_used)
    output = {"brain": bundle.name, "experts": parse_expert_ids(experts), "eval_file": eval_file, "settings": used,
              **result}
    typer.echo(json.dumps(output, indent=2))


def parse_cli_args(args: list[str]) -> TrainingConfig:
    """The TrainingConfig that `aios hrm-hf train-actv1 <args>` would train with, without training.

    Runs the real click parsing (types, choices, --config presets, parameter sources) in-process.
    """
    command = typer.main.get_command(app)
    try:
        config = command.main(
            args=["train-actv1", *args], prog_name="aios hrm-hf", standalone_mode=False, obj=_PARSE_ONLY
        )
    except ClickException as exc:
        raise AiosError(exc.format_message()) from None
    if not isinstance(config, TrainingConfig):  # e.g. --help, which prints and exits early
        raise AiosError(f"`train-actv1 {' '.join(args)}` did not produce a config; drop --help")
    return config
