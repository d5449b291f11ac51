"""One training step of one SAE: forward, loss, backward, the decoder-norm constraint, Adam.

loss = FVU(x̂, x) + α · AuxK         (TopK family; GBA trains on FVU alone)
∇W_dec ← ∇W_dec − (∇W_dec · d̂) d̂   (no gradient along a decoder row…)
Adam step; W_dec rows ← unit norm     (…because the renormalisation would undo it)
GBA: observe pre-activations, adapt the encoder biases every `update_tokens` tokens

Data-parallel (`data_parallel`, under torchrun): x is this rank's slice of the global batch; the
losses are this rank's shares of the global batch's, and the gradients are summed over ranks before
the step, so every rank takes the step 1-rank training takes on the concatenated batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from saelab.sae.base import SparseAutoencoder
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.loss import auxk_loss, normalized_mse

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

TOPK_FAMILY = ("topk", "batchtopk", "gsae")


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    gradient: torch.Tensor | None,
    tracker: DeadLatentTracker,
    aux_alpha: float,
    k_aux: int,
    autocast_dtype: torch.dtype | None = None,
    data_parallel: DataParallel | None = None,
) -> dict[str, float]:
    """x, gradient: [batch, d_in]. Returns the step's metrics (data-parallel: this rank's shares)."""
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        out = sae(x, gradient)
    reconstruction = out.reconstruction.float()
    fvu = normalized_mse(reconstruction, x, data_parallel)
    aux = torch.zeros(())
    if sae.cfg.architecture in TOPK_FAMILY:
        residual = (x - reconstruction).detach()
        aux = auxk_loss(sae, out.pre_activations.float(), residual, tracker.dead, k_aux, data_parallel)
    loss = fvu + aux_alpha * aux

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if data_parallel is not None:
        data_parallel.sum_gradients_(sae)
    sae.remove_decoder_parallel_grad_()
    optimizer.step()
    sae.normalize_decoder_()

    tracker.update(out.latents)
    metrics = {"loss": loss.item(), "fvu": fvu.item(), "aux_loss": aux.item(), "l0": _l0(out.latents)}
    if sae.cfg.architecture == "gba":
        sae.observe(out.pre_activations.detach().float(), data_parallel)
        if sae.adaptation_due():
            metrics.update(sae.adapt_biases())
    return metrics


def _l0(latents: torch.Tensor) -> float:
    """Mean number of latents firing per token."""
    return float((latents != 0).sum(-1).float().mean())
