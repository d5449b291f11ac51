"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Which latents fire and how strongly are decided by two paths that share one encoder matrix:

    π     = (x' − b_dec) W_enc + b_gate                gate pre-activations    (`b_enc` here)
    mag_i = relu(exp(r_i) · (π_i − b_gate_i) + b_mag_i)   = relu((x' − b_dec)(W_enc ⊙ exp(r))_i + b_mag_i)
    z     = 1[π > 0] ⊙ mag
    x̂     = z W_dec + b_dec

    loss = (‖x' − x̂‖² + λ_t · Σ_i relu(π_i) ‖d_i‖ + ‖x' − (relu(π) W̄_dec + b̄_dec)‖²) / Var(x')

The L1 acts on the gate alone, so the magnitudes are not shrunk (the point of the paper); the last
term, through a frozen copy of the decoder (W̄, b̄: no gradient), makes the gate's relu(π) a
reconstruction too, which is what gives W_enc and b_gate a gradient for which latents fire.
The L1 weighs decoder norms and the decoder rows are free, as in SAELens; parameters are named as
SAELens names them (W_enc, b_gate, r_mag, b_mag, W_dec, b_dec), `b_gate` living in `b_enc` here so
that the shared encode path (and its sparse kernels) computes π.

In training the kept pairs are those with π > 0 (`AboveThreshold(0)`): exactly where z or relu(π)
can be nonzero, so the sparse step is the dense one.
"""

from __future__ import annotations

import torch
from torch import nn

from saelab.kernels import AboveThreshold
from saelab.kernels.decode import sparse_decode
from saelab.kernels.encode import SelectionRule
from saelab.kernels.sparse_ops import gather_latents
from saelab.sae.base import SparseAutoencoder, SparseOutput
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register
from saelab.sae.standard import DECODER_INIT_NORM, L1Penalised, weighted_l1


class GatedSAE(L1Penalised, SparseAutoencoder):
    """A gate (π > 0) and a magnitude (its own scale r and bias b_mag on the same W_enc) per latent."""

    architecture = "gated"
    saelens_architecture = "gated"
    loads_saelens = ("gated",)
    saelens_renames = {"b_enc": "b_gate"}  # the gate's bias; SAELens's magnitude path has its own b_mag
    unit_norm_decoder = False
    decoder_init_norm = DECODER_INIT_NORM
    fast_per_latent = True

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        weights |= {"r_mag": self.r_mag.double(), "b_mag": self.b_mag.double()}

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        super().from_saelens_(tensors, fold_in, fold_out)
        self.r_mag.copy_(tensors["r_mag"])
        self.b_mag.copy_(tensors["b_mag"])

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """π: [..., d_sae] → z = 1[π > 0] · relu(exp(r)(π − b_gate) + b_mag)."""
        return (pre_activations > 0) * self._magnitudes(pre_activations, slice(None))

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return AboveThreshold(0.0)

    def kept_values(
        self, indices: torch.Tensor, pre_activations: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        values = self._magnitudes(pre_activations, indices)  # kept pairs have π > 0
        return values if valid is None else values * valid

    def _magnitudes(self, gate: torch.Tensor, latents: torch.Tensor | slice) -> torch.Tensor:
        """relu(exp(r)(π − b_gate) + b_mag) for π whose last axis holds the latents `latents` (all: a slice)."""

        def at(per_latent: torch.Tensor) -> torch.Tensor:
            return per_latent[latents] if isinstance(latents, slice) else gather_latents(per_latent, latents)

        return (at(self.r_mag).exp() * (gate - at(self.b_enc)) + at(self.b_mag)).relu()

    def penalty(self, out: SparseOutput, coefficient_scale: float = 1.0) -> torch.Tensor:
        """λ_t · L1 of the gate's relu(π) (weighted by decoder norms) + the frozen-decoder reconstruction's
        squared error, both summed per token and averaged over the batch."""
        gate = out.pre_activations.relu()
        if out.valid is not None:
            gate = gate * out.valid
        l1 = weighted_l1(out.indices, gate, self.W_dec)
        via_gate = sparse_decode(out.indices, gate, self.W_dec.detach()) + self.b_dec.detach()
        auxiliary = (via_gate - out.inputs).pow(2).sum(-1).mean()
        return self.cfg.l1_coefficient * coefficient_scale * l1 + auxiliary


register(GatedSAE)
