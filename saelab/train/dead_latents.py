"""Which latents are dead: not fired for `dead_tokens` tokens (the AuxK loss revives them)."""

from __future__ import annotations

import torch


class DeadLatentTracker:
    """Counts, per latent, the tokens since it last fired; its state is one tensor, so it checkpoints exactly."""

    def __init__(self, d_sae: int, dead_tokens: int) -> None:
        self.dead_tokens = dead_tokens
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)

    def update(self, latents: torch.Tensor) -> None:
        """latents: [batch, d_sae]; a latent fired if any token gave it a non-zero value."""
        fired = (latents != 0).any(0).to(self.tokens_since_fired.device)
        self.tokens_since_fired += latents.shape[0]
        self.tokens_since_fired[fired] = 0

    def update_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """`update` for sparse rows (indices, values: [batch, k]): the latents with a value > 0 fired."""
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[indices[values > 0].to(fired.device)] = True
        self.tokens_since_fired += indices.shape[0]
        self.tokens_since_fired[fired] = 0

    @property
    def dead(self) -> torch.Tensor:
        """[d_sae] bool."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())
