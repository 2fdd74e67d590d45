"""Before step 1: what theory predicts for these settings and schedule, and set-ups at odds with it.

:func:`advise` samples each param group's LR schedule over the budget (``_schedule``) and says
per phase what the angular update and the relaxation time will be; :func:`audit_param_groups`
finds param-group set-ups that break the predictions (an invariant weight without decay, Adam
with L2 decay, a unit split across groups, ...).
"""

from lightning_sdm.advice._advice import Advice, GroupAdvice, Phase, advise
from lightning_sdm.advice._audit import Finding, FindingKind, audit_param_groups
from lightning_sdm.advice._schedule import LRTrajectory, ScheduledLR, sample_learning_rates

__all__ = [
    "Advice",
    "Finding",
    "FindingKind",
    "GroupAdvice",
    "LRTrajectory",
    "Phase",
    "ScheduledLR",
    "advise",
    "audit_param_groups",
    "sample_learning_rates",
]
