"""The dictionaries a circuit is made of: SAEs and transcoders spliced into the model with their errors kept.

A dictionary reads one hook (`reads`) and writes one (`writes`): an SAE reads and writes its own hook, a
transcoder reads what enters an MLP and writes what the MLP adds. On a pass it splits the written
activation y (positions t ≥ `first`) into nodes,

    y = base + Σ_i z_i · W_dec[i] / c  +  ε          z = encode(x_reads), c the token's output scale,
                                                      base = b_dec / c + μ (+ the skip term of a skip
                                                      transcoder): what is left with every node zeroed

so replacing y by `base + zW/c + ε` changes nothing (`HookState.with_nodes`, which sums it so that this
holds bit for bit). The error ε = y − base − zW/c takes
up all that the latents do not explain, including how a per-token normalisation or a skip term would
move with the input, so that the nodes of a hook always sum to its activation.

A residual-stream dictionary (an SAE at `hook_resid_pre` or `hook_resid_post`) is a *cut*: everything the
model computes later depends on earlier positions only through it. An MLP transcoder is not (the residual
stream runs past it), nor is an SAE at `hook_resid_mid`, which the bridge feeds to the MLP only; edges
then skip over them (`saelab.circuits.edges`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import SaelabError
from saelab.models.hooks import BLOCK_HOOKS, parse_hook
from saelab.sae import SparseAutoencoder
from saelab.sae.saelens_format import load_sae

# The hooks that carry the whole residual stream. Not `hook_resid_mid`: in TransformerLens 4's bridge it is
# an alias of `ln2.hook_in`, so what it carries is read by the MLP alone (the residual stream runs past it).
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_post")


@dataclass(eq=False)
class Dictionary:
    """One SAE or transcoder in a circuit, by `label` (its run folder name); `folder` where it was read from."""

    label: str
    sae: SparseAutoencoder
    folder: Path | None = None

    @property
    def reads(self) -> str:
        return self.sae.cfg.hook_name

    @property
    def writes(self) -> str:
        return self.sae.cfg.hook_name_out or self.sae.cfg.hook_name

    @property
    def layer(self) -> int:
        """The block the written hook is in."""
        return hook_order(self.writes)[0]

    @property
    def is_cut(self) -> bool:
        """Whether every later activation depends on earlier nodes only through this dictionary's nodes."""
        return not self.sae.cfg.hook_name_out and BLOCK_HOOKS[hook_order(self.writes)[1]] in RESIDUAL_HOOKS

    @property
    def kind(self) -> str:
        """`sae`, `transcoder` or `skip_transcoder`: what the graph file calls the dictionary."""
        return self.sae.cfg.architecture if self.sae.cfg.hook_name_out else "sae"


def hook_order(name: str) -> tuple[int, int]:
    """(block, place in the block) of a block hook: the order hooks fire in a forward pass."""
    if not name:
        raise SaelabError("a dictionary does not record the hook it was trained on; pass SAE folders that do")
    point = parse_hook(name, n_layers=10**6)
    return point.layer, BLOCK_HOOKS.index(point.kind)


@dataclass
class HookState:
    """One dictionary's nodes on one pass, tensors over the T positions (rows before `first` are zero but for
    `base` and `output`, which hold the activation there: those positions are not nodes and never change).

    latents [T, d_sae] z · error [T, d_out] ε · scale [T, 1] c · base [T, d_out] · output [T, d_out] y
    """

    latents: torch.Tensor
    error: torch.Tensor
    scale: torch.Tensor
    base: torch.Tensor
    output: torch.Tensor

    def decode(self, latents: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """Σ_i z_i W_dec[i] / c for latents [..., T, d_sae] → [..., T, d_out] (model units)."""
        return (latents @ W_dec) / self.scale

    def with_nodes(self, latents: torch.Tensor, error: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """The activation with this state's nodes replaced by `latents` and `error` ([..., T, ·] broadcasts over
        leading dims): y + (z' − z)W/c + (ε' − ε), which is base + z'W/c + ε' with the sum taken so that
        unchanged nodes give y bit for bit (the spliced model then is the model exactly, not to rounding)."""
        return self.output + self.decode(latents - self.latents, W_dec) + (error - self.error)


def split_activation(
    dictionary: Dictionary, x: torch.Tensor, y: torch.Tensor, first: int, state: HookState | None = None
) -> HookState:
    """The nodes of y (the written hook's activation [..., T, d_out]) given x (the read hook's [..., T, d_in]).

    With `state` (the clean pass's), `base` and `scale` are taken from it and only z and ε are recomputed:
    what an edge or an ablation changes are the nodes; the decomposition itself stays fixed."""
    sae = dictionary.sae
    rows, outputs = x[..., first:, :], y[..., first:, :]
    norm = sae.token_norm(rows)
    z = sae.encode(rows, norm=norm)
    if state is None:
        out_norm = sae.output_norm(norm)
        tail_base = torch.broadcast_to(out_norm.out_of(sae.b_dec), outputs.shape)
        skip = sae.skip(rows, norm)
        tail_base = tail_base if skip is None else tail_base + out_norm.direction(skip)
        tail_scale = torch.broadcast_to(out_norm.scale, (*outputs.shape[:-1], 1))
        base = torch.cat([y[..., :first, :], tail_base], dim=-2)
        scale = torch.cat([tail_scale.new_ones((*y.shape[:-2], first, 1)), tail_scale], dim=-2)
    else:
        base, scale = state.base, state.scale
    error = outputs - base[..., first:, :] - (z @ sae.W_dec) / scale[..., first:, :]
    latents = torch.cat([z.new_zeros((*z.shape[:-2], first, z.shape[-1])), z], dim=-2)
    error = torch.cat([error.new_zeros((*error.shape[:-2], first, error.shape[-1])), error], dim=-2)
    return HookState(latents, error, scale, base, y)


def load_dictionaries(folders: list[Path], labels: list[str] | None = None) -> list[Dictionary]:
    """The SAE folders as dictionaries in the order their written hooks fire; `labels` default to folder names."""
    labels = labels or [folder.name for folder in folders]
    dictionaries = [Dictionary(label, load_sae(folder), folder) for label, folder in zip(labels, folders, strict=True)]
    return sort_dictionaries(dictionaries)


def sort_dictionaries(dictionaries: list[Dictionary]) -> list[Dictionary]:
    """By written hook, in forward order; two dictionaries writing one hook would each claim all of it."""
    ordered = sorted(dictionaries, key=lambda d: hook_order(d.writes))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.writes == b.writes:
            raise SaelabError(
                f"{a.label} and {b.label} both write {a.writes}: a circuit splits each hook into one dictionary's "
                "latents; pick one of them (--saes NAME … among a run's SAEs, or --sae DIR …)"
            )
    return ordered


def check_against_model(dictionaries: list[Dictionary], model: object, model_name: str) -> None:
    """One-line errors for dictionaries that cannot be spliced into `model` (named `model_name`)."""
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    for dictionary in dictionaries:
        trained_on = dictionary.sae.cfg.model_name
        if trained_on and model_name and trained_on != model_name:
            raise SaelabError(
                f"{dictionary.label} was trained on {trained_on}, not {model_name}: its latents mean nothing in "
                f"another model; use dictionaries of {model_name} (or --model {trained_on})"
            )
        for hook in {dictionary.reads, dictionary.writes}:
            parse_hook(hook, n_layers)
            if hook not in model.hook_dict:
                raise SaelabError(f"{dictionary.label} reads or writes {hook!r}, which {model_name} has no hook for")
        widths = {dictionary.sae.cfg.d_in, dictionary.sae.cfg.output_width}
        if widths != {d_model}:  # every block hook (BLOCK_HOOKS) carries d_model-wide vectors
            raise SaelabError(
                f"{dictionary.label} reads or writes vectors of size {max(widths - {d_model})} but {model_name}'s "
                f"hooks carry {d_model}: it was trained on another model; use dictionaries of {model_name}"
            )
