"""Which latents are dead: not fired for `dead_tokens` tokens (the AuxK loss revives them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saelab.kernels.sparse_ops import is_full

if TYPE_CHECKING:
    from saelab.distributed import DataParallel


class DeadLatentTracker:
    """Counts, per latent, the tokens since it last fired; its state is one tensor, so it checkpoints exactly.

    With `data_parallel` a latent fired if it fired on any rank, and the tokens are the global batch's,
    so every rank holds the same counters and AuxK revives the same latents everywhere.
    """

    def __init__(self, d_sae: int, dead_tokens: int, data_parallel: DataParallel | None = None) -> None:
        self.dead_tokens = dead_tokens
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.data_parallel = data_parallel

    def update(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """A batch of sparse rows (indices, values: [batch, k]): the latents with a value > 0 fired."""
        n = self.tokens_since_fired.shape[0]
        if is_full(indices, n):  # every latent's slot, in order: a dense [batch, n]
            fired = (values > 0).any(0)
        else:
            fired = torch.zeros(n, dtype=torch.bool, device=indices.device)
            fired[indices[values > 0]] = True
        tokens = indices.shape[0]
        if self.data_parallel is not None:  # reduced where the latents are (nccl needs GPU tensors)
            fired = self.data_parallel.max_(fired.to(torch.int32)).bool()
            tokens *= self.data_parallel.world_size  # equal slices
        self.tokens_since_fired += tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0

    @property
    def dead(self) -> torch.Tensor:
        """[d_sae] bool."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())
