"""GBA SAE (Chen et al. 2025, "Taming Polysemanticity in LLMs"): encoder biases adapted toward per-group
firing targets instead of a sparsity penalty.

The loss is reconstruction alone; sparsity comes from the biases, which get no gradient. Latents
are split at random into G equal groups; group g has a target frequency p_g (`SAEConfig.group_targets`,
geometric from `target_high` to `target_low`). With u = (x·s − b_dec) W_enc + b_enc:

    activation jumprelu (the paper's LLM form, the default):  z_i = (u_i − b_i)·1[u_i > 0]
    activation relu:                                          z_i = relu(u_i)

In the JumpReLU form the bias only decides *whether* latent i fires (threshold −b_i on w_i·(x·s − b_dec));
its output is the whole projection, so the encoder has no reason to grow to undo the bias, which the
ReLU form's shrinkage invites (there L0 drifted far above target while the encoder grew).

Over a window of `update_tokens` tokens each latent records how often it fired and its largest
pre-activation; then, with p̂_i = fires_i / tokens, r_i = max_t u_ti and r̄_g the mean r of the
latents of group g that fired (the mean |r| of the group when none did):

    bias_rule balanced (the default):  b_i ← b_i + γ · r̄_g · clamp(log2(p_g / p̂_i), −1, 1)
    bias_rule paper:                   p̂_i > p_g:    b_i ← b_i − γ·r_i        (fires too often: lower)
                                       p̂_i < ε:      b_i ← b_i + γ·r̄_g       (dead: raise)

both clipped to [bias_min, bias_max]. The paper's rule is one-sided: a latent firing below its
target but above ε is left alone, so a group settles anywhere under its target; measured on the
default SmolLM2 run its groups ended at 0.3–0.6× their targets while the rare groups sat at 1.5–3×
(the window of one batch sees them fire once or twice). `balanced` moves every latent toward its
target by a step that grows with the miss (in octaves, capped at the paper's step for a miss of 2× or
more): a dead latent gets exactly the paper's raise, one twice as frequent as its target the
paper's cut with the group's reach instead of its own, and the frequencies converge from either side.
Adapting every batch (`update_tokens` = the batch size) gives a short run enough updates.

The bias range [bias_min, bias_max] is stated, as in the paper, for unit-norm inputs; saelab's trainer
normalises inputs to ‖x‖ ≈ √d_in, so the bounds used are the configured ones times √d_in
(`bias_bounds`). Before training, `calibrate_biases` starts each b_i at the bias that gives its group's
target frequency on a sample, so the adaptation steers from the targets rather than from L0 ≈ d_sae/2.

All state lives in buffers, so `state_dict()` checkpoints it exactly. In data-parallel training
`observe` adds each batch's window statistics summed (fires, tokens) or maxed (reach) over ranks, so
every rank holds the global window and adapts its biases identically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saelab.kernels import AboveThreshold
from saelab.kernels.encode import SelectionRule, TileObserver
from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

_NEVER = 1e-12  # a frequency below any target: log2(target / 0) is clamped to +1 anyway


class GBASAE(SparseAutoencoder):
    """JumpReLU (or ReLU) latents; `b_enc` is moved by `adapt_biases`, never by the optimiser."""

    group: torch.Tensor  # [d_sae] long, the group of each latent
    target: torch.Tensor  # [d_sae], the target frequency of each latent's group
    fires: torch.Tensor  # [d_sae] long, tokens on which each latent had u > 0 in this window
    max_pre_activation: torch.Tensor  # [d_sae], r_i over this window (-inf before any token)
    tokens_observed: torch.Tensor  # [] long, tokens in this window
    data_parallel: DataParallel | None = None  # set by the data-parallel trainer: `observe` all-reduces

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        with torch.no_grad():
            self.b_enc.clamp_(*self.bias_bounds)
        self.b_enc.requires_grad_(False)
        # As equal as d_sae allows: sizes differ by at most one (4608 latents in 10 groups: 460 or 461).
        group = torch.empty(cfg.d_sae, dtype=torch.long)
        group[torch.randperm(cfg.d_sae, generator=generator)] = torch.arange(cfg.d_sae) * cfg.n_groups // cfg.d_sae
        self.register_buffer("group", group)
        self.register_buffer("target", torch.tensor(cfg.group_targets())[group])
        self.register_buffer("fires", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.register_buffer("max_pre_activation", torch.full((cfg.d_sae,), -torch.inf))
        self.register_buffer("tokens_observed", torch.zeros((), dtype=torch.long))

    @property
    def bias_bounds(self) -> tuple[float, float]:
        """[bias_min, bias_max] scaled from unit-norm inputs to saelab's ‖x‖ ≈ √d_in."""
        scale = self.cfg.d_in**0.5
        return self.cfg.bias_min * scale, self.cfg.bias_max * scale

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
        """JumpReLU: z = (u − b_enc)·1[u > 0]; ReLU: z = relu(u). [..., d_sae] → same shape."""
        if self.cfg.activation == "relu":
            return pre_activations.relu()
        return torch.where(pre_activations > 0, pre_activations - self.b_enc, 0)

    def kept_values(self, indices: torch.Tensor, pre_activations: torch.Tensor) -> torch.Tensor:
        if self.cfg.activation == "relu":
            return pre_activations.relu()
        # kept pairs have u > 0; padded slots hold exactly 0 and stay 0 (b_enc takes no gradient)
        return torch.where(pre_activations > 0, pre_activations - self.b_enc[indices], 0)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return AboveThreshold(0.0)

    def tile_observer(self) -> TileObserver | None:
        """In training, `sparse_forward` feeds every tile of u to `observe`."""
        return self.observe if self.training else None

    @torch.no_grad()
    def observe(self, pre_activations: torch.Tensor, start: int = 0) -> None:
        """Count firings and track the largest pre-activation of latents [start, start + width).

        pre_activations: [batch, width]; the window's token count moves once per batch (at start 0).
        Data-parallel (`data_parallel` set by the trainer): the counts are summed and the maxima taken
        over ranks, whose slices are equal, so every rank holds the global window.
        """
        u = pre_activations.reshape(-1, pre_activations.shape[-1])
        latents = slice(start, start + u.shape[-1])
        fires, reach, tokens = (u > 0).sum(0), u.amax(0), u.shape[0]
        if self.data_parallel is not None:
            fires, reach = self.data_parallel.sum_(fires), self.data_parallel.max_(reach)
            tokens *= self.data_parallel.world_size
        self.fires[latents] += fires
        self.max_pre_activation[latents] = torch.maximum(self.max_pre_activation[latents], reach)
        if start == 0:
            self.tokens_observed += tokens

    def adaptation_due(self) -> bool:
        return int(self.tokens_observed) >= self.cfg.update_tokens

    @torch.no_grad()
    def adapt_biases(self) -> dict[str, float]:
        """Apply the update rule above, start a new window, and return each group's measured
        frequency and target (`group{g}/freq`, `group{g}/target`; group 0 has the highest target)."""
        cfg = self.cfg
        if int(self.tokens_observed) == 0:
            return {}
        freq = self.fires / self.tokens_observed  # p̂_i
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
            miss = torch.log2(self.target / freq.clamp_min(_NEVER)).clamp(-1, 1)
            b.copy_((b + cfg.gamma * r_bar * miss).clamp(low, high))
        else:
            b.copy_(torch.where(freq > self.target, (b - cfg.gamma * reach).clamp(min=low), b))
            b.copy_(torch.where(freq < cfg.dead_eps, (b + cfg.gamma * r_bar).clamp(max=high), b))

        group_freq = (self._group_sum(freq) / group_size).tolist()
        self.fires.zero_()
        self.max_pre_activation.fill_(-torch.inf)
        self.tokens_observed.zero_()
        metrics = {}
        for g, (measured, target) in enumerate(zip(group_freq, cfg.group_targets(), strict=True)):
            metrics[f"group{g}/freq"] = measured
            metrics[f"group{g}/target"] = target
        return metrics

    def _group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[d_sae] → [n_groups]: the sum of `values` over each group's latents."""
        return values.new_zeros(self.cfg.n_groups).index_add_(0, self.group, values)
