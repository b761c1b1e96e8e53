"""Models trained by aios."""

from aios.models.hrm_act_v1 import (
    IGNORE_LABEL_ID,
    ACTCarry,
    HRMACTv1,
    HRMACTv1Config,
    act_loss,
    shift_labels,
)

__all__ = ["IGNORE_LABEL_ID", "ACTCarry", "HRMACTv1", "HRMACTv1Config", "act_loss", "shift_labels"]
