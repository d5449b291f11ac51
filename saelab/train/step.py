"""One training step of one SAE: sparse forward, loss, backward, the decoder-norm constraint, Adam.

loss = FVU(x̂, x) + α · AuxK         (TopK family; GBA trains on FVU alone)
∇W_dec ← ∇W_dec − (∇W_dec · d̂) d̂   (no gradient along a decoder row…)
Adam step; W_dec rows ← unit norm     (…because the renormalisation would undo it)
GBA: the forward pass counts firings; adapt the encoder biases every `update_tokens` tokens

The forward and backward run through `saelab.kernels` (`SparseAutoencoder.sparse_forward`): one
dense encoder product, and gradients over the kept (token, latent) pairs only.

Data-parallel (`data_parallel`, under torchrun): x is this rank's slice of the global batch; the
losses are this rank's shares of the global batch's, and the gradients are summed over ranks before
the step, so every rank takes the step 1-rank training takes on the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saelab.sae.base import SparseAutoencoder
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.loss import normalized_mse

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

TOPK_FAMILY = ("topk", "batchtopk", "gsae")


@dataclass
class KernelOptions:
    """How the encoder product runs: all latents at once or in tiles (bounded memory), in float32 or bf16."""

    tile: int | None = None
    matmul_dtype: torch.dtype | None = None


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    gradient: torch.Tensor | None,
    tracker: DeadLatentTracker,
    aux_alpha: float,
    k_aux: int,
    kernels: KernelOptions | None = None,
    data_parallel: DataParallel | None = None,
) -> dict[str, float]:
    """x, gradient: [batch, d_in]. Returns the step's metrics (data-parallel: this rank's shares)."""
    kernels = kernels or KernelOptions()
    dead = tracker.dead.to(x.device) if sae.cfg.architecture in TOPK_FAMILY else None
    out = sae.sparse_forward(x, gradient, dead, k_aux, kernels.tile, kernels.matmul_dtype)
    fvu = normalized_mse(out.reconstruction, x, data_parallel)
    aux = torch.zeros((), device=x.device)
    if out.aux_reconstruction is not None:
        residual = (x - out.reconstruction).detach()
        aux = normalized_mse(out.aux_reconstruction, residual, data_parallel)
    loss = fvu + aux_alpha * aux

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if data_parallel is not None:
        data_parallel.sum_gradients_(sae)
    sae.remove_decoder_parallel_grad_()
    optimizer.step()
    sae.normalize_decoder_()

    tracker.update(out.indices, out.values)
    l0 = float((out.values > 0).sum(-1).float().mean())
    metrics = {"loss": loss.item(), "fvu": fvu.item(), "aux_loss": aux.item(), "l0": l0}
    if sae.cfg.architecture == "gba":  # every step logs each group's last measured frequency
        metrics.update(sae.adapt_biases())  # adapts the groups whose window is full, if any
    return metrics
