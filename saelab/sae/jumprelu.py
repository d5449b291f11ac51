"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): per-latent thresholds and an L0 penalty.

    u = (x' − b_dec) W_enc + b_enc
    z_i = u_i · H(u_i − θ_i)                              H: the Heaviside step
    loss = (‖x' − x̂‖² + λ_t · Σ_i H(u_i − θ_i)) / Var(x')  the L0 itself, not a proxy

H has no useful derivative, so θ trains through straight-through estimators with a kernel density
of bandwidth ε (K(v) = 1[|v| < ½], the rectangle):

    ∂z_i/∂θ_i  := −(θ_i / ε) · K((u_i − θ_i) / ε)         ∂z_i/∂u_i = H(u_i − θ_i)
    ∂H_i/∂θ_i  := −(1 / ε) · K((u_i − θ_i) / ε)           ∂H_i/∂u_i = 0

so only pre-activations within ε/2 of a threshold move it: the L0 term pushes θ up where many tokens
sit just above it, the reconstruction pulls it down where the tokens just below it would help.
In training the sparse kernels keep every pair with u > θ − ε/2 (`AboveThreshold`), which holds all
pairs with a nonzero value or a nonzero pseudo-derivative, so the sparse step is the dense one.

With `target_l0` set, the L0 term is Gemma Scope 2's quadratic penalty around the target (SAELens's
`jumprelu_sparsity_loss_mode: quadratic`): λ_t · (2/T)·(L0 − T)² per token, which pushes the thresholds up
while a token keeps more than T latents and down while it keeps fewer, so the run lands near T whatever
λ; the linear L0 penalty instead settles wherever its pull balances the reconstruction's (on SmolLM2 at
L0 ~500 in a 150-step run, for λ 1 and 10 alike).

θ is trained directly (SAELens 6 does the same; DeepMind trains log θ, whose steps are multiplicative
and barely move a small θ in a short run) and clamped at ≥ 0 after each step. Decoder rows start at
norm 0.1 with W_enc = W_decᵀ and are free, as in SAELens: at init every u > θ fires, about half the
latents, and with unit rows (so u ~ x'·d of order 1) their sum was ~3× x (FVU 9.5 after 5 steps on
SmolLM2), where rows of 0.1 make it ~0.03× x. Defaults (θ from 0.01, ε 0.05) are SAELens's, for
inputs scaled to E‖x‖² = d_in as saelab's are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saelab.kernels import AboveThreshold
from saelab.kernels.encode import SelectionRule
from saelab.kernels.sparse_ops import gather_latents
from saelab.sae.base import SparseAutoencoder, SparseOutput
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register
from saelab.sae.standard import DECODER_INIT_NORM


def rectangle(v: torch.Tensor) -> torch.Tensor:
    """The kernel K(v) = 1[−½ < v < ½]."""
    return ((v > -0.5) & (v < 0.5)).to(v.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z = u · H(u − θ) with the pseudo-derivative −(θ/ε)·K((u − θ)/ε) for θ (u, θ of one shape)."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(u, threshold)
        ctx.bandwidth = bandwidth
        return u * (u > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        u, threshold = ctx.saved_tensors
        window = rectangle((u - threshold) / ctx.bandwidth)
        return grad * (u > threshold), -(threshold / ctx.bandwidth) * window * grad, None


class StepFunction(torch.autograd.Function):
    """H(u − θ) with the pseudo-derivative −(1/ε)·K((u − θ)/ε) for θ and none for u."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(u, threshold)
        ctx.bandwidth = bandwidth
        return (u > threshold).to(u.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        u, threshold = ctx.saved_tensors
        return None, -(1 / ctx.bandwidth) * rectangle((u - threshold) / ctx.bandwidth) * grad, None


class JumpReLUSAE(SparseAutoencoder):
    """z = u·H(u − θ) with a trained threshold per latent (`threshold`, [d_sae]) and an L0 penalty."""

    architecture = "jumprelu"
    config_keys = ("l0_coefficient", "penalty_warmup", "jumprelu_init_threshold", "jumprelu_bandwidth", "target_l0")
    saelens_architecture = "jumprelu"
    loads_saelens = ("jumprelu",)
    unit_norm_decoder = False
    fast_per_latent = True
    threshold: nn.Parameter

    @property
    def decoder_init_norm(self) -> float:
        """0.1 (module docstring), but 1 with a target L0: the thresholds are calibrated to fire T latents a token
        (`calibrate`), so unit rows do not overshoot, and the encoder's columns then grow slowly relative to
        their size, as the thresholds do. From rows of 0.1 the encoder outgrew its calibrated thresholds
        within 20 steps on SmolLM2 (L0 982 for a target of 32): Adam moves each entry by about the lr a step,
        ~10 % of a column of norm 0.1 but 1 % of a unit one, and a threshold by ~0.01 a step."""
        return 1.0 if self.cfg.target_l0 is not None else DECODER_INIT_NORM

    @classmethod
    def sparsity_label(cls, cfg: SAEConfig) -> str:
        """l032 with a target L0 of 32 (its quadratic penalty), else l0c1 (the L0 coefficient)."""
        return f"l0{cfg.target_l0:g}" if cfg.target_l0 else f"l0c{cfg.l0_coefficient:g}"

    @classmethod
    def sparsity_in_words(cls, cfg: SAEConfig) -> str:
        if cfg.target_l0:
            return f"L0 target {cfg.target_l0:g} (quadratic penalty)"
        return f"L0 coefficient {cfg.l0_coefficient:g}"

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        weights["threshold"] = self.threshold.double()

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        super().from_saelens_(tensors, fold_in, fold_out)
        self.threshold.copy_(tensors["threshold"])

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold))

    @torch.no_grad()
    def calibrate(self, sample: torch.Tensor) -> None:
        """With `target_l0` T: start each θ_i at the quantile of its u on `sample: [n, d_in]` above which it fires
        on T/d_sae of the tokens, so training starts at L0 ≈ T. The thresholds train at √d_in × the lr, about
        0.01 a step on SmolLM2, and must otherwise climb from 0.01 to the pre-activations' scale: from the
        fixed start a 250-step run still had L0 659 for a target of 32 at step 150."""
        if self.cfg.target_l0 is None:
            return
        u = self.pre_activations(sample)
        keep = min(1.0, self.cfg.target_l0 / self.cfg.d_sae)
        rank = min(len(u), max(1, round((1 - keep) * len(u))))  # u above its rank-th value: ≈ T/d_sae of the rows
        self.threshold.copy_(u.kthvalue(rank, dim=0).values.clamp_min(0))

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """u: [..., d_sae] → u·H(u − θ), differentiable as in training."""
        threshold = self.threshold.expand_as(pre_activations)  # expand's backward sums θ's gradient over tokens
        return JumpReLUFunction.apply(pre_activations, threshold, self.cfg.jumprelu_bandwidth)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        """Training: every pair within the estimator's window or above it; inference: u > θ."""
        margin = self.cfg.jumprelu_bandwidth / 2 if self.training else 0.0
        return AboveThreshold(self.threshold.detach() - margin)

    def kept_values(
        self, indices: torch.Tensor, pre_activations: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        # padded slots (latent 0, u = 0) are zeroed after the function, so no gradient reaches θ_0 from them
        thresholds = gather_latents(self.threshold, indices)
        values = JumpReLUFunction.apply(pre_activations, thresholds, self.cfg.jumprelu_bandwidth)
        return values if valid is None else values * valid

    def penalty(self, out: SparseOutput, coefficient_scale: float = 1.0) -> torch.Tensor:
        """λ_t · the mean over tokens of the L0 = Σ_i H(u_i − θ_i) over the kept pairs (all that can be nonzero),
        or with `target_l0` T of (2/T)·(L0 − T)²."""
        u = out.pre_activations.detach()
        fired = StepFunction.apply(u, gather_latents(self.threshold, out.indices), self.cfg.jumprelu_bandwidth)
        if out.valid is not None:
            fired = fired * out.valid
        l0 = fired.sum(-1)
        target = self.cfg.target_l0
        per_token = l0 if target is None else 2 / target * (l0 - target).pow(2)
        return self.cfg.l0_coefficient * coefficient_scale * per_token.mean()

    @torch.no_grad()
    def constrain_(self) -> None:
        super().constrain_()
        self.threshold.clamp_(min=0.0)


register(JumpReLUSAE)
