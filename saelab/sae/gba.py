"""GBA SAE (Chen et al. 2025, "Taming Polysemanticity in LLMs"): encoder biases adapted toward per-group
firing targets instead of a sparsity penalty.

The loss is reconstruction alone; sparsity comes from the biases, which get no gradient. Latents
are split at random into G equal groups; group g has a target frequency p_g (`SAEConfig.group_targets`,
geometric from `target_high` to `target_low`). The paper's model (`tied: true`) has one unit vector w_i
per latent, used to encode and to decode, and an output scale a_i:

    u_i = w_i · (x' − b_dec) + b_i                        (W_enc is W_dec transposed)
    activation jumprelu (the paper's LLM form, default):  z_i = a_i · (u_i − b_i) · 1[u_i > 0]
    activation relu:                                      z_i = a_i · relu(u_i)
    x̂ = (Σ_i z_i w_i + b_dec) / c + μ                     x' = (x − μ)·c, the token's `input_norm` map

Untied (`tied: false`) the encoder is its own W_enc, u = (x' − b_dec) W_enc + b, z_i = (u_i − b_i)·1[u_i > 0]
(no a), decoded by unit rows of W_dec. Unset, the form follows the ladder (`SAEConfig.gba_regime`):
- where the ladder fires at least d_in latents a token (the analysis regime; the paper's toy, ≈ 205 in
  d 42), tied with every a_i fixed at 0.01, the paper's analysis (a → 0): each latent is pulled toward the
  tokens it fires on and settles on a feature. With trained a_i, or untied, the latents instead fit x
  together densely there (FVU ≈ 0, no feature found: `benchmarks/paper_gba.py`);
- elsewhere (the reconstruction regime: any LLM, L0 ≪ d_in) untied: the tied encoder cannot subtract
  other features' interference, which an untied one learns to, and on SmolLM2 at L0 32 the tied form
  reconstructs 19 % worse than TopK (FVU 0.230 against 0.194) where the untied one is level (0.193) over the
  long run's 2M tokens (docs/variants.md, the long run).

The paper's analysis takes unit-norm inputs, so tokens are layer-normalised by default (`input_norm`
unset: every token centred and scaled to ‖x'‖ ≈ √d_in). With one dataset-wide scale instead, a fixed
threshold fires most on the tokens of largest norm, where other features' interference is largest:
on the synthetic benchmark rows with one true feature got 0.8 latents and rows with seven got 12.7,
and GBA recovered 88.9 % of the features against 92.0 % layer-normalised (README, `benchmarks/recovery.py`).

In the JumpReLU form the bias only decides *whether* latent i fires (threshold −b_i on its projection);
its output is the whole projection, so nothing grows to undo the bias, which the ReLU form's shrinkage
invites (there L0 drifted far above target while the encoder grew). On the synthetic benchmark of
`benchmarks/recovery.py` (L0 4 in d 64, the reconstruction regime) the tied form recovers more features
(92.4 / 91.0 % for seeds 0 / 1 at lr 1e-2, against 81.8 / 77.9 % untied); `tied: true` chooses it.
Trained, the a_i move at √d_in times the run's learning rate (`parameter_groups`): at one rate, the
default SmolLM2 run's 150 steps took them only from 0.10 to 0.14, and its FVU ended at 0.445 against
TopK's 0.312.

Over a window of `update_tokens` tokens each latent records how often it fired and its largest
pre-activation; then, with p̂_i = fires_i / tokens, r_i = max_t u_ti and r̄_g the mean r of the
latents of group g that fired (the mean |r| of the group when none did):

    bias_rule balanced (the default):  b_i ← b_i + γ · r̄_g · clamp(n_g · log2(p_g / p̂_i), −16, 16)   (log2 → 1 if dead)
    bias_rule paper:                   p̂_i > p_g:    b_i ← b_i − γ·r_i        (fires too often: lower)
                                       p̂_i < ε:      b_i ← b_i + γ·r̄_g       (dead: raise)

both clipped to [bias_min, bias_max]. The paper's rule is one-sided: a latent firing below its
target but above ε is left alone, so a group settles anywhere under its target; measured on the
default SmolLM2 run its groups ended at 0.3–0.6× their targets. `balanced` moves every latent toward
its target by a step that grows with the miss in octaves (one octave: the paper's step with the
group's reach; at most 16 such steps), so the frequencies converge from either side; a dead latent gets
the paper's raise. Each group adapts over its own window, `update_tokens` or long enough for
MIN_FIRES expected firings at its target, whichever is longer (one batch cannot measure a target of
3e-4: a latent fires 0, 1 or 2 times and the rule chases noise; on SmolLM2 the rare groups sat at
2–5× their targets that way), and n_g = window / update_tokens makes a rare group's fewer, longer
windows move its biases as fast per token as a frequent group's, up to the cap. Measured on the
default SmolLM2 run (150 steps, target L0 32), the rarest groups ended at 7–29× their targets with a
cap of 4 and at 1.6–2.2× with 16; uncapped, a 65-batch window on the synthetic benchmark made its
rarest group swing between dead and 50× its target, while a cap of 16 left every group within 1.2×.
Adapting every batch (`update_tokens` = the batch size) gives a short run enough updates. The speed
is a trade: biases that move less often or by less let the latents settle on features (on the
2,048-step synthetic benchmark, 16,384-token windows recovered 95.4 % against 92.0 % at 4,096), while
a short run needs them fast (the 150-step SmolLM2 run ends with its rarest group at 1.65× its target
at γ 0.01, 1.28× at γ 0.02; `configs/train-smollm2.yaml` uses 0.02).

Defaults, measured on SmolLM2's blocks.15 residual (2,048,000-token store, 4,608 latents, L0 32, the first
1,024,000 tokens = 250 steps; FVU of the last 20 training batches, each unseen before its step; TopK k 32:
0.2367). Untied: ladder 0.1…1e-3 (the paper's) and γ 0.01: 0.2438 at L0 31.6; ladder 0.1…0.01: 0.2389 at
31.5 (0.1…3.3e-3: 0.2414); the 10× ladder with γ 0.02: 0.2361 at 32.3 (γ 0.04: 0.2358 at 32.6). Tied, trained
a: 0.2639 at 33.5 (10× ladder: 0.2622 at 33.9). TopK's own latents fired at 1.2e-3…1.5e-2 between their 10th
and 90th percentiles, 12×, where the paper's ladder scaled to L0 32 spans 2.8e-2…2.8e-4, 100×; with γ 0.01 the
groups sat at ~0.95× their targets while the encoder kept moving, and γ 0.02 closes that lag. On the paper's
toy (the analysis regime) γ 0.02 and 0.01 both recover 100 % of the features.

The bias range [bias_min, bias_max] is stated, as in the paper, for unit-norm inputs; saelab's tokens
have ‖x'‖ ≈ √d_in (either `input_norm`), so the bounds used are the configured ones times √d_in
(`bias_bounds`). Before training, `calibrate_biases` starts each b_i at the bias that gives its group's
target frequency on a sample, so the adaptation steers from the targets rather than from L0 ≈ d_sae/2.

All state lives in buffers, so `state_dict()` checkpoints it exactly. In data-parallel training
the window's statistics (`observe`, or in training `_observe_reach` per tile and `selected_` from the kept
pairs) are summed (fires, tokens) or maxed (reach) over ranks, so every rank holds the global window and
adapts its biases identically.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saelab.errors import ConfigError
from saelab.kernels import AboveThreshold
from saelab.kernels.encode import SelectionRule, TileObserver
from saelab.kernels.sparse_ops import is_full
from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.registry import register

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

MAX_STEPS = 16.0  # the balanced rule moves a bias by at most 16 of the paper's steps per adaptation
MIN_FIRES = 10  # expected firings at its target that a group's window must hold (balanced rule)
OUTPUT_SCALE_INIT = 0.1  # a_i at the start: small, as in the paper's analysis (a → 0); trained by Adam
MIN_OUTPUT_SCALE = 1e-4
_NEVER = 1e-12  # keeps log2(target / p̂) finite; a latent that never fired takes the dead branch instead


class GBASAE(SparseAutoencoder):
    """JumpReLU (or ReLU) latents; `b_enc` is moved by `adapt_biases`, never by the optimiser."""

    architecture = "gba"
    config_keys = (
        "n_groups",
        "target_high",
        "target_low",
        "target_l0",
        "update_tokens",
        "gamma",
        "activation",
        "tied",
        "output_scale",
        "bias_rule",
        "dead_eps",
        "bias_min",
        "bias_max",
    )
    normalises_input_by_default = True  # its analysis assumes unit-norm inputs (its bias range [−1, 0])
    saelens_architecture = "jumprelu"
    group: torch.Tensor  # [d_sae] long, the group of each latent
    target: torch.Tensor  # [d_sae], the target frequency of each latent's group
    fires: torch.Tensor  # [d_sae] long, tokens on which each latent had u > 0 in this window
    max_pre_activation: torch.Tensor  # [d_sae], r_i over this window (-inf before any token)
    tokens_observed: torch.Tensor  # [n_groups] long, tokens in each group's current window
    group_frequency: torch.Tensor  # [n_groups] each group's mean firing frequency in its last window (-1: none yet)
    data_parallel: DataParallel | None = None  # set by the data-parallel trainer: `observe` all-reduces

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        with torch.no_grad():
            self.b_enc.clamp_(*self.bias_bounds)
        self.b_enc.requires_grad_(False)
        self._encoder_is_decoder = cfg.gba_tied
        if cfg.gba_tied:  # one unit vector w_i encodes and decodes; a_i scales the output
            del self.W_enc
            fixed = cfg.gba_output_scale is not None  # the paper's analysis: only the w_i learn
            start = cfg.gba_output_scale if fixed else OUTPUT_SCALE_INIT
            self.output_scale = nn.Parameter(torch.full((cfg.d_sae,), start), requires_grad=not fixed)
        # As equal as d_sae allows: sizes differ by at most one (4608 latents in 10 groups: 460 or 461).
        group = torch.empty(cfg.d_sae, dtype=torch.long)
        group[torch.randperm(cfg.d_sae, generator=generator)] = torch.arange(cfg.d_sae) * cfg.n_groups // cfg.d_sae
        self.register_buffer("group", group)
        self.register_buffer("target", torch.tensor(cfg.group_targets())[group])
        self.register_buffer("fires", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.register_buffer("max_pre_activation", torch.full((cfg.d_sae,), -torch.inf))
        self.register_buffer("tokens_observed", torch.zeros(cfg.n_groups, dtype=torch.long))
        self.register_buffer("group_frequency", torch.full((cfg.n_groups,), -1.0))
        windows = torch.tensor([self._window(target) for target in cfg.group_targets()])
        # [n_groups] tokens each group's window must hold before its biases adapt (`_window`)
        self.register_buffer("window", windows, persistent=False)

    # --- what GBA declares as a variant (`SparseAutoencoder`) ---

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        if cfg.n_groups > cfg.d_sae:
            raise ConfigError(f"n_groups: {cfg.n_groups} groups cannot be made from d_sae {cfg.d_sae} latents")

    @classmethod
    def sparsity_label(cls, cfg: SAEConfig) -> str:
        return f"l0{cfg.target_l0:g}" if cfg.target_l0 else f"k{cfg.k}"

    @classmethod
    def sparsity_in_words(cls, cfg: SAEConfig) -> str:
        return f"L0 target {cfg.target_l0:g}" if cfg.target_l0 is not None else "per-group targets"

    @classmethod
    def config_notice(cls, cfg: SAEConfig) -> str:
        """Its target frequencies by group, and what `target_l0` did to the configured ladder."""
        targets = ", ".join(f"{t:.2g}" for t in cfg.group_targets())
        notice = f"{cfg.label}: GBA target frequencies by group (highest first): {targets}"
        if cfg.target_l0 is None:
            return notice
        scale = cfg.group_targets()[0] / cfg.target_high
        configured = f"{cfg.target_high:g}…{cfg.target_low:g}"
        return f"{notice} (target_l0 {cfg.target_l0:g} scaled the ladder {configured} by {scale:.3g})"

    @classmethod
    def upgrade_saved_config(cls, fields: dict[str, Any]) -> None:
        """Saved before GBA's paper form: an untied ReLU SAE."""
        fields.setdefault("activation", "relu")
        fields.setdefault("tied", False)

    @classmethod
    def keep_saved_form(cls, saved: SAEConfig, cfg: SAEConfig) -> None:
        """A run saved when GBA was always tied (with a trained output scale) keeps that form when resumed from a
        config that leaves `tied` and `output_scale` unset, which now mean "by the ladder's regime"."""
        cfg.tied = saved.tied if cfg.tied is None else cfg.tied
        cfg.output_scale = saved.output_scale if cfg.output_scale is None else cfg.output_scale

    @classmethod
    def saved_as(cls, cfg: SAEConfig) -> str:
        """A JumpReLU SAE exactly (thresholds −a·b); with the ReLU activation a standard one (b_enc a·b)."""
        return "standard" if cfg.activation == "relu" else "jumprelu"

    @classmethod
    def note(cls, cfg: SAEConfig) -> str:
        if cfg.activation == "relu":
            return "GBA: a ReLU SAE whose encoder biases were adapted to per-group firing targets; they are b_enc."
        return "GBA: a JumpReLU SAE whose thresholds (−b_enc) were adapted to per-group firing targets."

    def form(self) -> str:
        return f"GBA in the {self.cfg.gba_form()}"

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        """Tied, latent i's output scale a_i > 0 goes into its encoder column: a·(w·x')·1[w·x' + b > 0] =
        h·1[h > −a·b] with h = (a·w)·x' (JumpReLU: threshold −a·b, b_enc 0), and a·relu(w·x' + b) =
        relu((a·w)·x' + a·b) (ReLU: b_enc a·b)."""
        a = self.output_scale.double() if self.cfg.gba_tied else torch.ones_like(self.b_enc, dtype=torch.float64)
        b = self.b_enc.double()
        weights["W_enc"] = self.W_enc.double() * a * fold_in
        if self.cfg.activation == "jumprelu":
            weights |= {"threshold": -a * b, "b_enc": torch.zeros_like(b)}
        else:
            weights["b_enc"] = a * b

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        """Undo `to_saelens_`: tied, a_i = ‖column i‖ (the w_i are the unit decoder rows) and b = b_enc / a or
        −threshold / a; untied, W_enc as it is and b = b_enc or −threshold."""
        W_enc, threshold = tensors["W_enc"] / fold_in, tensors.get("threshold")
        a = W_enc.norm(dim=0) if self.cfg.gba_tied else torch.ones_like(tensors["b_enc"])
        if self.cfg.gba_tied:
            self.output_scale.copy_(a)
        else:
            self.W_enc.copy_(W_enc)
        self.b_enc.copy_((tensors["b_enc"] if threshold is None else -threshold.double()) / a)

    def use_data_parallel(self, parallel: DataParallel) -> None:
        self.data_parallel = parallel  # its window statistics are summed over ranks (`observe`)

    def after_step(self) -> None:
        self.adapt_biases()  # adapts the groups whose window is full, if any

    def parameter_groups(self) -> list[dict]:
        """Tied: a_i learns √d_in times faster than the weights. Adam moves every parameter by about lr a
        step; an entry of a unit w_i is ~1/√d_in, a_i is ~1, so at one lr a_i would change √d_in times more
        slowly, relative to its size, than w_i (on SmolLM2, 150 steps took a_i from 0.10 to 0.14 only)."""
        if not self.cfg.gba_tied or not self.output_scale.requires_grad:
            return super().parameter_groups()
        weights = [p for name, p in self.named_parameters() if p.requires_grad and name != "output_scale"]
        return [{"params": weights, "lr_scale": 1.0}, {"params": [self.output_scale], "lr_scale": self.cfg.d_in**0.5}]

    def _window(self, target: float) -> int:
        """Tokens between adaptations of a group: `update_tokens`, and for the balanced rule at least
        enough for MIN_FIRES expected firings at the target, so a rare group's miss is measured, not guessed."""
        if self.cfg.bias_rule == "paper":
            return self.cfg.update_tokens
        return max(self.cfg.update_tokens, math.ceil(MIN_FIRES / target))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # Saved when one window served every group (a scalar count): the same count for every group.
        key = prefix + "tokens_observed"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].expand(self.cfg.n_groups).clone()
        state_dict.setdefault(prefix + "group_frequency", torch.full((self.cfg.n_groups,), -1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "W_enc" and self.__dict__.get("_encoder_is_decoder"):  # tied: the decoder, transposed
            return self.W_dec.T
        return super().__getattr__(name)

    @property
    def bias_bounds(self) -> tuple[float, float]:
        """[bias_min, bias_max] scaled from unit-norm inputs to saelab's ‖x‖ ≈ √d_in."""
        scale = self.cfg.d_in**0.5
        return self.cfg.bias_min * scale, self.cfg.bias_max * scale

    def calibrate(self, sample: torch.Tensor) -> None:
        self.calibrate_biases(sample)

    @torch.no_grad()
    def calibrate_biases(self, sample: torch.Tensor) -> None:
        """Set b_i so latent i fires on its target fraction of `sample: [n, d_in]` (within the bounds)."""
        self.b_enc.zero_()
        u = self.pre_activations(sample)
        for group, target in enumerate(self.cfg.group_targets()):
            members = self.group == group
            rank = min(len(u), max(1, round((1 - target) * len(u))))  # u above its rank-th value: ≈ target
            self.b_enc[members] = -u[:, members].kthvalue(rank, dim=0).values
        self.b_enc.clamp_(*self.bias_bounds)

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """JumpReLU: z = a·(u − b_enc)·1[u > 0]; ReLU: z = a·relu(u) (a = 1 untied). [..., d_sae] → same shape."""
        return self._activate(pre_activations, slice(None))

    def kept_values(
        self, indices: torch.Tensor, pre_activations: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        # kept pairs have u > 0; padded slots hold exactly 0 and stay 0 (b_enc takes no gradient)
        return self._activate(pre_activations, indices)

    def _activate(self, u: torch.Tensor, latents: torch.Tensor | slice) -> torch.Tensor:
        """The activation of `select` for u whose last axis holds the latents `latents` (all: `slice(None)`)."""
        z = u.relu() if self.cfg.activation == "relu" else torch.where(u > 0, u - self.b_enc[latents], 0)
        return z * self.output_scale[latents] if self.cfg.gba_tied else z

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Unit decoder rows (tied: the w_i, as the paper's spherical gradient descent keeps them), and a_i > 0,
        so that a latent's output keeps the sign of its projection (and SAELens's JumpReLU expresses it)."""
        super().normalize_decoder_()
        if self.cfg.gba_tied:
            self.output_scale.clamp_(min=MIN_OUTPUT_SCALE)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return AboveThreshold(0.0)

    def tile_observer(self) -> TileObserver | None:
        """In training, `sparse_forward` feeds every tile of u to `_observe_reach`, and `selected_` counts the
        firings from the kept pairs (u > 0: the same count, without another pass over u)."""
        return self._observe_reach if self.training else None

    @torch.no_grad()
    def observe(self, pre_activations: torch.Tensor, start: int = 0) -> None:
        """Count firings and track the largest pre-activation of latents [start, start + width).

        pre_activations: [batch, width]; the window's token count moves once per batch (at start 0).
        Data-parallel (`data_parallel` set by the trainer): the counts are summed and the maxima taken
        over ranks, whose slices are equal, so every rank holds the global window.
        """
        u = pre_activations.reshape(-1, pre_activations.shape[-1])
        self._observe_reach(u, start)
        self._count_fires((u > 0).sum(0), slice(start, start + u.shape[-1]))

    @torch.no_grad()
    def selected_(self, indices: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """The firings of a training batch, from its kept pairs: `valid` marks u > 0 (`AboveThreshold(0)`)."""
        if not self.training:
            return
        kept = valid if valid is not None else values > 0
        if is_full(indices, self.cfg.d_sae):  # a dense selection: every latent's slot, in order
            fires = kept.sum(0)
        else:
            fires = torch.zeros_like(self.fires).index_add_(0, indices.reshape(-1), kept.reshape(-1).long())
        self._count_fires(fires, slice(None))

    @torch.no_grad()
    def _observe_reach(self, pre_activations: torch.Tensor, start: int = 0) -> None:
        """r_i of latents [start, start + width) and, at start 0, the batch's tokens (see `observe`)."""
        u = pre_activations.reshape(-1, pre_activations.shape[-1])
        latents = slice(start, start + u.shape[-1])
        reach, tokens = u.amax(0), u.shape[0]
        if self.data_parallel is not None:
            reach = self.data_parallel.max_(reach)
            tokens *= self.data_parallel.world_size
        self.max_pre_activation[latents] = torch.maximum(self.max_pre_activation[latents], reach)
        if start == 0:
            self.tokens_observed += tokens

    def _count_fires(self, fires: torch.Tensor, latents: slice) -> None:
        if self.data_parallel is not None:
            fires = self.data_parallel.sum_(fires)
        self.fires[latents] += fires

    def adaptation_due(self) -> bool:
        return bool(self._due_groups().any())

    def _due_groups(self) -> torch.Tensor:
        """[n_groups] bool: the groups whose window is full (a window is at least one token)."""
        return self.tokens_observed >= self.window

    @torch.no_grad()
    def adapt_biases(self) -> None:
        """Apply the update rule above to the groups whose window is full and start their new windows.

        Every step computes the rule for every latent and keeps it where a window is full: asking the
        device whether any is would make the host wait for it each step.
        """
        cfg = self.cfg
        due_groups = self._due_groups()
        due = due_groups[self.group]
        freq = self.fires / self.tokens_observed[self.group].clamp_min(1)  # p̂_i
        reach = self.max_pre_activation  # r_i
        fired = (self.fires > 0).to(reach.dtype)
        n_fired = self._group_sum(fired)
        mean_fired = self._group_sum(torch.where(fired > 0, reach, 0)) / n_fired.clamp_min(1)
        group_size = self._group_sum(torch.ones_like(reach))
        mean_abs = self._group_sum(reach.abs()) / group_size
        r_bar = torch.where(n_fired > 0, mean_fired, mean_abs)[self.group]

        b = self.b_enc
        low, high = self.bias_bounds
        if cfg.bias_rule == "balanced":
            miss = torch.log2(self.target / freq.clamp_min(_NEVER))
            miss = torch.where(freq == 0, 1.0, miss)  # a dead latent: the paper's raise…
            batches = (self.window.float() / cfg.update_tokens)[self.group]  # …times the batches its window spans
            steps = (miss * batches).clamp(-MAX_STEPS, MAX_STEPS)
            adapted = (b + cfg.gamma * r_bar * steps).clamp(low, high)
        else:
            adapted = torch.where(freq > self.target, (b - cfg.gamma * reach).clamp(min=low), b)
            adapted = torch.where(freq < cfg.dead_eps, (adapted + cfg.gamma * r_bar).clamp(max=high), adapted)
        b.copy_(torch.where(due, adapted, b))

        self.group_frequency.copy_(torch.where(due_groups, self._group_sum(freq) / group_size, self.group_frequency))
        self.fires.masked_fill_(due, 0)
        self.max_pre_activation.masked_fill_(due, -torch.inf)
        self.tokens_observed.masked_fill_(due_groups, 0)

    def logged_metrics(self) -> dict[str, float]:
        return self.group_metrics()

    def latent_groups(self) -> torch.Tensor:
        """Each latent's frequency group (group 0 has the highest target)."""
        return self.group

    def group_metrics(self) -> dict[str, float]:
        """`group{g}/freq` (the mean firing frequency of group g in its last window) and `group{g}/target`,
        for every group measured so far; group 0 has the highest target."""
        metrics = {}
        measured_frequencies = self.group_frequency.tolist()
        for g, (measured, target) in enumerate(zip(measured_frequencies, self.cfg.group_targets(), strict=True)):
            if measured >= 0:
                metrics[f"group{g}/freq"], metrics[f"group{g}/target"] = measured, target
        return metrics

    def _group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[d_sae] → [n_groups]: the sum of `values` over each group's latents."""
        return values.new_zeros(self.cfg.n_groups).index_add_(0, self.group, values)


register(GBASAE)
