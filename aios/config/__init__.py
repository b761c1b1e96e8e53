"""Typed, validated configuration: `TrainingConfig` is the single source of truth for a training run."""

from aios.config.training import (
    GROUPS,
    TrainingConfig,
    field_choices,
    field_group,
    flag_name,
    format_validation_error,
    negative_flag_name,
    read_yaml_settings,
)

__all__ = [
    "GROUPS",
    "TrainingConfig",
    "field_choices",
    "field_group",
    "flag_name",
    "format_validation_error",
    "negative_flag_name",
    "read_yaml_settings",
]
