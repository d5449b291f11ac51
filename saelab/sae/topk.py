"""TopK SAEs: a fixed number of latents per token (TopK) or per batch (BatchTopK).

TopK (Gao et al. 2024), per token:
    z = relu(u);  keep the k largest entries of each row of z, zero the rest

BatchTopK (Bussmann et al. 2024), per batch in training, a threshold at inference:
    training:  keep the batch·k largest entries of relu(u) over the whole batch
               θ = Σ_t λ^(T−t) m_t / Σ_t λ^(T−t)     m_t: step t's smallest kept value > 0, λ = THRESHOLD_DECAY
    inference: z = relu(u) · 1[u > θ]                              (a JumpReLU with threshold θ)

BatchTopK's `input_norm` defaults to layer_norm (`SAEConfig`): the batch-wide budget then goes to the
latents that stand out within their token, not to the tokens of largest norm.

θ is an exponentially weighted mean with its weight total kept beside it (`threshold_weight`
= Σ_t λ^(T−t)(1 − λ) = 1 − λ^T), i.e. Adam's bias-corrected moving average: no observation weighs
more than its share, unlike a plain EMA started at 0 (which SAELens uses and which is far too low
after a short run) or at the first observation (whose weight λ^T is never forgotten early enough).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saelab.kernels import AboveThreshold, BatchTopK, RowTopK
from saelab.kernels.encode import SelectionRule
from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

# θ's memory, ~1/(1 − λ) = 10 steps. SAELens's BatchTopKTrainingSAE uses 0.99 (`topk_threshold_lr` 0.01),
# dictionary_learning 0.999: both made for long runs. The batch cutoff falls while the encoder learns, so
# a long memory lags it: after the default 150-step SmolLM2 run, λ = 0.99 left θ at 1.254 against the
# final batches' cutoffs of 1.153–1.158, and the held-out L0 at 25.6 instead of 32. The cutoffs of
# successive batches agree to 0.5 %, so a short memory costs no noise.
THRESHOLD_DECAY = 0.9


class TopKSAE(SparseAutoencoder):
    """Exactly k latents per token, each ≥ 0 (fewer nonzero only when fewer than k pre-activations are > 0)."""

    architecture = "topk"
    config_keys = ("k",)
    revives_with_auxk = True
    saelens_architecture = "topk"
    loads_saelens = ("topk",)

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """u: [..., d_sae] → z: same shape, the k largest of relu(u) per row and zeros elsewhere."""
        z = pre_activations.relu()
        top = z.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, top.indices, top.values)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return RowTopK(self.cfg.k)


class BatchTopKSAE(SparseAutoencoder):
    """k latents per token on average over a training batch; a fixed threshold θ at inference (eval mode).

    `threshold` [d_sae] holds θ in every entry (BatchTopK learns one θ); it is a vector so that SAELens's
    JumpReLU SAEs, whose thresholds differ per latent, load into this class and run exactly in eval mode.
    """

    architecture = "batchtopk"
    config_keys = ("k",)
    revives_with_auxk = True
    normalises_input_by_default = True  # the batch's budget goes to what stands out within a token (module docstring)
    saelens_architecture = "jumprelu"
    saelens_note = "BatchTopK: at inference a JumpReLU with the threshold learned in training, as in SAELens."
    threshold: torch.Tensor
    threshold_weight: torch.Tensor  # [] 1 − λ^T after T observations: how much of θ is data

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("threshold_weight", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # Saved before θ was bias-corrected (saelab ≤ 0.x): that θ is taken as a complete estimate.
        state_dict.setdefault(prefix + "threshold_weight", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """u: [batch, d_sae] → z: same shape. Training mode also moves θ (see the module docstring)."""
        z = pre_activations.relu()
        if not self.training:
            return z * (pre_activations > self.threshold)
        flat = z.flatten()
        n_kept = min(flat.numel(), self.cfg.k * (flat.numel() // z.shape[-1]))
        top = flat.topk(n_kept, sorted=False)
        self._update_threshold(top.values.detach())
        return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(z)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return BatchTopK(self.cfg.k) if self.training else AboveThreshold(self.threshold)

    def selected_(self, indices: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        if self.training:
            self._update_threshold(values.flatten())

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        weights["threshold"] = self.threshold.double()

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        super().from_saelens_(tensors, fold_in, fold_out)
        self.threshold.copy_(tensors["threshold"])

    @torch.no_grad()
    def synchronize_(self, parallel: DataParallel) -> None:
        """Each rank keeps the top k·(its rows) of its own slice, and θ moves toward the mean over ranks of
        each rank's smallest kept value (θ's update is linear in the observation, so averaging the updated
        θs is exactly that). The rule, stated and tested: the same as 1-rank BatchTopK whose batch-level
        top-k runs per slice. Not the global top-k."""
        parallel.sum_(self.threshold).div_(parallel.world_size)

    @torch.no_grad()
    def fit_threshold(self, x: torch.Tensor, l0: float | None = None) -> float:
        """Set θ so that the tokens x: [n, d_in] average `l0` (default k) latents in eval mode; returns θ.

        θ from training is the training batches' cutoff; text unlike the training tokens clears it more
        or less often (SmolLM2's held-out text: L0 35.1 for k 32). Fitted on text like the test's, θ
        gives the equal-L0 comparison the BatchTopK paper makes (`benchmarks/batchtopk_l0.py`).
        """
        l0 = self.cfg.k if l0 is None else l0
        n_kept = round(l0 * x.shape[0])
        pre = self.pre_activations(x).flatten()
        if not 0 < n_kept < pre.numel():
            raise ValueError(f"l0: {l0} latents per token is outside (0, d_sae {self.cfg.d_sae}) for {len(x)} tokens")
        # θ halfway between the last value kept and the first dropped: exactly n_kept values lie above it.
        last_kept, first_dropped = pre.topk(n_kept + 1).values[-2:]
        theta = float((last_kept + first_dropped) / 2)
        self.threshold.fill_(theta)
        self.threshold_weight.fill_(1.0)
        return theta

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """Add min(kept values > 0) to θ's weighted mean; nothing when no value was positive. No host sync."""
        smallest = torch.where(kept > 0, kept, torch.inf).min().to(self.threshold.dtype)
        seen = torch.isfinite(smallest)
        share = 1 - THRESHOLD_DECAY
        weight = self.threshold_weight * THRESHOLD_DECAY + share
        updated = (self.threshold * self.threshold_weight * THRESHOLD_DECAY + share * smallest) / weight
        self.threshold.copy_(torch.where(seen, updated, self.threshold))
        self.threshold_weight.copy_(torch.where(seen, weight, self.threshold_weight))


register(TopKSAE)
register(BatchTopKSAE)
