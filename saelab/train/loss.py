"""The training losses: normalised MSE (= FVU on the batch) and AuxK for dead latents (Gao et al. 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from saelab.sae.base import SparseAutoencoder, TokenNorm

if TYPE_CHECKING:
    from saelab.distributed import DataParallel


def normalized_mse(
    reconstruction: torch.Tensor, target: torch.Tensor, data_parallel: DataParallel | None = None
) -> torch.Tensor:
    """‖x̂ − x‖² / ‖x − mean(x)‖², averaged over the batch: 1.0 is no better than predicting the mean.

    With `data_parallel` the batch is the global one (every rank's rows): see `_global_normalized_mse`.
    """
    if data_parallel is not None:
        return _global_normalized_mse(reconstruction, target, data_parallel)
    # mse_loss: one pass over the batch forward and one backward (the spelled-out square: measured ~1.5× slower)
    error = F.mse_loss(reconstruction, target, reduction="sum") / len(target)
    return error / batch_variance(target)


def batch_variance(target: torch.Tensor, data_parallel: DataParallel | None = None) -> torch.Tensor:
    """‖y − ȳ‖² per token of the batch `target: [batch, d]` (data-parallel: the global batch's), detached,
    at least 1e-12: the denominator of FVU, which the trainer also divides a variant's penalty by."""
    target = target.detach()
    if data_parallel is None:
        return (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    n = len(target) * data_parallel.world_size
    mean = data_parallel.sum(target.sum(0)) / n
    return (data_parallel.sum((target - mean).pow(2).sum()) / n).clamp_min(1e-12)


def _global_normalized_mse(
    reconstruction: torch.Tensor, target: torch.Tensor, data_parallel: DataParallel
) -> torch.Tensor:
    """This rank's share of the global batch's normalised MSE: Σ_rank ‖x̂ − x‖² / (N · baseline).

    N, mean(x) and the baseline are the global batch's (ranks hold equal slices; the target carries
    no gradient), so the shares add up to the loss of the concatenated batch and the gradients,
    summed over ranks, are its gradient.
    """
    target = target.detach()
    n = len(target) * data_parallel.world_size
    return (reconstruction - target).pow(2).sum() / n / batch_variance(target, data_parallel)


def auxk_loss(
    sae: SparseAutoencoder,
    pre_activations: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    data_parallel: DataParallel | None = None,
    norm: TokenNorm | None = None,
) -> torch.Tensor:
    """Let the top-`k_aux` dead latents reconstruct the main reconstruction's residual.

    The dense reference of the AuxK term that `train_step` computes through the sparse kernels.

    pre_activations: [batch, d_sae]; residual: x − x̂, detached, [batch, d_in]; dead: [d_sae] bool;
    norm: the tokens' `sae.token_norm(x)` (needed for input_norm layer_norm).
    Zero when nothing is dead, so it only acts while latents need reviving.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre_activations.new_zeros(())
    dead_pre = pre_activations.masked_fill(~dead, float("-inf"))
    values, indices = dead_pre.topk(min(k_aux, n_dead), dim=-1)
    aux_latents = torch.zeros_like(pre_activations).scatter(-1, indices, values.relu())
    norm = norm or sae.scale_norm()
    aux_reconstruction = norm.direction(aux_latents @ sae.W_dec)  # directions only: no decoder bias
    return normalized_mse(aux_reconstruction, residual, data_parallel)
