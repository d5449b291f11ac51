"""The Circuit page's buttons: ablate or boost some nodes of a graph, through `saelab.steer`, and see what the
model predicts then.

A graph file names its nodes by dictionary, hook, position and latent (`saelab.circuits.graph`); each
chosen latent or error node becomes one entry of a `NodeEdit` at its SAE's hook (factor 0 ablates, k
multiplies by k), all applied in one pass over the graph's prompt while `steer` holds them. The metric
is the graph's own (`metadata.saelab.metric`), so its change is directly comparable with the node effects
the graph lists: for a single node, ablating gives the exact effect that `--method exact` estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saelab.browse.model_lock import MODEL_LOCK
from saelab.circuits.metric import Metric
from saelab.errors import SaelabError
from saelab.sae import SparseAutoencoder
from saelab.steer import NodeEdit, steer


@dataclass
class NodeEditResult:
    """The metric and the top next tokens (token, id, probability) at the metric's position, before and after."""

    metric_before: float
    metric_after: float
    top_before: list[tuple[str, int, float]]
    top_after: list[tuple[str, int, float]]
    edited: int  # how many nodes the edit touched

    @property
    def change(self) -> float:
        return self.metric_after - self.metric_before


def graph_metric(graph: dict[str, Any]) -> Metric:
    metric = graph["metadata"]["saelab"]["metric"]
    return Metric(metric["target_id"], metric["position"], metric.get("contrast_id"))


def node_edits(graph: dict[str, Any], node_ids: list[str], factor: float, saes: dict[str, SparseAutoencoder]) -> list:
    """One `NodeEdit` per hook for the latent and error nodes `node_ids` (token and metric nodes are inputs
    and outputs, not edited); `saes` by dictionary label."""
    by_id = {node["node_id"]: node for node in graph["nodes"]}
    per_dictionary: dict[str, dict[tuple[int, int | None], float]] = {}
    for node_id in node_ids:
        extra = by_id[node_id].get("saelab", {}) if node_id in by_id else {}
        if extra.get("kind") not in ("latent", "error"):
            continue
        key = (by_id[node_id]["ctx_idx"], extra.get("latent") if extra["kind"] == "latent" else None)
        per_dictionary.setdefault(extra["dictionary"], {})[key] = factor
    missing = [label for label in per_dictionary if label not in saes]
    if missing:
        raise SaelabError(f"the graph's dictionaries {missing} are not in this run; open the graph from its own run")
    return [
        NodeEdit(saes[label].cfg.hook_name, sae=saes[label], nodes=nodes) for label, nodes in per_dictionary.items()
    ]


@torch.no_grad()
def edit_graph_nodes(
    model: Any,
    graph: dict[str, Any],
    node_ids: list[str],
    factor: float,
    saes: dict[str, SparseAutoencoder],
    top: int = 8,
) -> NodeEditResult:
    """Run the graph's prompt with the nodes `node_ids` scaled by `factor` (0: ablated) and without."""
    edits = node_edits(graph, node_ids, factor, saes)
    if not edits:
        raise SaelabError("pick at least one latent or error node to edit (tokens and the metric are not edited)")
    ids = graph["metadata"]["saelab"]["token_ids"]
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    metric = graph_metric(graph)
    with MODEL_LOCK:
        before = model(tokens)[:, metric.position]
        with steer(model, edits):
            after = model(tokens)[:, metric.position]
    return NodeEditResult(
        float(metric.of_row(before)[0]),
        float(metric.of_row(after)[0]),
        _top_tokens(model.tokenizer, before[0], top),
        _top_tokens(model.tokenizer, after[0], top),
        sum(len(edit.nodes) for edit in edits),
    )


def _top_tokens(tokenizer: Any, logits: torch.Tensor, n: int) -> list[tuple[str, int, float]]:
    top = logits.float().softmax(-1).topk(n)
    return [(tokenizer.decode([int(i)]), int(i), float(p)) for p, i in zip(top.values, top.indices, strict=True)]
