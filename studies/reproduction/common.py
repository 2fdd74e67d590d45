"""Settings shared by the study's modules, and the one SMD formula under test."""

from __future__ import annotations

import math

from lightning_sdm.theory._predictions import (
    relaxation_steps,
)


def lr_decay_relaxation_steps(k: float, lr: float, weight_decay: float, momentum: float) -> int:
    """SMD Cor. 3.1, the claim under test: ``ceil(ln(k) (1 - m) / (2 wd lr))`` steps after a
    decay by ``k`` (``lr`` after the decay), i.e. two of theory's time constants per e-fold of k.
    """
    return math.ceil(2 * relaxation_steps(lr, weight_decay, momentum) * math.log(k))


EVERY = 16  # optimizer steps per logged window; every step is measured (window = EVERY)
AUTO_WINDOW = 48  # window of the callback that decays the LR at equilibrium (experiment 2)
EXPERIMENTS = ("equilibrium", "decay", "scaling", "channel")
