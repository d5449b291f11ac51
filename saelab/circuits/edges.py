"""Edges: how much of the metric's change when node u is zeroed flows through node d (Marks et al. §2).

    edge(u → d) = (∂m/∂d) · (∂d/∂u)|direct · (0 − u)

∂m/∂d is d's total gradient (the clean pass's, `Trace.gradients` seen through d's decoder row); ∂d/∂u is
the *direct* derivative: every node between u and d held at its clean value, so that the path runs
through no other node. An edge into the metric is u's direct effect on it, (∂m/∂u)|direct · (0 − u).

Which nodes are between. A residual-stream dictionary is a cut (`Dictionary.is_cut`): with its nodes
held, nothing before it reaches later hooks. So the upstream of hook j is every dictionary back to the
nearest cut before it, that cut included (or back to the tokens when there is none); with residual
SAEs only, edges join consecutive hooks, and an MLP transcoder's nodes have edges skipping past it. The
edges out of u then sum to u's AtP effect: the hook after a cut is made of its nodes (a test holds it).

How. For downstream hook j, the pass starts at the cut's block with every upstream node a leaf tensor
(its clean value, one copy per downstream node), recomputes hook j's nodes from what reaches it, and stops;
one backward of Σ_b (∂m/∂d_b)·d_b in copy b gives ∂d_b/∂(every upstream node) for every copy at once.
`exact_edge_effects` is the reference: the pair patched for real (u removed, d's new value patched into
the clean pass), by the same passes without the linearisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from saelab.circuits.attribution import EDGE_TOKENS, FORWARD_TOKENS, site_activation
from saelab.circuits.dictionaries import split_activation
from saelab.circuits.nodes import ERROR, LATENT, TOKENS, Nodes
from saelab.circuits.passes import Stop, metric_of_copies, replaced_at, run_until_stopped
from saelab.circuits.splice import Hooks, dictionary_hooks
from saelab.circuits.trace import EMBED_HOOK, Trace

METRIC = -1  # the target of an edge into the metric


@dataclass
class Edges:
    """source [E], target [E] (indices into a `Nodes` table; METRIC for the metric), effect [E]."""

    source: torch.Tensor
    target: torch.Tensor
    effect: torch.Tensor

    def __len__(self) -> int:
        return len(self.source)


def upstream_sites(trace: Trace, site: int) -> list[int]:
    """The sites whose nodes have direct paths into `site` (a dictionary index, or len(dictionaries) for the
    metric): back to the nearest cut, included, else to the tokens."""
    sites = []
    for k in range(site - 1, -1, -1):
        sites.append(k)
        if trace.dictionaries[k].is_cut:
            return sites[::-1]
    return [TOKENS, *sites[::-1]]


@dataclass
class _Leaves:
    """The upstream nodes of a direct pass as leaf tensors, one copy per downstream node: by site,
    (latents [B, T, d_sae], errors [B, T, d]); TOKENS: (embeddings [B, T, d], None)."""

    tensors: dict[int, tuple[torch.Tensor, torch.Tensor | None]]

    @classmethod
    def of(
        cls, trace: Trace, sites: list[int], copies: int, removed: dict[tuple[int, int], torch.Tensor] | None = None
    ) -> _Leaves:
        """Clean values; `removed[(site, 0 latents / 1 errors)]`, [copies, T, ·], is subtracted (pair patching's u)."""

        def copy(tensor: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
            out = tensor.float().expand(copies, *tensor.shape).clone()
            if removed is not None and key in removed:
                out -= removed[key]
            return out.requires_grad_(True)

        tensors = {}
        for site in sites:
            if site == TOKENS:
                tensors[site] = (copy(trace.embeddings, (site, 0)), None)
            else:
                state = trace.states[site]
                tensors[site] = (copy(state.latents, (site, 0)), copy(state.error, (site, 1)))
        return cls(tensors)

    def flat(self) -> list[torch.Tensor]:
        return [t for pair in self.tensors.values() for t in pair if t is not None]

    def hooks(
        self,
        trace: Trace,
        on_target: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        target: int | None = None,
    ) -> Hooks:
        """Hooks writing the leaves at their sites (and calling `on_target(x, y)` at dictionary `target`)."""

        def on_write(k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if k == target:
                on_target(x, y)
                raise Stop
            latents, errors = self.tensors[k]
            return trace.states[k].with_nodes(latents, errors, trace.dictionaries[k].sae.W_dec)

        sites = [s for s in self.tensors if s != TOKENS] + ([target] if target is not None else [])
        hooks = dictionary_hooks(trace.dictionaries, on_write, sites)
        if TOKENS in self.tensors:
            embedded = self.tensors[TOKENS][0]
            hooks.insert(0, (EMBED_HOOK, lambda x, hook: embedded.to(x.dtype)))
        return hooks


def _start(trace: Trace, sites: list[int]) -> int | None:
    """The block a direct pass over `sites` starts at: the cut's, or None (the tokens) when tokens are upstream."""
    return None if sites[0] == TOKENS else trace.dictionaries[sites[0]].layer


def _downstream_values(
    trace: Trace, target: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hook `target`'s nodes (latents [B, T, d_sae], errors [B, T, d]) as this pass makes them, on the clean
    pass's decomposition (base and scale), so that only the nodes move."""
    state = split_activation(trace.dictionaries[target], x, y, trace.first, trace.states[target])
    return state.latents, state.error


def _seeds(trace: Trace, nodes: Nodes, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∂m/∂d for each downstream node b as one-hot weights over hook j's nodes: (latents [B, T, d_sae],
    errors [B, T, d]), so that Σ (weights · nodes) backpropagates every copy's own d_b."""
    site = int(nodes.site[targets[0]])
    state, gradient = trace.states[site], trace.gradients[site]
    W_dec = trace.dictionaries[site].sae.W_dec.detach().float()
    latent_weights = torch.zeros(len(targets), *state.latents.shape)
    error_weights = torch.zeros(len(targets), *state.error.shape)
    for b, index in enumerate(targets.tolist()):
        t, i = int(nodes.position[index]), int(nodes.latent[index])
        if nodes.kind[index] == LATENT:
            latent_weights[b, t, i] = (gradient[t] / state.scale[t].float()) @ W_dec[i]
        else:
            error_weights[b, t] = gradient[t]
    return latent_weights, error_weights


def _edge_values(trace: Trace, nodes: Nodes, sources: torch.Tensor, leaves: _Leaves, grads: list) -> torch.Tensor:
    """−u · ∂S_b/∂u for each source node u and copy b, [n_sources, B], from the leaves' gradients."""
    by_leaf = dict(zip(map(id, leaves.flat()), grads, strict=True))
    out = torch.zeros(len(sources), len(grads[0]))
    for row, index in enumerate(sources.tolist()):
        kind, site, t, i = nodes.key(index)
        latents, errors = leaves.tensors[site]
        if kind == LATENT:
            out[row] = -trace.states[site].latents[t, i].float() * by_leaf[id(latents)][:, t, i]
        elif kind == ERROR:
            out[row] = -(by_leaf[id(errors)][:, t] * trace.states[site].error[t].float()).sum(-1)
        else:
            out[row] = -(by_leaf[id(latents)][:, t] * trace.embeddings[t].float()).sum(-1)
    return out


def edge_effects(model: Any, trace: Trace, nodes: Nodes, kept: torch.Tensor) -> Edges:
    """The edges between the nodes `kept` (indices into `nodes`) and from them into the metric."""
    kept = kept.sort().values
    found: list[Edges] = []
    for target in [*range(len(trace.dictionaries)), len(trace.dictionaries)]:
        upstream = upstream_sites(trace, target)
        sources = kept[torch.isin(nodes.site[kept], torch.tensor(upstream))]
        if len(sources) == 0:
            continue
        if target == len(trace.dictionaries):
            found.append(_edges_into_metric(model, trace, nodes, sources, upstream))
            continue
        targets = kept[nodes.site[kept] == target]
        for chunk in targets.split(max(1, EDGE_TOKENS // trace.n_tokens)):
            found.append(_edges_into(model, trace, nodes, sources, chunk, upstream))
    if not found:
        empty = torch.zeros(0, dtype=torch.long)
        return Edges(empty, empty, torch.zeros(0))
    return Edges(*(torch.cat([getattr(e, name) for e in found]) for name in ("source", "target", "effect")))


def _edges_into(
    model: Any, trace: Trace, nodes: Nodes, sources: torch.Tensor, targets: torch.Tensor, upstream: list[int]
) -> Edges:
    """The edges from `sources` into the downstream nodes `targets` (all at one dictionary)."""
    site = int(nodes.site[targets[0]])
    leaves = _Leaves.of(trace, upstream, len(targets))
    latent_weights, error_weights = _seeds(trace, nodes, targets)
    seeded: list[torch.Tensor] = []

    def on_target(x: torch.Tensor, y: torch.Tensor) -> None:
        latents, errors = _downstream_values(trace, site, x, y)
        seeded.append((latents * latent_weights).sum() + (errors * error_weights).sum())

    with torch.enable_grad():
        run_until_stopped(model, trace, _start(trace, upstream), len(targets), leaves.hooks(trace, on_target, site))
        grads = torch.autograd.grad(seeded[0], leaves.flat(), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves.flat(), strict=True)]
    values = _edge_values(trace, nodes, sources, leaves, grads)  # [n_sources, n_targets]
    return _listed(sources, targets, values, trace, nodes)


def _edges_into_metric(model: Any, trace: Trace, nodes: Nodes, sources: torch.Tensor, upstream: list[int]) -> Edges:
    leaves = _Leaves.of(trace, upstream, 1)
    with torch.enable_grad():
        metric = metric_of_copies(model, trace, _start(trace, upstream), 1, leaves.hooks(trace))
        grads = torch.autograd.grad(metric.sum(), leaves.flat(), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves.flat(), strict=True)]
    values = _edge_values(trace, nodes, sources, leaves, grads)
    return Edges(sources, torch.full_like(sources, METRIC), values[:, 0])


def _listed(sources: torch.Tensor, targets: torch.Tensor, values: torch.Tensor, trace: Trace, nodes: Nodes) -> Edges:
    """The [n_sources, n_targets] values as edges, leaving out pairs no path joins (a later source position)."""
    reachable = nodes.position[sources][:, None] <= nodes.position[targets][None, :]
    rows, cols = reachable.nonzero(as_tuple=True)
    return Edges(sources[rows], targets[cols], values[rows, cols])


@torch.no_grad()
def exact_edge_effects(model: Any, trace: Trace, nodes: Nodes, edges: Edges, fraction: float = 1.0) -> torch.Tensor:
    """The reference for `edges`: [E] changes of the metric when u loses `fraction` of itself and only d feels it.

    Pass A runs from the cut with u reduced and every other upstream node clean, and reads d's new value d'
    at its hook; pass B runs the clean prompt with d alone set to d' (into the metric: pass A's own metric).
    Divided by `fraction`, so that a small fraction gives the derivative the linear edge estimates."""
    out = torch.zeros(len(edges))
    per_pass = max(2, FORWARD_TOKENS // trace.n_tokens)
    for rows in torch.arange(len(edges)).split(per_pass - 1):
        for target_site in sorted({_site_of(nodes, int(t), trace) for t in edges.target[rows]}):
            chosen = rows[torch.tensor([_site_of(nodes, int(t), trace) == target_site for t in edges.target[rows]])]
            out[chosen] = _exact_pairs(model, trace, nodes, edges, chosen, target_site, fraction) / fraction
    return out


def _site_of(nodes: Nodes, target: int, trace: Trace) -> int:
    return len(trace.dictionaries) if target == METRIC else int(nodes.site[target])


def _exact_pairs(
    model: Any, trace: Trace, nodes: Nodes, edges: Edges, rows: torch.Tensor, target_site: int, fraction: float
) -> torch.Tensor:
    """Pair patching for `rows` of `edges`, all into `target_site`: Δm [len(rows)] (copy 0 unedited)."""
    upstream = upstream_sites(trace, target_site)
    copies = len(rows) + 1
    leaves = _Leaves.of(trace, upstream, copies, _removals(trace, nodes, edges.source[rows], fraction))
    start = _start(trace, upstream)
    if target_site == len(trace.dictionaries):
        metric = metric_of_copies(model, trace, start, copies, leaves.hooks(trace))
        return metric[1:] - metric[0]
    moved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(x: torch.Tensor, y: torch.Tensor) -> None:
        moved.append(_downstream_values(trace, target_site, x, y))

    run_until_stopped(model, trace, start, copies, leaves.hooks(trace, record, target_site))
    values = _moved_targets(trace, nodes, edges.target[rows], target_site, *moved[0])
    name, block, _, _ = site_activation(trace, target_site)
    metric = metric_of_copies(model, trace, block, copies, [replaced_at(name, values)])
    return metric[1:] - metric[0]


def _removals(
    trace: Trace, nodes: Nodes, sources: torch.Tensor, fraction: float
) -> dict[tuple[int, int], torch.Tensor]:
    """What copy b (1 …) takes away from source b − 1: {(site, 0 latents / 1 errors): [copies, T, ·]}."""
    removed: dict[tuple[int, int], torch.Tensor] = {}
    for b, u in enumerate(sources.tolist(), start=1):
        kind, site, t, i = nodes.key(u)
        if site == TOKENS:
            part, value, index = 0, trace.embeddings, (t,)
        elif kind == LATENT:
            part, value, index = 0, trace.states[site].latents, (t, i)
        else:
            part, value, index = 1, trace.states[site].error, (t,)
        if (site, part) not in removed:
            removed[(site, part)] = torch.zeros(len(sources) + 1, *value.shape)
        removed[(site, part)][(b, *index)] = fraction * value[index].float()
    return removed


def _moved_targets(
    trace: Trace, nodes: Nodes, targets: torch.Tensor, site: int, latents: torch.Tensor, errors: torch.Tensor
) -> torch.Tensor:
    """The clean activation at `site` with, in copy b, only target b − 1 set to its value in pass A, [copies, T, d]."""
    state, W_dec = trace.states[site], trace.dictionaries[site].sae.W_dec
    values = state.output.expand(len(targets) + 1, *state.output.shape).clone()
    for b, d in enumerate(targets.tolist(), start=1):
        kind, _, t, i = nodes.key(d)
        if kind == LATENT:
            values[b, t] += (latents[b, t, i] - state.latents[t, i]) * W_dec[i] / state.scale[t]
        else:
            values[b, t] += errors[b, t] - state.error[t]
    return values
