"""Slow, obviously-correct reference for the angular update, used to check the fast path.

It projects ``curr`` onto the unit vector of ``prev`` in extended precision (numpy ``longdouble``:
80-bit on x86) and takes ``atan2(|orthogonal part|, along)``. Two passes, a different formula and
more precision than :mod:`lightning_sdm.functional`: agreement between the two is evidence, not
tautology.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def reference_angle(prev: torch.Tensor, curr: torch.Tensor) -> float:
    p = prev.detach().double().cpu().numpy().astype(np.longdouble).ravel()
    c = curr.detach().double().cpu().numpy().astype(np.longdouble).ravel()
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(c))):
        return math.nan
    p_norm = np.sqrt(np.sum(p * p))
    c_norm = np.sqrt(np.sum(c * c))
    if p_norm == 0 or c_norm == 0:
        return math.nan
    unit = p / p_norm
    along = np.sum(unit * c)
    orthogonal = c - along * unit
    return float(np.arctan2(np.sqrt(np.sum(orthogonal * orthogonal)), along))


def reference_angles(prev: torch.Tensor, curr: torch.Tensor, dim: int | None) -> list[float]:
    if dim is None:
        return [reference_angle(prev, curr)]
    return [
        reference_angle(p, c)
        for p, c in zip(prev.movedim(dim, 0), curr.movedim(dim, 0), strict=True)
    ]


def rotated(
    prev: torch.Tensor, angle: float, norm_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """``prev`` rotated by ``angle`` in a random plane, scaled by ``norm_ratio`` (float64)."""
    p = prev.double().ravel()
    unit = p / p.norm()
    direction = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    direction -= (direction @ unit) * unit
    direction /= direction.norm()
    curr = norm_ratio * p.norm() * (math.cos(angle) * unit + math.sin(angle) * direction)
    return curr.reshape(prev.shape).to(prev.dtype)
