"""Transcoders (Dunefsky et al. 2024) and skip transcoders (Paulo et al. 2025): predict a later hook.

A transcoder reads one hook (e.g. `blocks.L.hook_resid_mid`, what enters an MLP) and predicts another
(`hook_name_out`, e.g. `blocks.L.hook_mlp_out`, what the MLP adds), through sparse latents:

    u = x' W_enc + b_enc                 no decoder bias on the way in (it lives in the output's space)
    z = relu(u)
    ŷ' = z W_dec + b_dec  (+ x' W_skipᵀ for a skip transcoder)
    loss = (‖y' − ŷ'‖² + λ_t · Σ_i z_i ‖d_i‖) / Var(y')

x' = x·s_in and y' = y·s_out, each hook scaled to E‖·‖² = its width by its own factor (`input_scale`,
`target_scale`): an MLP's output is far smaller than the residual it reads. These are SAELens's
`transcoder` and `skip_transcoder` (ReLU, W_skip [d_out, d_in] from zeros), trained as the standard
SAE is (L1 weighted by decoder norms, warmed up); spliced in place of the MLP they give the CE loss
recovered of a replacement MLP (`saelab eval`).
"""

from __future__ import annotations

import torch
from torch import nn

from saelab.errors import ConfigError
from saelab.sae.base import TokenNorm
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register
from saelab.sae.standard import StandardSAE


class Transcoder(StandardSAE):
    """A ReLU, L1-trained map from `hook_name` (d_in wide) to `hook_name_out` (d_out wide)."""

    architecture = "transcoder"
    config_keys = (*StandardSAE.config_keys, "d_out", "hook_name_out")
    transcoder = True
    saelens_architecture = "transcoder"
    loads_saelens = ("transcoder",)
    target_scale: torch.Tensor

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        if cfg.input_norm != "none":
            raise ConfigError(
                f"input_norm: a {cfg.architecture} predicts another hook, so its tokens cannot be layer-normalised "
                "(the output would be un-normalised with the input's statistics); use input_norm: none"
            )

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.register_buffer("target_scale", torch.ones(()))

    def _initial_encoder(self, decoder: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random columns of the decoder rows' norm: input and output are different spaces."""
        encoder = torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator)
        return encoder * (self.decoder_init_norm / encoder.norm(dim=0, keepdim=True))

    def input_bias(self) -> torch.Tensor:
        return self.W_enc.new_zeros(self.cfg.d_in)

    def output_norm(self, norm: TokenNorm) -> TokenNorm:
        return TokenNorm(0.0, self.target_scale)


class SkipTranscoder(Transcoder):
    """A transcoder plus a linear skip connection x' W_skipᵀ (W_skip: [d_out, d_in], from zeros)."""

    architecture = "skip_transcoder"
    saelens_architecture = "skip_transcoder"
    loads_saelens = ("skip_transcoder",)

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.W_skip = nn.Parameter(torch.zeros(cfg.output_width, cfg.d_in))

    def skip(self, x: torch.Tensor, norm: TokenNorm) -> torch.Tensor:
        return norm.into(x) @ self.W_skip.T

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        weights["W_skip"] = self.W_skip.double() * fold_in / fold_out

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        super().from_saelens_(tensors, fold_in, fold_out)
        self.W_skip.copy_(tensors["W_skip"] * fold_out / fold_in)


register(Transcoder)
register(SkipTranscoder)
