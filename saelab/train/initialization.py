"""Data-dependent initialisation: the input scale and the decoder bias (geometric median)."""

from __future__ import annotations

import torch


def input_scale(sample: torch.Tensor) -> float:
    """The factor s with E‖x·s‖² = d_in, so hyperparameters transfer across models and layers."""
    return float((sample.shape[1] / sample.pow(2).sum(-1).mean()).sqrt())


def geometric_median(points: torch.Tensor, iterations: int = 100, tolerance: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points: [n, d]`.

    Gao et al. start b_dec here: unlike the mean it is not dragged by outlier activations.
    """
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=-1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() <= tolerance * median.norm().clamp_min(1e-8):
            return updated
        median = updated
    return median
