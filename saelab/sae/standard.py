"""The standard ReLU SAE with an L1 penalty: the classic baseline, as Anthropic's April 2024 update trains it.

    u = (x' − b_dec) W_enc + b_enc
    z = relu(u)
    x̂ = z W_dec + b_dec                                    (in the SAE's space; `base.py` maps units)
    loss = (‖x' − x̂‖² + λ_t · Σ_i z_i ‖d_i‖) / Var(x')      λ_t = λ · min(1, t / (warm-up · steps))

The decoder rows d_i are free: the penalty weighs each activation by its row's norm, so shrinking z_i
while growing d_i gains nothing, and no renormalisation is needed. The rows start at norm 0.1 and
W_enc at W_decᵀ (the update's initialisation); λ warms up over the first `penalty_warmup` of the run
(5 %), so the latents find directions before the penalty silences the weak ones.

In training every pair with u > 0 is kept (`AboveThreshold(0)`); early on that is half the latents of
every token, which the sparse kernels handle as padded rows, as dense as the dense product.
"""

from __future__ import annotations

import torch

from saelab.kernels import AboveThreshold
from saelab.kernels.encode import SelectionRule
from saelab.kernels.sparse_ops import gather_latents
from saelab.sae.base import SparseAutoencoder, SparseOutput
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register

# Anthropic's April 2024 update starts every decoder row at a small norm (0.05–1 by the model; 0.1 here).
DECODER_INIT_NORM = 0.1


class L1Penalised:
    """What an SAE trained with a warmed-up L1 penalty shares (standard, Gated, transcoders): its keys and
    how its sparsity setting is shown."""

    config_keys = ("l1_coefficient", "penalty_warmup")

    @classmethod
    def sparsity_label(cls, cfg: SAEConfig) -> str:
        return f"l1c{cfg.l1_coefficient:g}"

    @classmethod
    def sparsity_in_words(cls, cfg: SAEConfig) -> str:
        return f"L1 coefficient {cfg.l1_coefficient:g}"


class StandardSAE(L1Penalised, SparseAutoencoder):
    """z = relu(u); an L1 penalty weighted by decoder norms (`SAEConfig.l1_coefficient`)."""

    architecture = "standard"
    saelens_architecture = "standard"
    loads_saelens = ("standard",)
    unit_norm_decoder = False
    decoder_init_norm = DECODER_INIT_NORM
    fast_per_latent = True

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """u: [..., d_sae] → relu(u)."""
        return pre_activations.relu()

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return AboveThreshold(0.0)

    def penalty(self, out: SparseOutput, coefficient_scale: float = 1.0) -> torch.Tensor:
        """λ_t · mean over tokens of Σ_i z_i ‖d_i‖ (padded slots hold z = 0)."""
        return self.cfg.l1_coefficient * coefficient_scale * weighted_l1(out.indices, out.values, self.W_dec)


def weighted_l1(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """mean_b Σ_j |values[b, j]| · ‖W_dec[indices[b, j]]‖ for sparse rows ([batch, k']); differentiable."""
    return (values.abs() * gather_latents(W_dec.norm(dim=1), indices)).sum(-1).mean()


register(StandardSAE)
