"""What an SAE is: its architecture, its size, and the knobs of its selection rule or bias update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from saelab.errors import ConfigError

Architecture = Literal["topk", "batchtopk", "gsae", "gba"]
GBAActivation = Literal["jumprelu", "relu"]
GBABiasRule = Literal["balanced", "paper"]


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
      the features it should catch; the trainer prints the ladder it uses.
    """

    architecture: Architecture = "topk"
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32
    name: str = ""
    beta: float = 2.0
    n_groups: int = 10
    target_high: float = 0.1
    target_low: float = 1e-3
    target_l0: float | None = None
    update_tokens: int = 4096
    gamma: float = 0.01
    activation: GBAActivation = "jumprelu"
    tied: bool = True
    bias_rule: GBABiasRule = "balanced"
    dead_eps: float = 1e-6
    bias_min: float = -1.0
    bias_max: float = 0.0
    hook_name: str = ""
    model_name: str = ""

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
        if self.bias_min > self.bias_max:
            raise ConfigError("bias_min: must be ≤ bias_max")

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
