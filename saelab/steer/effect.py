"""How far adding one latent's direction moves a model: g-SAE's steering measure (Olmo et al. 2024).

For each latent, add α·d_i/‖d_i‖ (its decoder direction in model units) at every position ≥ 1 of some
contexts, and measure the mean KL(steered ‖ clean) per predicted token and the mean rise in
log-probability of the 5 tokens that the direction pushes up most (its logit effects).
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.analysis.logit_effects import decoder_directions, final_norm_weight, logit_effects
from saelab.sae import SparseAutoencoder

PROMOTED_TOKENS = 5


@torch.inference_mode()
def steering_effect(
    model: Any, sae: SparseAutoencoder, hook: str, contexts: torch.Tensor, latents: list[int], alpha: float
) -> tuple[float, float]:
    """(mean KL(steered ‖ clean) per prediction, mean Δ log p of each latent's promoted tokens) over `latents`;
    contexts: [n, seq] token ids."""
    weight, center = final_norm_weight(model)
    directions = decoder_directions(sae)[latents]
    promoted = logit_effects(directions, weight, model.W_U, k=PROMOTED_TOKENS, center=center).top_ids
    clean = torch.log_softmax(model(contexts)[:, :-1].float(), -1)
    kls, rises = [], []
    for direction, tokens in zip(directions, promoted, strict=True):

        def add(x: torch.Tensor, hook: Any, direction: torch.Tensor = direction) -> torch.Tensor:
            x = x.clone()
            x[:, 1:] += alpha * direction / direction.norm()
            return x

        with model.hooks(fwd_hooks=[(hook, add)]):
            steered = torch.log_softmax(model(contexts)[:, :-1].float(), -1)
        kls.append(float((steered.exp() * (steered - clean)).sum(-1).mean()))
        rises.append(float((steered[..., tokens] - clean[..., tokens]).mean()))
    return sum(kls) / len(kls), sum(rises) / len(rises)
