"""What an SAE is: its architecture, its size, and the knobs of its selection rule or bias update."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from saelab.errors import ConfigError

if TYPE_CHECKING:
    from saelab.sae.base import SparseAutoencoder

# The keys every variant reads; each variant adds its own (`SparseAutoencoder.config_keys`).
COMMON_KEYS = ("architecture", "d_in", "d_sae", "name", "input_norm", "train_b_dec", "hook_name", "model_name")
GBAActivation = Literal["jumprelu", "relu"]
GBABiasRule = Literal["balanced", "paper"]
GBARegime = Literal["analysis", "reconstruction"]
# A tied GBA's output scale in the analysis regime: small and fixed, as the paper's analysis takes a → 0.
ANALYSIS_OUTPUT_SCALE = 0.01
InputNorm = Literal["none", "layer_norm"]
# A latent firing on more than this fraction of tokens is dense (eval counts them, analysis sets them aside).
DENSE_THRESHOLD = 0.1


@dataclass
class SAEConfig:
    """One SAE. Each variant reads COMMON_KEYS and its own `config_keys`; in a YAML config any other key is an
    error naming the variant and its keys (`check_keys`), and saved configs hold only those keys.

    - topk / batchtopk / gsae: `k` latents per token (batchtopk: `k` on average over a batch).
    - gsae: `beta` weighs the gradient term of the selection score (0 is exactly TopK).
    - gba: a JumpReLU (`activation`) SAE whose encoder biases are adapted (`bias_rule`, every
      `update_tokens`) toward per-group firing targets spaced geometrically from `target_high` to
      `target_low` over `n_groups` groups (`saelab/sae/gba.py`). `target_l0`, when set, multiplies the
      whole ladder so that the L0 it implies, Σ_i p_g(i), is `target_l0` (for comparisons at matched
      L0): the ratios between groups stay, but every target moves, possibly below the frequencies of
      the features it should catch; the trainer prints the ladder it uses. Its form follows the ladder's
      regime (`gba_regime`) unless `tied` / `output_scale` say otherwise:
      * analysis regime, the ladder fires at least d_in latents a token (the paper's toy: L0 ≈ 205 in
        d 42): tied (one unit vector per latent encodes and decodes) with every output scale a_i fixed at
        0.01, the small-a regime of the paper's analysis, in which each latent learns on its own (a
        Hebbian pull toward the inputs it fires on); it finds features, but x̂ is not a reconstruction
        (FVU ≈ 0.67 there). With so many latents a token, trained output scales let them fit x together
        densely instead (FVU ≈ 0, no feature found: `benchmarks/paper_gba.py`). Use it with
        `train_b_dec: false`: trained against a small a·Σ z w, b_dec drifts far from the data.
      * reconstruction regime (fewer latents a token than d_in, as on any LLM): untied, its own W_enc
        and free unit decoder rows, the JumpReLU gate set by the adapted biases. On SmolLM2 at L0 32 the
        tied form with trained a_i reconstructs 19 % worse than TopK, the untied one level (docs/variants.md).
      `tied: true/false` forces the form; `output_scale` (tied): a number fixes every a_i there,
      `trained` starts them at 0.1 and trains them.
    - standard, transcoder, skip_transcoder (ReLU, Anthropic's April 2024 recipe) and gated: an L1 penalty
      `l1_coefficient` · Σ_i z_i‖d_i‖ (gated: on the gate's relu(π)), warmed up linearly over the first
      `penalty_warmup` of the steps; the decoder rows are free (the penalty weighs their norms).
    - jumprelu: per-latent thresholds θ (from `jumprelu_init_threshold`), an L0 penalty `l0_coefficient`
      · Σ_i H(u_i − θ_i) trained through the straight-through estimator of bandwidth `jumprelu_bandwidth`;
      with `target_l0` T the penalty is `l0_coefficient` · (2/T)·(L0 − T)² (Gemma Scope 2's quadratic
      form, SAELens's `quadratic` mode), which holds the L0 near T.
      Coefficients are SAELens's: the loss is SAELens's (summed squared error + penalty) divided by the
      batch's variance, and inputs are scaled to E‖x‖² = d_in as SAELens's `expected_average_only_in`.
    - matryoshka_batchtopk: BatchTopK whose nested prefixes `matryoshka_widths` (unset: d_sae/16, /8, /4,
      /2, d_sae) each reconstruct x on their own; the loss is their mean FVU.
    - transcoder / skip_transcoder: read `hook_name`, predict `hook_name_out` (d_out wide; set from the
      store); skip_transcoder adds a linear skip x W_skipᵀ. Their `input_norm` is "none": a per-token
      map of the input cannot be undone on another hook's output.
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

    architecture: str = "topk"  # a registered variant's name (`saelab.sae.registry`), as SAELens spells it
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32
    name: str = ""
    beta: float = 1.0
    n_groups: int = 10
    target_high: float = 0.1
    target_low: float = 0.01  # the paper's toy spans 0.5…1e-3; on SmolLM2 a 10× ladder fits (gba.py, "Defaults")
    target_l0: float | None = None
    update_tokens: int = 4096
    gamma: float = 0.02
    activation: GBAActivation = "jumprelu"
    tied: bool | None = None
    output_scale: float | Literal["trained"] | None = None
    bias_rule: GBABiasRule = "balanced"
    dead_eps: float = 1e-6
    bias_min: float = -1.0
    bias_max: float = 0.0
    input_norm: InputNorm | None = None
    train_b_dec: bool = True
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    penalty_warmup: float = 0.05
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    matryoshka_widths: list[int] | None = None
    d_out: int | None = None
    hook_name: str = ""
    hook_name_out: str = ""
    model_name: str = ""
    # a variant's own numeric settings that no field above holds (`option_defaults`; docs/own-variant.md)
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_norm is None:
            variant = _registered(self.architecture)  # an unknown one is `validate`'s error, with its key's path
            self.input_norm = "layer_norm" if variant is not None and variant.normalises_input_by_default else "none"

    @property
    def variant(self) -> type[SparseAutoencoder]:
        """The class registered under `architecture`: what every caller asks about the variant."""
        from saelab.sae.registry import variant_class

        return variant_class(self.architecture)

    def own_keys(self) -> tuple[str, ...]:
        """The keys this SAE's variant reads: COMMON_KEYS, its `config_keys`, and `options` if it has any."""
        return _own_keys(self.variant)

    @classmethod
    def check_keys(cls, data: Mapping[str, Any], prefix: str) -> None:
        """A YAML mapping's keys against its variant's (`config.config_from_dict` calls this before building):
        a key another variant reads is an error naming this one's keys."""
        variant = _registered(data.get("architecture", cls.architecture))
        if variant is None:
            return  # `validate` says the architecture is unknown
        own = set(_own_keys(variant))
        for key in data:
            if key not in own:
                where = f"{prefix}.{key}" if prefix else key
                raise ConfigError(
                    f"{where}: not a key of a {variant.architecture} SAE, whose own keys are "
                    f"{', '.join(variant.config_keys) or 'none'} (besides {', '.join(COMMON_KEYS[1:])})"
                )

    @classmethod
    def own_fields(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
        """`fields` without the keys its variant does not read: what saelab saved before configs held only their
        own keys, and before the variants declared theirs (those keys were ignored then too)."""
        variant = _registered(fields.get("architecture", cls.architecture))
        if variant is None:
            return dict(fields)
        return {key: value for key, value in fields.items() if key in _own_keys(variant)}

    def validate(self) -> None:
        variant = self.variant  # an unknown architecture: the error that lists the registered ones
        for key in ("d_in", "d_sae", "k", "n_groups", "update_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.k > self.d_sae:
            raise ConfigError(f"k: {self.k} is larger than d_sae {self.d_sae}")
        if self.beta < 0:
            raise ConfigError(f"beta: must be ≥ 0, got {self.beta}")
        if not 0 < self.target_low <= self.target_high <= 1:
            raise ConfigError("target_high/target_low: need 0 < target_low ≤ target_high ≤ 1")
        if self.target_l0 is not None and not self.target_l0 > 0:
            raise ConfigError(f"target_l0: must be positive (or unset), got {self.target_l0}")
        if isinstance(self.output_scale, float) and not self.output_scale > 0:
            raise ConfigError(f"output_scale: must be positive, 'trained' or unset, got {self.output_scale}")
        if self.bias_min > self.bias_max:
            raise ConfigError("bias_min: must be ≤ bias_max")
        if self.input_norm not in ("none", "layer_norm"):
            raise ConfigError(f"input_norm: must be 'none' or 'layer_norm', got {self.input_norm!r}")
        for key in ("l1_coefficient", "l0_coefficient", "jumprelu_init_threshold"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{key}: must be ≥ 0, got {getattr(self, key)}")
        if not self.jumprelu_bandwidth > 0:
            raise ConfigError(f"jumprelu_bandwidth: must be positive, got {self.jumprelu_bandwidth}")
        if not 0 <= self.penalty_warmup <= 1:
            raise ConfigError(f"penalty_warmup: must be a fraction of the run in [0, 1], got {self.penalty_warmup}")
        for name in self.options:
            if name not in variant.option_defaults:
                known = ", ".join(variant.option_defaults) or "none"
                raise ConfigError(f"options.{name}: not an option of a {self.architecture} SAE (its options: {known})")
        variant.validate_config(self)

    @property
    def label(self) -> str:
        """The SAE's name in a run: `name`, else e.g. `topk-4608-k32`."""
        if self.name:
            return self.name
        return f"{self.architecture}-{self.d_sae}-{self.sparsity_label}"

    @property
    def sparsity_label(self) -> str:
        """What sets the SAE's sparsity, in a label: k32, l032 (a target L0: GBA, JumpReLU), l1c5 / l0c1 (a penalty)."""
        return self.variant.sparsity_label(self)

    @property
    def output_width(self) -> int:
        """The width of what the SAE reconstructs: d_in, or a transcoder's d_out."""
        return self.d_out if self.variant.transcoder and self.d_out else self.d_in

    def nested_widths(self) -> list[int]:
        """Matryoshka's prefix widths, the last one d_sae."""
        if self.matryoshka_widths:
            return list(self.matryoshka_widths)
        return [self.d_sae // 2**level for level in (4, 3, 2, 1) if self.d_sae // 2**level > 0] + [self.d_sae]

    def ladder_l0(self) -> float:
        """The L0 that GBA's targets imply: Σ over the latents of their group's target."""
        return self.d_sae / self.n_groups * sum(self.group_targets())

    @property
    def gba_regime(self) -> GBARegime:
        """`analysis` when GBA's ladder fires at least d_in latents a token, else `reconstruction` (class docstring)."""
        return "analysis" if self.ladder_l0() >= self.d_in else "reconstruction"

    @property
    def gba_tied(self) -> bool:
        """Whether GBA's latents encode and decode with one vector: `tied`, else by the regime."""
        return self.tied if self.tied is not None else self.gba_regime == "analysis"

    @property
    def gba_output_scale(self) -> float | None:
        """A tied GBA's fixed output scale, None when it trains: `output_scale`, else by the regime."""
        if self.output_scale == "trained":
            return None
        if self.output_scale is not None:
            return self.output_scale
        return ANALYSIS_OUTPUT_SCALE if self.gba_regime == "analysis" else None

    def gba_form(self) -> str:
        """GBA's form in words, as resolved: `analysis regime: tied, a fixed 0.01`, `reconstruction regime: untied`."""
        scale = self.gba_output_scale
        a = f", a {'trained' if scale is None else f'fixed {scale:g}'}" if self.gba_tied else ""
        return (
            f"{self.gba_regime} regime (its ladder fires {self.ladder_l0():.3g} latents a token, d_in {self.d_in}): "
            + ("tied" if self.gba_tied else "untied")
            + a
        )

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


def _own_keys(variant: type[SparseAutoencoder]) -> tuple[str, ...]:
    return COMMON_KEYS + variant.config_keys + (("options",) if variant.option_defaults else ())


def _registered(architecture: Any) -> type[SparseAutoencoder] | None:
    from saelab.sae.registry import registered

    return registered(architecture)
