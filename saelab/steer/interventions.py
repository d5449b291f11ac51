"""Interventions: what steering does to the activation at one hook, and at which positions.

An intervention edits `x: [batch, seq, d]` at the positions its rule selects and leaves the others
as they are, bit for bit:

    AddDirection   x ← x + c·d                        d a direction in model units, e.g. W_dec[f] / s
    SAEEdit        x ← x + (z' − z) W_dec / c          z = SAE.encode(x), z' = z with some latents set, c the
                                                        token's scale into the SAE's space (`TokenNorm`)
                   (keep_error, the default)            = decode(z') + (x − x̂): x̂'s error term is kept,
                                                          so only the edited latents change; the sum is
                                                          taken in this order so that z' = z leaves x exactly
                   x ← decode(z')                       (keep_error=False: the SAE spliced in, error dropped)

`clamp_feature` (set latent f to a value), `ablate_feature` (set it to 0) and `splice_sae` (no
latent changed) are SAEEdits; `add_feature` is an AddDirection along a latent's decoder row.

Positions. `prompt_length` P is the number of prompt tokens; positions t ≥ P hold generated tokens.
`positions="all"` edits every t ≥ 1, `"prompt"` 1 ≤ t < P, `"generated"` t ≥ P. Position 0 (the
BOS, an attention sink whose norm is ~100× the others', which no SAE here was trained on) is
never edited unless `include_first_position=True`. Without a prompt length every position is a
prompt position (a plain forward pass over a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from saelab.errors import SaelabError
from saelab.sae.base import SparseAutoencoder

Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[Positions, ...] = ("all", "prompt", "generated")
Mode = Literal["add", "clamp", "ablate"]
MODES: tuple[Mode, ...] = ("add", "clamp", "ablate")


def position_mask(
    seq_len: int, prompt_length: int | None, positions: Positions, include_first_position: bool = False
) -> torch.Tensor:
    """`[seq_len]` bool: the positions an intervention edits (see the module docstring)."""
    if positions not in POSITIONS:
        raise SaelabError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    t = torch.arange(seq_len)
    boundary = seq_len if prompt_length is None else prompt_length
    if positions == "all":
        mask = torch.ones(seq_len, dtype=torch.bool)
    elif positions == "prompt":
        mask = t < boundary
    else:
        mask = t >= boundary
    if not include_first_position:
        mask &= t >= 1
    return mask


@dataclass(eq=False)
class Intervention:
    """An edit of the activation at `hook` on the positions its rule selects; subclasses give `edit`."""

    hook: str
    positions: Positions = field(default="all", kw_only=True)
    include_first_position: bool = field(default=False, kw_only=True)

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """The edited rows: `x: [n, d]` → `[n, d]`."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, prompt_length: int | None = None) -> torch.Tensor:
        """`x: [batch, seq, d]` with the selected positions edited; a new tensor, `x` is not modified."""
        mask = position_mask(x.shape[1], prompt_length, self.positions, self.include_first_position)
        if not mask.any():
            return x
        mask = mask.to(x.device)
        selected = x[:, mask]
        out = x.clone()
        out[:, mask] = self.edit(selected.reshape(-1, x.shape[-1])).reshape(selected.shape).to(x.dtype)
        return out


@dataclass(eq=False)
class AddDirection(Intervention):
    """x ← x + coefficient · direction, `direction: [d]` in the hook's units."""

    direction: torch.Tensor = field(kw_only=True)
    coefficient: float = field(default=1.0, kw_only=True)

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.direction.shape[-1]:
            raise SaelabError(
                f"hook {self.hook} carries vectors of size {x.shape[-1]} but the steering direction has "
                f"{self.direction.shape[-1]}; steer at a hook of the SAE's width (e.g. a residual stream hook)"
            )
        return x + self.coefficient * self.direction.to(x.device, x.dtype)


@dataclass(eq=False)
class SAEEdit(Intervention):
    """Encode with `sae`, set the latents `latents` ({index: value}), decode; with `keep_error` add
    back the SAE's error term x − x̂ so that only the edited latents change (see the module docstring)."""

    sae: SparseAutoencoder = field(kw_only=True)
    latents: dict[int, float] = field(default_factory=dict, kw_only=True)
    keep_error: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        if self.sae.cfg.hook_name_out:
            raise SaelabError(
                f"{self.sae.cfg.label} is a transcoder: it reads {self.sae.cfg.hook_name} and writes "
                f"{self.sae.cfg.hook_name_out}, so its latents cannot be edited in place at one hook; steer with "
                "add_feature (its decoder direction, added at the hook it writes)"
            )
        for index in self.latents:
            check_feature(self.sae, index)

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        x_sae = x.to(sae.W_dec.dtype)
        norm = sae.token_norm(x_sae)
        z = sae.encode(x_sae, norm=norm)
        edited = z.clone()
        for index, value in self.latents.items():
            edited[:, index] = value
        if not self.keep_error:
            return sae.decode(edited, norm)
        return x + norm.direction((edited - z) @ sae.W_dec)


@dataclass(eq=False)
class NodeEdit(Intervention):
    """Scale single nodes of `sae` at given positions, the way a circuit names them: `nodes` maps
    (position, latent) to a factor, and (position, None) the SAE's error term there; 0 ablates, 2 doubles.

        x_t ← x_t + Σ_i (f_ti − 1) z_ti W_dec[i] / c_t  +  (f_t − 1) ε_t        ε_t = x_t − x̂_t

    Every other latent, the other positions and (but where it is scaled) the error term are left as they
    are; positions past the sequence (a shorter pass) are skipped. `positions` does not apply: the nodes
    name their positions (`saelab.circuits`; node positions count the BOS as 0)."""

    sae: SparseAutoencoder = field(kw_only=True)
    nodes: dict[tuple[int, int | None], float] = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.sae.cfg.hook_name_out:
            raise SaelabError(
                f"{self.sae.cfg.label} is a transcoder (it reads {self.sae.cfg.hook_name}): its nodes cannot be "
                f"edited at {self.hook} alone; edit the nodes of SAEs, or steer with add_feature"
            )
        for position, latent in self.nodes:
            if latent is not None:
                check_feature(self.sae, latent)
            if position < 0:
                raise SaelabError(f"node position {position} is negative; positions count from 0 (the BOS)")

    def apply(self, x: torch.Tensor, prompt_length: int | None = None) -> torch.Tensor:
        """`x: [batch, seq, d]` with the named nodes scaled; a new tensor, `x` is not modified."""
        rows = sorted({position for position, _ in self.nodes if position < x.shape[1]})
        if not rows:
            return x
        sae, out = self.sae, x.clone()
        selected = x[:, rows].to(sae.W_dec.dtype)  # [batch, n, d]
        norm = sae.token_norm(selected)
        z = sae.encode(selected, norm=norm)
        error = selected - sae.decode(z, norm)
        change = torch.zeros_like(selected)
        for (position, latent), factor in self.nodes.items():
            if position >= x.shape[1]:
                continue
            row = rows.index(position)
            if latent is None:
                change[:, row] += (factor - 1) * error[:, row]
            else:
                scale = norm.scale if norm.scale.dim() == 0 else norm.scale[:, row]
                change[:, row] += (factor - 1) * z[:, row, latent, None] * sae.W_dec[latent] / scale
        out[:, rows] = x[:, rows] + change.to(x.dtype)
        return out


def check_feature(sae: SparseAutoencoder, index: int) -> None:
    """A SaelabError unless `index` is one of the SAE's latents."""
    if not 0 <= index < sae.cfg.d_sae:
        raise SaelabError(f"latent {index} does not exist: {sae.cfg.label} has latents 0..{sae.cfg.d_sae - 1}")


def _hook_of(sae: SparseAutoencoder, hook: str | None) -> str:
    """`hook`, else the hook the SAE writes: its own, or a transcoder's output hook."""
    hook = hook or sae.cfg.hook_name_out or sae.cfg.hook_name
    if not hook:
        raise SaelabError(f"{sae.cfg.label} does not record the hook it was trained on; pass hook=")
    return hook


def add_feature(
    sae: SparseAutoencoder,
    feature: int,
    coefficient: float,
    hook: str | None = None,
    positions: Positions = "all",
    include_first_position: bool = False,
) -> AddDirection:
    """Add `coefficient × W_dec[feature] / s` (the latent's decoder direction in model units, as
    `decoder_directions` gives it) at `hook` (default: the hook the SAE writes, a transcoder's output).
    A coefficient of c is the decoder's output for the latent firing at c; multiply by the latent's max
    activation to mean "c times its usual strength"."""
    check_feature(sae, feature)
    direction = sae.decoder_directions()[feature].float()
    return AddDirection(
        _hook_of(sae, hook),
        direction=direction,
        coefficient=coefficient,
        positions=positions,
        include_first_position=include_first_position,
    )


def clamp_feature(
    sae: SparseAutoencoder,
    feature: int,
    value: float,
    hook: str | None = None,
    positions: Positions = "all",
    include_first_position: bool = False,
) -> SAEEdit:
    """Set latent `feature` to `value` at the SAE's hook (error term kept: nothing else changes)."""
    return SAEEdit(
        _hook_of(sae, hook),
        sae=sae,
        latents={feature: value},
        positions=positions,
        include_first_position=include_first_position,
    )


def ablate_feature(
    sae: SparseAutoencoder,
    feature: int,
    hook: str | None = None,
    positions: Positions = "all",
    include_first_position: bool = False,
) -> SAEEdit:
    """Clamp latent `feature` to 0."""
    return clamp_feature(sae, feature, 0.0, hook, positions, include_first_position)


def splice_sae(
    sae: SparseAutoencoder,
    keep_error: bool = False,
    hook: str | None = None,
    positions: Positions = "all",
    include_first_position: bool = False,
) -> SAEEdit:
    """Replace the activation by the SAE's reconstruction (`keep_error=True`: a no-op, for checks)."""
    return SAEEdit(
        _hook_of(sae, hook),
        sae=sae,
        keep_error=keep_error,
        positions=positions,
        include_first_position=include_first_position,
    )


def feature_intervention(
    sae: SparseAutoencoder,
    mode: Mode,
    feature: int,
    value: float,
    hook: str | None = None,
    positions: Positions = "all",
    include_first_position: bool = False,
) -> Intervention:
    """The intervention a steering mode names: `add` (value = coefficient), `clamp` (value = the
    latent's value) or `ablate` (value unused)."""
    if mode not in MODES:
        raise SaelabError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "add":
        return add_feature(sae, feature, value, hook, positions, include_first_position)
    return clamp_feature(sae, feature, 0.0 if mode == "ablate" else value, hook, positions, include_first_position)
