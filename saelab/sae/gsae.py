"""g-SAE (Olmo et al. 2024, "Features that Make a Difference"): TopK that prefers latents the loss cares about.

With g = ∂L/∂x for the token (the downstream loss's gradient at the SAE's input) and unit-norm
decoder rows d_i:

    z      = relu(u)
    ĝ      = g / ‖g‖                          (0 for a token whose gradient is 0)
    score  = z + β · z · |ĝ · d_i|            |cos(d_i, g)|, as ‖d_i‖ = 1
    z'     = z at the top-k of score, 0 elsewhere

The gradient changes only which latents fire, never their values. β = 0 or no gradient is exactly
TopK; a large β ranks latents by z·|cos(d_i, g)|, the first-order effect of the latent on the loss.
"""

from __future__ import annotations

import torch

from saelab.kernels import RowTopK
from saelab.kernels.encode import SelectionRule
from saelab.kernels.selection import ScoreHook
from saelab.sae.topk import TopKSAE


class GradientTopKSAE(TopKSAE):
    """k latents per token, chosen by activation and by alignment of their decoder row with the loss gradient."""

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
        norm = gradient.norm(dim=-1, keepdim=True)
        g_hat = (gradient / norm.clamp_min(torch.finfo(norm.dtype).tiny)).to(self.W_dec.dtype)  # zero rows stay 0
        decoder = self.W_dec.detach()

        def score(pre: torch.Tensor, start: int) -> torch.Tensor:
            z = pre.relu()
            alignment = (g_hat @ decoder[start : start + pre.shape[-1]].T).abs()
            return z + self.cfg.beta * z * alignment

        return score
