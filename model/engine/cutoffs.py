"""The ranges of transformers' sampling cutoffs (typical_p, epsilon_cutoff, eta_cutoff), checked
without torch: the driver checks a job's before any work (model.engine.sampler applies them)."""
from __future__ import annotations


def check_cutoffs(typical_p: float, epsilon_cutoff: float, eta_cutoff: float) -> None:
    """ValueError for a cutoff out of transformers' range (NaN included)."""
    if not 0 < typical_p <= 1:
        raise ValueError(f"typical_p must be in (0, 1] (1: none), got {typical_p}")
    for name, value in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1) (0: none), got {value}")
