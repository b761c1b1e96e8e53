"""Which command-line flag sets each input of data preparation, so that every hint names a real flag.

The data code is shared by three commands whose flags differ: `aios hrm-hf train-actv1` has no holdout
flag, `aios data prepare` calls its cache `--cache-dir`, `aios hrm-hf eval` reads `--eval-file` with the
model's sequence length. The caller passes its `DataFlags`; an error's fix offers only the flags that are
set (None: this command gives the user no way to change that input), always next to one that needs no flag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DataFlags:
    """The flag of one command that sets each input of `prepare_dataset`, or None where it has none."""

    source: str
    max_seq_len: str | None
    chunk_size: str | None
    text_mode: str | None
    text_field: str | None
    ascii_only: str | None
    holdout_fraction: str | None
    cache_dir: str | None
    tokenizer: str | None

    def for_source(self, flag: str) -> DataFlags:
        """The same flags for another source of the same command (e.g. train-actv1's --eval-file)."""
        return replace(self, source=flag)


def either(*fixes: str | None) -> str:
    """The fixes that apply, as one phrase: "a, b or c" (None entries are left out)."""
    kept = [fix for fix in fixes if fix]
    if len(kept) <= 1:
        return "".join(kept)
    return ", ".join(kept[:-1]) + " or " + kept[-1]


# `aios hrm-hf train-actv1` (options generated from TrainingConfig): the training text. Its evaluation
# text, `--eval-file`, is `TRAIN.for_source("--eval-file")`. Training always holds out HOLDOUT_FRACTION.
TRAIN = DataFlags(
    source="--dataset-file",
    max_seq_len="--max-seq-len",
    chunk_size="--dataset-chunk-size",
    text_mode="--text-mode",
    text_field="--text-field",
    ascii_only="--ascii-only",
    holdout_fraction=None,
    cache_dir="--data-cache-dir",
    tokenizer="--model",
)

# `aios data prepare`.
PREPARE = replace(TRAIN, holdout_fraction="--holdout-fraction", cache_dir="--cache-dir")

# `aios hrm-hf eval`: the sequence length is the model's, the tokenizer the bundle's.
EVAL = DataFlags(
    source="--eval-file",
    max_seq_len=None,
    chunk_size=None,
    text_mode="--text-mode",
    text_field="--text-field",
    ascii_only="--ascii-only",
    holdout_fraction=None,
    cache_dir="--data-cache-dir",
    tokenizer=None,
)
