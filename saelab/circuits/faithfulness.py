"""Is the circuit the mechanism? Faithfulness and completeness by mean ablation (Marks et al. §3).

With F(·) the metric when only the named nodes keep their values and every other node of every
dictionary is set to its mean (`saelab.circuits.means`; latents that did not fire included):

    faithfulness(C)  = (F(C) − F(∅)) / (F(M) − F(∅))       how much of the model's behaviour C alone recovers
    completeness(C)  = (F(M∖C) − F(∅)) / (F(M) − F(∅))     how much is left once C is ablated (low: C is all of it)

M is the model (every node at its value), ∅ every node at its mean. Circuits are the N nodes of largest
|effect| (latents and errors; tokens are the input and never ablated), for N = 10, 30, 100, 300, 1000,
beside `random_draws` random sets of N nodes. Nodes are recomputed on each pass from what reaches their
hook (an ablation upstream changes them), as in Marks et al.'s code; positions before the first node
position are never touched. All circuits run as copies of the prompt in one batched pass.

`by="feature"` ranks and counts features instead, as Marks et al. aggregate over positions: a latent of a
dictionary (or its error) kept at every position it is a node at, ranked by its summed effect.

Latents that did not fire on the prompt are not nodes, so no circuit holds them: they sit at their means in
every F(C), as in Marks et al.'s code. Even the circuit of all nodes then differs from the model by the sum of
those means; its faithfulness (`all_nodes`) is the ceiling of the curve, reported beside it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from saelab.circuits.dictionaries import split_activation
from saelab.circuits.means import NodeMeans
from saelab.circuits.nodes import ERROR, LATENT, TOKEN, Nodes
from saelab.circuits.passes import metric_of_copies
from saelab.circuits.splice import dictionary_hooks
from saelab.circuits.trace import Trace

SIZES = (10, 30, 100, 300, 1000)
COPIES_TOKENS = 4096  # copies × prompt length per batched pass


def keep_masks(trace: Trace, nodes: Nodes, chosen: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each set of node indices, per dictionary (latents kept [B, T, d_sae], errors kept [B, T])."""
    masks = []
    for k, state in enumerate(trace.states):
        latents = torch.zeros(len(chosen), *state.latents.shape, dtype=torch.bool)
        errors = torch.zeros(len(chosen), state.error.shape[0], dtype=torch.bool)
        for b, index in enumerate(chosen):
            here = index[nodes.site[index] == k]
            latent = here[nodes.kind[here] == LATENT]
            latents[b, nodes.position[latent], nodes.latent[latent]] = True
            errors[b, nodes.position[here[nodes.kind[here] == ERROR]]] = True
        masks.append((latents, errors))
    return masks


@torch.no_grad()
def ablated_metric(
    model: Any,
    trace: Trace,
    masks: list[tuple[torch.Tensor, torch.Tensor]],
    means: list[NodeMeans],
    complement: bool = False,
) -> torch.Tensor:
    """F for each copy, [B]: nodes outside its masks (inside them, with `complement`) set to their means."""
    first = trace.first

    def on_write(k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dictionary, (latents_kept, errors_kept) = trace.dictionaries[k], masks[k]
        live = split_activation(dictionary, x, y, first)
        keep_latents = ~latents_kept if complement else latents_kept.clone()
        keep_errors = (~errors_kept if complement else errors_kept.clone())[..., None]
        keep_latents[..., :first, :] = True  # positions before `first` are not nodes: left as they are
        keep_errors[..., :first, :] = True
        z = torch.where(keep_latents, live.latents, means[k].latents.to(live.latents.dtype))
        error = torch.where(keep_errors, live.error, means[k].error.to(live.error.dtype))
        return live.with_nodes(z, error, dictionary.sae.W_dec)

    copies = masks[0][0].shape[0]
    return metric_of_copies(model, trace, None, copies, dictionary_hooks(trace.dictionaries, on_write))


def evaluate_circuits(
    model: Any,
    trace: Trace,
    nodes: Nodes,
    effects: torch.Tensor,
    means: list[NodeMeans],
    sizes: tuple[int, ...] = SIZES,
    random_draws: int = 3,
    seed: int = 0,
    by: Literal["node", "feature"] = "node",
) -> dict[str, Any]:
    """Faithfulness, completeness and random circuits' faithfulness at each size (see the module docstring).

    `by="feature"` counts and ranks features instead of nodes, as Marks et al. aggregate over positions: a
    dictionary's latent (or its error) at every position it is a node at, ranked by its summed effect."""
    candidates = (nodes.kind != TOKEN).nonzero().flatten()
    unit, unit_effect = _units(nodes, effects, candidates, by)
    ranked = unit_effect.abs().argsort(descending=True)
    sizes = tuple(sorted({min(n, len(ranked)) for n in sizes}))
    generator = torch.Generator().manual_seed(seed)

    def circuit(units: torch.Tensor) -> torch.Tensor:
        return candidates[torch.isin(unit, units)]

    top = [circuit(ranked[:n]) for n in sizes]
    randoms = [
        circuit(torch.randperm(len(ranked), generator=generator)[:n]) for n in sizes for _ in range(random_draws)
    ]
    empty = torch.zeros(0, dtype=torch.long)
    kept = _metric_in_batches(model, trace, nodes, [empty, candidates, *top, *randoms], means, complement=False)
    removed = _metric_in_batches(model, trace, nodes, top, means, complement=True)
    f_empty, f_all, f_model = float(kept[0]), kept[1], trace.value
    kept = kept[1:]
    scale = f_model - f_empty

    def share(value: torch.Tensor) -> float | None:
        return float((value - f_empty) / scale) if abs(scale) > 1e-6 else None

    by_size = kept[1 + len(sizes) :].view(len(sizes), random_draws)
    return {
        "by": by,
        "sizes": list(sizes),
        "circuit_nodes": [len(c) for c in top],
        "faithfulness": [share(v) for v in kept[1 : 1 + len(sizes)]],
        "completeness": [share(v) for v in removed],
        "random_faithfulness": [share(row.mean()) for row in by_size],
        "random_draws": random_draws,
        "all_nodes": share(f_all),
        "metric_model": f_model,
        "metric_empty": f_empty,
        "n_nodes": len(candidates),
    }


def _units(nodes: Nodes, effects: torch.Tensor, candidates: torch.Tensor, by: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a circuit counts: (the unit of each candidate node [n], each unit's effect [n_units])."""
    if by == "node":
        return torch.arange(len(candidates)), effects[candidates]
    if by != "feature":
        raise ValueError(f"by must be 'node' or 'feature', not {by!r}")
    key = nodes.site[candidates] * (int(nodes.latent.max()) + 2) + nodes.latent[candidates] + 1
    _, unit = key.unique(return_inverse=True)
    return unit, torch.zeros(int(unit.max()) + 1).index_add_(0, unit, effects[candidates])


def _metric_in_batches(
    model: Any, trace: Trace, nodes: Nodes, chosen: list[torch.Tensor], means: list[NodeMeans], complement: bool
) -> torch.Tensor:
    per_pass = max(1, COPIES_TOKENS // trace.n_tokens)
    parts = [
        ablated_metric(model, trace, keep_masks(trace, nodes, chosen[i : i + per_pass]), means, complement)
        for i in range(0, len(chosen), per_pass)
    ]
    return torch.cat(parts)
