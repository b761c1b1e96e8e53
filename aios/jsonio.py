"""Strict JSON for everything aios writes (metrics.jsonl, training_args.json, metadata, checkpoints).

Python's json writes NaN and Infinity as bare words, which are not JSON: other tools (jq, browsers, pandas
with the default engine) refuse the file. Non-finite floats become null instead, and `allow_nan=False`
makes any that slip through an error rather than a silently invalid file.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (nested in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps of `value` with non-finite floats as null; never writes NaN or Infinity."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
