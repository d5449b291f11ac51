"""One training step of one SAE: sparse forward, loss, backward, the decoder-norm constraint, Adam.

loss = FVU(x̂, y) + α · AuxK + P / Var(y)   y: x, or a transcoder's target; AuxK: `revives_with_auxk`;
                                         P: the variant's penalty (L1, L0, Gated's auxiliary loss)
∇W_dec ← ∇W_dec − (∇W_dec · d̂) d̂   (no gradient along a decoder row…)
Adam step; W_dec rows ← unit norm     (…because the renormalisation would undo it; variants whose
                                       penalty weighs the decoder norms leave them free)
then the variant's `after_step` (GBA, which counts firings in the forward pass: adapt the encoder biases)

Var(y) is the batch's ‖y − ȳ‖² per token in the SAE's space, so FVU + P / Var(y) is SAELens's loss
(summed squared error + penalty) over the variance: a coefficient means what it means in SAELens.

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

from saelab.kernels.phases import ADAM, DECODER_CONSTRAINT, phase
from saelab.sae.base import SparseAutoencoder
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.loss import batch_variance, normalized_mse

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

StepMetrics = dict[str, torch.Tensor]  # name → a 0-d tensor on the device


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
    target: torch.Tensor | None = None,
    penalty_scale: float = 1.0,
) -> StepMetrics:
    """x, gradient: [batch, d_in]; target: [batch, d_out], what a transcoder predicts (None: x itself);
    penalty_scale: the penalty's warm-up fraction. Returns the step's metrics (data-parallel: this
    rank's shares) as 0-d tensors on the device: a TopK step never waits for the device (`read_metrics`
    does, so the trainer reads them only when it logs)."""
    kernels = kernels or KernelOptions()
    target = x if target is None else target
    dead = None
    if sae.revives_with_auxk and k_aux > 0 and tracker.may_have_dead():
        dead = tracker.dead.to(x.device)
    out = sae.sparse_forward(x, gradient, dead, k_aux, kernels.tile, kernels.matmul_dtype)
    fvu = normalized_mse(out.reconstruction, target, data_parallel)
    reconstruction_loss = fvu
    if out.nested:  # Matryoshka: every prefix reconstructs on its own; the loss is their mean FVU
        inner = [normalized_mse(prefix, target, data_parallel) for prefix in out.nested]
        reconstruction_loss = torch.stack([*inner, fvu]).mean()
    aux = torch.zeros((), device=x.device)
    if dead is not None and out.aux_reconstruction is not None:
        residual = (target - out.reconstruction).detach()
        aux = normalized_mse(out.aux_reconstruction, residual, data_parallel) * dead.any()  # 0 when none is dead
    penalty = sae.penalty(out, penalty_scale)
    if penalty.requires_grad:
        share = 1 / data_parallel.world_size if data_parallel is not None else 1.0
        penalty = penalty * share / batch_variance(sae.output_norm(sae.scale_norm()).into(target), data_parallel)
    loss = reconstruction_loss + aux_alpha * aux + penalty

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if data_parallel is not None:
        data_parallel.sum_gradients_(sae)
    with phase(DECODER_CONSTRAINT):
        sae.remove_decoder_parallel_grad_()
    with phase(ADAM):
        optimizer.step()
    with phase(DECODER_CONSTRAINT):
        sae.constrain_()

    tracker.update(out.indices, out.values)
    metrics = {"loss": loss, "fvu": fvu, "aux_loss": aux, "l0": (out.values > 0).sum(-1).float().mean()}
    if penalty.requires_grad:
        metrics["penalty"] = penalty
    sae.after_step()  # GBA adapts the biases of the groups whose window is full
    return {name: value.detach() for name, value in metrics.items()}


def read_metrics(steps: list[StepMetrics]) -> list[dict[str, float]]:
    """Several steps' metrics as numbers, in one wait for the device."""
    if not steps:
        return []
    names = [list(step) for step in steps]
    values = torch.stack([value.double() for step in steps for value in step.values()]).tolist()
    read, position = [], 0
    for keys in names:
        read.append(dict(zip(keys, values[position : position + len(keys)], strict=True)))
        position += len(keys)
    return read
