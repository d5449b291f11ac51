"""The training losses: normalised MSE (= FVU on the batch) and AuxK for dead latents (Gao et al. 2024)."""

from __future__ import annotations

import torch

from saelab.sae.base import SparseAutoencoder


def normalized_mse(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖x̂ − x‖² / ‖x − mean(x)‖², averaged over the batch: 1.0 is no better than predicting the mean."""
    error = (reconstruction - target).pow(2).sum(-1).mean()
    baseline = (target - target.mean(0)).pow(2).sum(-1).mean()
    return error / baseline.clamp_min(1e-12)


def auxk_loss(
    sae: SparseAutoencoder, pre_activations: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """Let the top-`k_aux` dead latents reconstruct the main reconstruction's residual.

    The dense reference of the AuxK term that `train_step` computes through the sparse kernels.

    pre_activations: [batch, d_sae]; residual: x − x̂, detached, [batch, d_in]; dead: [d_sae] bool.
    Zero when nothing is dead, so it only acts while latents need reviving.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre_activations.new_zeros(())
    dead_pre = pre_activations.masked_fill(~dead, float("-inf"))
    values, indices = dead_pre.topk(min(k_aux, n_dead), dim=-1)
    aux_latents = torch.zeros_like(pre_activations).scatter(-1, indices, values.relu())
    aux_reconstruction = aux_latents @ sae.W_dec / sae.input_scale  # directions only: no decoder bias
    return normalized_mse(aux_reconstruction, residual)
