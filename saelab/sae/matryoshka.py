"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

A BatchTopK SAE whose dictionary is read as nested prefixes m_1 < m_2 < … < m_L = d_sae
(`SAEConfig.nested_widths`), each asked to reconstruct x on its own from the latents it holds:

    z = BatchTopK(u)                                   (one selection, as BatchTopK's)
    x̂_j = z[:, :m_j] W_dec[:m_j] + b_dec              the prefix j's reconstruction
    loss = mean_j FVU(x̂_j, x) + α · AuxK

The first latents must then reconstruct alone, so they learn general features, and later ones add
detail instead of absorbing the general ones (the paper's reduced absorption and splitting). With one
level (widths [d_sae]) it is BatchTopK exactly. At inference it is BatchTopK's JumpReLU with the
learned threshold, and SAELens saves it the same way (`jumprelu`).

In the sparse step each inner prefix costs one more sparse decode (batch·k·d), not a dense one.
"""

from __future__ import annotations

import torch

from saelab.errors import ConfigError
from saelab.kernels.decode import sparse_decode
from saelab.sae.base import SparseOutput
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register
from saelab.sae.topk import BatchTopKSAE


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested reconstruction losses over the prefixes `cfg.nested_widths()`."""

    architecture = "matryoshka_batchtopk"
    config_keys = ("k", "matryoshka_widths")
    saelens_note = "Matryoshka BatchTopK: at inference a JumpReLU with the threshold learned in training."

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        widths = cfg.nested_widths()
        if any(b <= a for a, b in zip([0, *widths], widths, strict=False)) or widths[-1] != cfg.d_sae:
            raise ConfigError(f"matryoshka_widths: must increase strictly and end at d_sae {cfg.d_sae}, got {widths}")

    def sparse_forward(self, x: torch.Tensor, *args, **kwargs) -> SparseOutput:  # noqa: ANN002, ANN003
        """BatchTopK's `sparse_forward`, plus (in training) `nested`: every inner prefix's reconstruction."""
        out = super().sparse_forward(x, *args, **kwargs)
        if self.training:
            norm = self.output_norm(self.token_norm(x))
            out.nested = [
                norm.out_of(sparse_decode(out.indices, out.values * (out.indices < width), self.W_dec) + self.b_dec)
                for width in self.cfg.nested_widths()[:-1]
            ]
        return out


register(MatryoshkaBatchTopKSAE)
