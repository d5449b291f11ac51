"""g-SAE (Olmo et al. 2024, "Features that Make a Difference"): TopK that prefers latents the loss cares about.

With g = ∂L/∂x for the token (the downstream loss's gradient at the SAE's input) and unit-norm
decoder rows d_i, the paper's score is z + β·z·|d_i · g|. saelab normalises g per token:

    z      = relu(u)
    ĝ      = √d_in · g / ‖g‖                  (0 for a token whose gradient is 0)
    score  = z + β · z · |ĝ · d_i|            = z·(1 + β·√d_in·|cos(d_i, g)|), as ‖d_i‖ = 1
    z'     = z at the top-k of score, 0 elsewhere

Why √d_in: for a direction unrelated to g, |cos(d_i, g)| averages √(2/(π·d_in)) (0.033 at d_in 576),
so with a unit ĝ the term moved a latent's score by ~3 % at β = 1 and reordered almost nothing
(g-SAE was TopK in all but name). Scaled by √d_in the unrelated latents' term averages √(2/π) ≈ 0.8·β
and an aligned one's is several times that, so β = 1 is a real trade-off between activation and
effect on the loss, the same on any model. Normalising per token (rather than keeping ‖g‖) makes β
independent of the model's loss scale and of how sure the model is at each token.

The gradient changes only which latents fire, never their values. β = 0 or no gradient is exactly
TopK; a large β ranks latents by z·|cos(d_i, g)|, the first-order effect of the latent on the loss.
"""

from __future__ import annotations

import torch

from saelab.kernels import RowTopK
from saelab.kernels.encode import SelectionRule
from saelab.kernels.selection import ScoreHook
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register
from saelab.sae.topk import TopKSAE


class GradientTopKSAE(TopKSAE):
    """k latents per token, chosen by activation and by alignment of their decoder row with the loss gradient."""

    architecture = "gsae"
    config_keys = ("k", "beta")
    trains_on_gradients = True
    loads_saelens = ()  # SAELens's topk folders load as TopK
    saelens_note = (
        "g-SAE: its gradient-aware selection needs the loss gradient; without one (as here) it is exactly TopK."
    )

    @classmethod
    def selects_with_gradient(cls, cfg: SAEConfig) -> bool:
        return cfg.beta > 0

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """u: [..., d_sae], gradient: [..., d_in] (model units; only its direction is used) → z: [..., d_sae]."""
        if gradient is None or self.cfg.beta == 0:
            return super().select(pre_activations)
        z = pre_activations.relu()
        with torch.no_grad():  # selection is discrete: no gradient flows through the score
            score = self._score(gradient)(pre_activations, 0)
        indices = score.topk(self.cfg.k, dim=-1).indices
        return torch.zeros_like(z).scatter(-1, indices, z.gather(-1, indices))

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        if gradient is None or self.cfg.beta == 0:
            return RowTopK(self.cfg.k)
        return RowTopK(self.cfg.k, score=self._score(gradient))

    def _score(self, gradient: torch.Tensor) -> ScoreHook:
        """The selection hook: score(u_tile, start) = z + β·z·|ĝ · d_i| for the tile's latents."""
        norm = gradient.norm(dim=-1, keepdim=True) / self.cfg.d_in**0.5
        g_hat = (gradient / norm.clamp_min(torch.finfo(norm.dtype).tiny)).to(self.W_dec.dtype)  # zero rows stay 0
        decoder = self.W_dec.detach()

        def score(pre: torch.Tensor, start: int) -> torch.Tensor:
            z = pre.relu()
            alignment = (g_hat @ decoder[start : start + pre.shape[-1]].T).abs()
            return z + self.cfg.beta * z * alignment

        return score


register(GradientTopKSAE)
