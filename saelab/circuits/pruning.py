"""Which nodes and edges a graph keeps.

Three rules for nodes, by |effect| (tokens are always kept: they are the prompt):

    influence   the fewest nodes whose |effect| adds up to `node_threshold` (0.8) of all nodes' |effect|:
                the share of the metric's attribution that flows through them. As circuit-tracer prunes,
                whose influence is a node's total effect on the logit through its multi-hop paths; a node
                effect here already is that total (its edges sum to it, `saelab.circuits.edges`).
    top         the `top_nodes` largest
    threshold   every node with |effect| ≥ `node_threshold` (Marks et al.'s node threshold)

Edges between kept nodes are then kept the same way, by |effect|: the fewest adding up to
`edge_threshold` (0.98) of the total under `influence` and `top`, those ≥ `edge_threshold` under
`threshold`. Last, dangling nodes go, until none is left (circuit-tracer's rule): a latent or error
with no kept edge out (into a kept node or the metric), and a latent with no kept edge in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from saelab.circuits.edges import METRIC, Edges
from saelab.circuits.nodes import LATENT, TOKEN, Nodes
from saelab.errors import SaelabError

Rule = Literal["influence", "top", "threshold"]
RULES: tuple[Rule, ...] = ("influence", "top", "threshold")


@dataclass(frozen=True)
class Pruning:
    """How to prune (see the module docstring); thresholds None take the rule's defaults."""

    rule: Rule = "influence"
    node_threshold: float | None = None
    edge_threshold: float | None = None
    top_nodes: int = 100

    def thresholds(self) -> tuple[float, float]:
        """(node, edge) thresholds: shares for influence and top, |effect| bounds for threshold."""
        if self.rule not in RULES:
            raise SaelabError(f"--prune {self.rule!r} is not one of {', '.join(RULES)}")
        defaults = (0.0, 0.0) if self.rule == "threshold" else (0.8, 0.98)
        node = defaults[0] if self.node_threshold is None else self.node_threshold
        edge = defaults[1] if self.edge_threshold is None else self.edge_threshold
        if self.rule != "threshold" and not (0 < node <= 1 and 0 < edge <= 1):
            raise SaelabError(f"--node-threshold/--edge-threshold: shares in (0, 1] under {self.rule}, e.g. 0.8 0.98")
        if self.top_nodes < 1:
            raise SaelabError(f"--top-nodes {self.top_nodes}: keep at least one node")
        return node, edge


def cumulative_share(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's place in the running share: Σ of the scores ≥ it (in descending order) / Σ all, [N]."""
    order = scores.argsort(descending=True)
    share = torch.zeros_like(scores)
    total = scores.sum()
    share[order] = scores[order].cumsum(0) / (total if total > 0 else 1)
    return share


def smallest_covering(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """[N] bool: the fewest largest entries whose sum reaches `fraction` of the total (ties at the edge kept)."""
    if len(scores) == 0:
        return torch.zeros(0, dtype=torch.bool)
    share = cumulative_share(scores)
    cutoff = scores[share >= fraction - 1e-9]
    bound = cutoff.max() if len(cutoff) else scores.min()
    return (scores >= bound) & (scores > 0)


def keep_nodes(nodes: Nodes, effects: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    """[N] bool: the nodes `pruning`'s rule keeps, tokens always."""
    node_threshold, _ = pruning.thresholds()
    scores = torch.where(nodes.kind == TOKEN, torch.zeros_like(effects), effects.abs())
    if pruning.rule == "influence":
        kept = smallest_covering(scores, node_threshold)
    elif pruning.rule == "top":
        kept = torch.zeros(len(nodes), dtype=torch.bool)
        kept[scores.argsort(descending=True)[: pruning.top_nodes]] = True
        kept &= scores > 0
    else:
        kept = scores >= max(node_threshold, 1e-12)
    return kept | (nodes.kind == TOKEN)


def keep_edges(edges: Edges, kept_nodes: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    """[E] bool: edges between kept nodes (or into the metric) that the rule keeps."""
    _, edge_threshold = pruning.thresholds()
    between = kept_nodes[edges.source] & ((edges.target == METRIC) | kept_nodes[edges.target.clamp_min(0)])
    scores = torch.where(between, edges.effect.abs(), torch.zeros_like(edges.effect))
    if pruning.rule == "threshold":
        return between & (scores >= max(edge_threshold, 1e-12))
    return between & smallest_covering(scores, edge_threshold)


def drop_dangling(nodes: Nodes, kept_nodes: torch.Tensor, edges: Edges, kept_edges: torch.Tensor) -> tuple:
    """Remove latents and errors without a kept edge out, and latents without one in, until none is left;
    returns (kept_nodes, kept_edges)."""
    kept_nodes, kept_edges = kept_nodes.clone(), kept_edges.clone()
    while True:
        into_kept = (edges.target == METRIC) | kept_nodes[edges.target.clamp_min(0)]
        kept_edges &= kept_nodes[edges.source] & into_kept
        has_out = torch.zeros(len(nodes), dtype=torch.bool)
        has_out[edges.source[kept_edges]] = True
        has_in = torch.zeros(len(nodes), dtype=torch.bool)
        has_in[edges.target[kept_edges & (edges.target != METRIC)]] = True
        still = kept_nodes & ((nodes.kind == TOKEN) | (has_out & ((nodes.kind != LATENT) | has_in)))
        if torch.equal(still, kept_nodes):
            return kept_nodes, kept_edges
        kept_nodes = still


def prune(
    nodes: Nodes, effects: torch.Tensor, edges: Edges | None, pruning: Pruning
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kept nodes [N] bool, kept edges [E] bool or None without edges)."""
    kept = keep_nodes(nodes, effects, pruning)
    if edges is None:
        return kept, None
    return drop_dangling(nodes, kept, edges, keep_edges(edges, kept, pruning))
