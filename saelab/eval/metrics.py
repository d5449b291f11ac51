"""What an SAE's activations look like on held-out tokens: reconstruction and sparsity metrics.

Pure functions on tensors, and `MetricsAccumulator`, which computes the same numbers over many
batches without ever holding more than one batch of latents. Notation, for n tokens:

    x  [n, d]       activations at the hook (d = d_in)
    x̂  [n, d]       the SAE's reconstructions
    z  [n, d_sae]   its latents; latent i fires on token t when z_ti ≠ 0
    x̄  [d]          mean_t x_t, over the evaluated tokens

FVU is pooled over dimensions (the quantity the trainer minimises and logs as `fvu`, here on
held-out tokens); `explained_variance_per_dim` weighs every dimension equally instead, so a few
high-variance residual directions cannot dominate it. saelab reports both; the pooled one is the
headline number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from saelab.sae.config import DENSE_THRESHOLD

DENSITY_BIN_WIDTH = 0.25  # feature-density histogram bins, in log10(frequency)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖². x, x_hat: [n, d] → []."""
    x, x_hat = x.double(), x_hat.double()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Explained variance = 1 − FVU (pooled over dimensions). x, x_hat: [n, d] → []."""
    return 1 - fvu(x, x_hat)


def explained_variance_per_dim(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """mean_j [1 − Σ_t (x_tj − x̂_tj)² / Σ_t (x_tj − x̄_j)²] over the dimensions j with nonzero variance.

    x, x_hat: [n, d] → [].
    """
    x, x_hat = x.double(), x_hat.double()
    return _mean_explained_per_dim((x - x_hat).pow(2).sum(0), (x - x.mean(0)).pow(2).sum(0))


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per token: MSE = mean_t ‖x_t − x̂_t‖². x, x_hat: [n, d] → []."""
    return (x.double() - x_hat.double()).pow(2).sum(-1).mean()


def mse_per_element(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element: mean_{t,j} (x_tj − x̂_tj)² = MSE / d. x, x_hat: [n, d] → []."""
    return (x.double() - x_hat.double()).pow(2).mean()


def l0(latents: torch.Tensor) -> torch.Tensor:
    """Latents firing per token: L0_t = #{i : z_ti ≠ 0}. latents: [n, d_sae] → [n] int64."""
    return (latents != 0).sum(-1)


def l0_histogram(latents: torch.Tensor) -> torch.Tensor:
    """Tokens per L0 value: h[k] = #{t : L0_t = k}. latents: [n, d_sae] → [d_sae + 1] int64."""
    return torch.bincount(l0(latents), minlength=latents.shape[-1] + 1)


def firing_counts(latents: torch.Tensor) -> torch.Tensor:
    """Tokens each latent fires on: c_i = #{t : z_ti ≠ 0}. latents: [n, d_sae] → [d_sae] int64."""
    return (latents != 0).sum(0)


def dead_latents(counts: torch.Tensor) -> torch.Tensor:
    """Latents that never fired over the evaluated tokens: c_i = 0. counts: [d_sae] → [d_sae] bool."""
    return counts == 0


def dense_latents(counts: torch.Tensor, n_tokens: int, threshold: float = DENSE_THRESHOLD) -> torch.Tensor:
    """Latents that fire on more than `threshold` of the tokens: c_i / n > threshold. → [d_sae] bool."""
    return counts / n_tokens > threshold


def feature_density_histogram(
    counts: torch.Tensor, n_tokens: int, bin_width: float = DENSITY_BIN_WIDTH
) -> dict[str, Any]:
    """Histogram of log10(c_i / n) over the latents that fired; dead latents (log10 0 = −∞) counted apart.

    Bins are `bin_width` wide on a fixed grid (multiples of `bin_width`) from the one holding
    log10(1/n), the rarest possible firing, up to 0; the last bin includes its right edge (frequency 1).
    Returns `{"log10_frequency_edges": [B + 1], "counts": [B], "n_dead": int}`.
    """
    counts = counts.detach().cpu().double().numpy()
    alive = counts[counts > 0]
    low = min(-bin_width, math.floor(math.log10(1 / n_tokens) / bin_width - 1e-9) * bin_width)
    n_bins = round(-low / bin_width)
    edges = np.linspace(low, 0.0, n_bins + 1)
    histogram, _ = np.histogram(np.log10(alive / n_tokens), bins=edges)
    return {
        "log10_frequency_edges": [round(float(edge), 6) for edge in edges],
        "counts": histogram.tolist(),
        "n_dead": int((counts == 0).sum()),
    }


def _mean_explained_per_dim(residual: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """mean_j (1 − residual_j / variance_j) over the j with variance_j > 0; residual, variance: [d]."""
    varying = variance > 0
    return (1 - residual[varying] / variance[varying]).mean()


class MetricsAccumulator:
    """Every metric above over a stream of batches, in memory O(d + d_sae).

    Kept per dimension j, in float64: the token count, the running mean x̄_j and M2_j = Σ_t (x_tj − x̄_j)²
    (merged batch by batch with Chan et al.'s parallel formula, which stays exact where Σx² − n·x̄²
    would cancel), and Σ_t (x_tj − x̂_tj)²; per latent, how many tokens it fired on; the L0 histogram.
    `result()` equals the one-shot functions applied to all the batches concatenated.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        device: torch.device | str = "cpu",
        dense_threshold: float = DENSE_THRESHOLD,
        density_bin_width: float = DENSITY_BIN_WIDTH,
    ) -> None:
        self.dense_threshold = dense_threshold
        self.density_bin_width = density_bin_width
        self.n_tokens = 0
        self.mean = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.squared_error = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.int64, device=device)
        self.firing_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, reconstruction: torch.Tensor, latents: torch.Tensor) -> None:
        """Add a batch: x, reconstruction: [n, d_in]; latents: [n, d_sae] (leading dims are flattened)."""
        x = x.reshape(-1, self.mean.shape[0]).to(self.mean.device, torch.float64)
        reconstruction = reconstruction.reshape(x.shape).to(self.mean.device, torch.float64)
        latents = latents.reshape(-1, self.firing_counts.shape[0]).to(self.mean.device)
        n, before = len(x), self.n_tokens
        if n == 0:
            return
        batch_mean = x.mean(0)
        delta = batch_mean - self.mean
        self.m2 += (x - batch_mean).pow(2).sum(0) + delta.pow(2) * (before * n / (before + n))
        self.mean += delta * (n / (before + n))
        self.squared_error += (x - reconstruction).pow(2).sum(0)
        self.l0_counts += l0_histogram(latents)
        self.firing_counts += firing_counts(latents)
        self.n_tokens += n

    def result(self) -> dict[str, Any]:
        """The metrics as plain numbers (see each function above for its formula)."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were added to the MetricsAccumulator")
        n, d_in, d_sae = self.n_tokens, self.mean.shape[0], self.firing_counts.shape[0]
        unexplained = float(self.squared_error.sum() / self.m2.sum())
        dead = dead_latents(self.firing_counts)
        dense = dense_latents(self.firing_counts, n, self.dense_threshold)
        l0_counts = self.l0_counts.cpu()
        return {
            "n_tokens": n,
            "fvu": unexplained,
            "explained_variance": 1 - unexplained,
            "explained_variance_per_dim": float(_mean_explained_per_dim(self.squared_error, self.m2)),
            "mse": float(self.squared_error.sum() / n),
            "mse_per_element": float(self.squared_error.sum() / (n * d_in)),
            "l0": int((l0_counts * torch.arange(d_sae + 1)).sum()) / n,
            "l0_histogram": {str(k): int(c) for k, c in enumerate(l0_counts.tolist()) if c},
            "n_dead": int(dead.sum()),
            "dead_fraction": float(dead.sum()) / d_sae,
            "n_dense": int(dense.sum()),
            "dense_fraction": float(dense.sum()) / d_sae,
            "dense_threshold": self.dense_threshold,
            "feature_density": feature_density_histogram(self.firing_counts, n, self.density_bin_width),
        }
