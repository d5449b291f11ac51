"""The shared base of every SAE variant: pre-activations → selection → decode.

A variant overrides only `select` (which latents fire, with which values) and, for GBA, how its
encoder bias moves. Inputs are in the model's units; inside, they are multiplied by
`input_scale` (set by the trainer so that E‖x·s‖² = d_in) and the reconstruction is divided by it,
so callers never see the normalised space.

    u  = (x·s − b_dec) W_enc + b_enc            pre-activations   [batch, d_sae]
    z  = select(u)                              sparse latents    [batch, d_sae]
    x̂  = (z W_dec + b_dec) / s                  reconstruction    [batch, d_in]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saelab.sae.config import SAEConfig


@dataclass
class SAEOutput:
    reconstruction: torch.Tensor  # [batch, d_in], model units
    latents: torch.Tensor  # [batch, d_sae], zero where a latent did not fire
    pre_activations: torch.Tensor  # [batch, d_sae]


class SparseAutoencoder(nn.Module):
    """Encoder/decoder weights in SAELens's layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        decoder = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.T.clone())  # Gao et al.: encoder starts as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("input_scale", torch.ones(()))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """u = (x·s − b_dec) W_enc + b_enc; x: [batch, d_in] → [batch, d_sae]."""
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """The variant's rule: which latents fire and with which values; [batch, d_sae] → same."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x̂ = (z W_dec + b_dec) / s; latents: [batch, d_sae] → [batch, d_in] in model units."""
        return (latents @ self.W_dec + self.b_dec) / self.input_scale

    def encode(self, x: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse latents for x: [batch, d_in] (gradient: ∂L/∂x, same shape, for g-SAE)."""
        return self.select(self.pre_activations(x), gradient)

    def forward(self, x: torch.Tensor, gradient: torch.Tensor | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        latents = self.select(pre, gradient)
        return SAEOutput(self.decode(latents), latents, pre)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Give every decoder row unit norm (in the normalised space)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_decoder_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row, which renormalisation would undo."""
        if self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * rows).sum(dim=1, keepdim=True) * rows
