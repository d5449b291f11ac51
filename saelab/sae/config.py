"""What an SAE is: its architecture, its size, and the knobs of its selection rule or bias update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from saelab.errors import ConfigError

Architecture = Literal["topk", "batchtopk", "gsae", "gba"]
GBAActivation = Literal["jumprelu", "relu"]
GBABiasRule = Literal["balanced", "paper"]
InputNorm = Literal["none", "layer_norm"]
# Architectures whose tokens are layer-normalised unless `input_norm` says otherwise (SAEConfig docstring).
NORMALISED_BY_DEFAULT = ("batchtopk", "gba")
# A latent firing on more than this fraction of tokens is dense (eval counts them, analysis sets them aside).
DENSE_THRESHOLD = 0.1


@dataclass
class SAEConfig:
    """One SAE. Fields that do not apply to `architecture` are ignored.

    - topk / batchtopk / gsae: `k` latents per token (batchtopk: `k` on average over a batch).
    - gsae: `beta` weighs the gradient term of the selection score (0 is exactly TopK).
    - gba: a JumpReLU (`activation`) SAE whose encoder biases are adapted (`bias_rule`, every
      `update_tokens`) toward per-group firing targets spaced geometrically from `target_high` to
      `target_low` over `n_groups` groups (`saelab/sae/gba.py`). `target_l0`, when set, multiplies the
      whole ladder so that the L0 it implies, Σ_i p_g(i), is `target_l0` (for comparisons at matched
      L0): the ratios between groups stay, but every target moves, possibly below the frequencies of
      the features it should catch; the trainer prints the ladder it uses. `output_scale` (tied): unset,
      every a_i starts at 0.1 and trains; a number fixes them all there, untrained: the small-a regime of
      the paper's analysis, in which each latent learns on its own (a Hebbian pull toward the inputs it
      fires on) instead of all fitting x together; it finds features, but x̂ is not a reconstruction
      (FVU near 1). Use it with `train_b_dec: false`: trained against a small a·Σ z w, b_dec drifts far
      from the data and every latent fires.
    - every architecture: `train_b_dec: false` keeps b_dec (the paper's b_pre) where the trainer starts
      it, the geometric median of the data, as GBA's model has it.
    - every architecture: `input_norm` maps each token into the SAE's space (`saelab/sae/base.py`): "none"
      multiplies by one dataset-wide scale, "layer_norm" centres and standardises each token (SAELens's
      `normalize_activations: layer_norm`). Unset, it is "layer_norm" for batchtopk, as the BatchTopK
      paper's code trains it (`input_unit_norm`), since one batch-wide budget otherwise goes to the
      tokens of largest norm (README, "BatchTopK"), and for gba, whose analysis assumes unit-norm
      inputs (its bias range [−1, 0]) and whose fixed thresholds otherwise fire most on the tokens of
      largest norm (synthetic recovery 92.0 % against 88.9 %, README); "none" for the others.
    """

    architecture: Architecture = "topk"
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32
    name: str = ""
    beta: float = 1.0
    n_groups: int = 10
    target_high: float = 0.1
    target_low: float = 1e-3
    target_l0: float | None = None
    update_tokens: int = 4096
    gamma: float = 0.01
    activation: GBAActivation = "jumprelu"
    tied: bool = True
    output_scale: float | None = None
    bias_rule: GBABiasRule = "balanced"
    dead_eps: float = 1e-6
    bias_min: float = -1.0
    bias_max: float = 0.0
    input_norm: InputNorm | None = None
    train_b_dec: bool = True
    hook_name: str = ""
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.input_norm is None:
            self.input_norm = "layer_norm" if self.architecture in NORMALISED_BY_DEFAULT else "none"

    def validate(self) -> None:
        for key in ("d_in", "d_sae", "k", "n_groups", "update_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.k > self.d_sae:
            raise ConfigError(f"k: {self.k} is larger than d_sae {self.d_sae}")
        if self.beta < 0:
            raise ConfigError(f"beta: must be ≥ 0, got {self.beta}")
        if not 0 < self.target_low <= self.target_high <= 1:
            raise ConfigError("target_high/target_low: need 0 < target_low ≤ target_high ≤ 1")
        if self.architecture == "gba" and self.n_groups > self.d_sae:  # only GBA splits latents into groups
            raise ConfigError(f"n_groups: {self.n_groups} groups cannot be made from d_sae {self.d_sae} latents")
        if self.output_scale is not None and not self.output_scale > 0:
            raise ConfigError(f"output_scale: must be positive (or unset, to train it), got {self.output_scale}")
        if self.bias_min > self.bias_max:
            raise ConfigError("bias_min: must be ≤ bias_max")
        if self.input_norm not in ("none", "layer_norm"):
            raise ConfigError(f"input_norm: must be 'none' or 'layer_norm', got {self.input_norm!r}")

    @property
    def label(self) -> str:
        """The SAE's name in a run: `name`, else e.g. `topk-4608-k32`."""
        if self.name:
            return self.name
        sparsity = f"l0{self.target_l0:g}" if self.architecture == "gba" and self.target_l0 else f"k{self.k}"
        return f"{self.architecture}-{self.d_sae}-{sparsity}"

    def group_targets(self) -> list[float]:
        """GBA's per-group target firing frequencies, highest first."""
        n = self.n_groups
        ratio = (self.target_low / self.target_high) ** (1 / (n - 1)) if n > 1 else 1.0
        targets = [self.target_high * ratio**g for g in range(n)]
        if self.target_l0 is not None:
            scale = self.target_l0 / (self.d_sae / n * sum(targets))  # groups hold d_sae/n latents (±1)
            targets = [min(1.0, t * scale) for t in targets]
        return targets


def default_lr(d_sae: int) -> float:
    """Gao et al.'s learning-rate rule: 2e-4 scaled by 1/sqrt(n_latents / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
