"""The graph file: a circuit as data, in circuit-tracer's graph-file schema, which its local viewer and
Neuronpedia's graph pages open (`graph.schema.json`, written from circuit-tracer's `frontend/graph_models.py`
and Neuronpedia's `graph-schema.json`).

    {"metadata": {slug, scan (the model), transcoder_list (the dictionaries), prompt, prompt_tokens, …},
     "qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos}     (the viewer's saved state: empty),
     "nodes": [{node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, influence, activation, …}],
     "links": [{source, target, weight}]}

How saelab fills it:
- `layer` is the block of the hook a dictionary writes ("E" for tokens, n_layers + 1 for the metric); a
  second dictionary in one block gets "15.1", so rows keep their forward order.
- latents are `feature_type` "cross layer transcoder", the name both viewers give a dictionary's latent
  (whatever the dictionary: saelab's own `saelab.dictionary` says sae / transcoder), with `feature` =
  cantor(block, latent) as circuit-tracer numbers them; errors are "mlp reconstruction error" for
  transcoders and "sae reconstruction error" for SAEs (a viewer marks any "… error" as an error node), with
  node ids `{layer}_-1_{pos}` (circuit-tracer's `0_{layer}_{pos}` can equal a layer-0 latent's id).
- `influence` is circuit-tracer's: the cumulative share of all nodes' |effect| reached at this node's
  rank, so a viewer's threshold of 0.8 shows the nodes that carry 80 %.
- a link's `weight` is the metric's attribution to the edge, −effect: positive when the source, through the
  target, raises the metric (a viewer draws it excitatory).
- everything else saelab knows sits under `saelab` keys: per node its kind, hook, dictionary, latent,
  token and effect (the change of the metric when the node is zeroed); per link its effect; in the
  metadata the metric, the method, the dictionaries, timings and the faithfulness evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from saelab import __version__
from saelab.atomic import atomic_write_json
from saelab.circuits.edges import METRIC, Edges
from saelab.circuits.nodes import ERROR, KIND_NAMES, LATENT, TOKEN, Nodes
from saelab.circuits.pruning import cumulative_share
from saelab.circuits.trace import Trace
from saelab.errors import SaelabError

SCHEMA_PATH = Path(__file__).with_name("graph.schema.json")
LATENT_TYPE = "cross layer transcoder"
ERROR_TYPES = {"sae": "sae reconstruction error", "transcoder": "mlp reconstruction error"}
QPARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}


def cantor(a: int, b: int) -> int:
    """circuit-tracer's global feature number for (layer, latent)."""
    return (a + b) * (a + b + 1) // 2 + b


def graph_layers(trace: Trace) -> list[str]:
    """The `layer` string of each dictionary: its block, "L.1", "L.2" … for more dictionaries in one block."""
    labels, seen = [], {}
    for dictionary in trace.dictionaries:
        count = seen.get(dictionary.layer, 0)
        seen[dictionary.layer] = count + 1
        labels.append(str(dictionary.layer) if count == 0 else f"{dictionary.layer}.{count}")
    return labels


def build_graph(
    trace: Trace,
    nodes: Nodes,
    effects: torch.Tensor,
    kept: torch.Tensor,
    edges: Edges | None,
    kept_edges: torch.Tensor | None,
    tokenizer: Any,
    info: dict[str, Any],
    labels: dict[tuple[int, int], str] | None = None,
    n_layers: int | None = None,
) -> dict[str, Any]:
    """The graph file of the kept nodes and edges; `info` goes to `metadata.saelab`, `labels` (by (site,
    latent)) to the latents' `clerp`; the metric's logit node sits at layer `n_layers` + 1 (the model's block
    count; default: one past the last dictionary's block), as circuit-tracer places it."""
    tokens = [tokenizer.decode([i]) for i in trace.tokens[0].tolist()]
    layers = graph_layers(trace)
    n_layers = n_layers if n_layers is not None else max(d.layer for d in trace.dictionaries) + 1
    influence = cumulative_influence(nodes, effects)
    ids, entries = {}, []
    for index in kept.nonzero().flatten().tolist():
        entry = _node(trace, nodes, index, effects, influence, tokens, layers, labels or {})
        ids[index] = entry["node_id"]
        entries.append(entry)
    metric_node = _metric_node(trace, tokenizer, n_layers)
    entries.append(metric_node)
    links = []
    if edges is not None:
        for e in kept_edges.nonzero().flatten().tolist():
            source, target = int(edges.source[e]), int(edges.target[e])
            target_id = metric_node["node_id"] if target == METRIC else ids.get(target)
            if source in ids and target_id is not None:
                effect = float(edges.effect[e])
                links.append(
                    {"source": ids[source], "target": target_id, "weight": -effect, "saelab": {"effect": effect}}
                )
    metadata = {
        "slug": info.get("slug", "saelab-circuit"),
        "scan": info.get("model", ""),
        "transcoder_list": [d.label for d in trace.dictionaries],
        "prompt_tokens": tokens,
        "prompt": info["prompt"],
        "node_threshold": info.get("node_threshold", 0.8),
        "schema_version": 1,
        "info": {"generator": {"name": "saelab", "version": __version__}, "create_time_ms": int(time.time() * 1000)},
        "pruning_settings": {k: info[k] for k in ("node_threshold", "edge_threshold") if info.get(k) is not None},
        "saelab": info,
    }
    return {"metadata": metadata, "qParams": dict(QPARAMS), "nodes": entries, "links": links}


def cumulative_influence(nodes: Nodes, effects: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's node `influence`: the share of Σ|effect| (tokens left out) reached at each node's rank."""
    return cumulative_share(torch.where(nodes.kind == TOKEN, torch.zeros_like(effects), effects.abs()))


def _node(
    trace: Trace,
    nodes: Nodes,
    index: int,
    effects: torch.Tensor,
    influence: torch.Tensor,
    tokens: list[str],
    layers: list[str],
    labels: dict[tuple[int, int], str],
) -> dict[str, Any]:
    kind, site, t, latent = nodes.key(index)
    extra = {"kind": KIND_NAMES[kind], "effect": float(effects[index]), "token": tokens[t]}
    node = {"ctx_idx": t, "influence": float(influence[index]), "activation": float(nodes.activation[index])}
    if kind == TOKEN:
        token_id = int(trace.tokens[0, t])
        node |= {"node_id": f"E_{token_id}_{t}", "feature": t, "layer": "E", "feature_type": "embedding"}
        node |= {"jsNodeId": f"E_{token_id}-{t}", "clerp": f"Emb: {tokens[t]!r}", "activation": None}
        return node | {"saelab": extra}
    dictionary, layer = trace.dictionaries[site], layers[site]
    extra |= {"hook": dictionary.writes, "dictionary": dictionary.label, "dictionary_kind": dictionary.kind}
    if kind == LATENT:
        node |= {"node_id": f"{layer}_{latent}_{t}", "feature": cantor(dictionary.layer, latent), "layer": layer}
        node |= {"feature_type": LATENT_TYPE, "jsNodeId": f"{layer}_{latent}-{t}"}
        node["clerp"] = labels.get((site, latent), f"{dictionary.label} #{latent}")
        return node | {"saelab": extra | {"latent": latent}}
    assert kind == ERROR
    error_type = ERROR_TYPES["sae" if dictionary.kind == "sae" else "transcoder"]
    node |= {"node_id": f"{layer}_-1_{t}", "feature": -1, "layer": layer, "feature_type": error_type}
    node |= {"jsNodeId": f"{layer}_-1-{t}", "clerp": f"Err: {dictionary.label} at {tokens[t]!r}"}
    return node | {"saelab": extra}


def _metric_node(trace: Trace, tokenizer: Any, n_layers: int) -> dict[str, Any]:
    """The logit node the edges into the metric end at."""
    metric, layer = trace.metric, str(n_layers + 1)
    target = tokenizer.decode([metric.target])
    probability = float(trace.next_logits.softmax(-1)[metric.target])
    return {
        "node_id": f"{layer}_{metric.target}_{metric.position}",
        "feature": metric.target,
        "layer": layer,
        "ctx_idx": metric.position,
        "feature_type": "logit",
        "jsNodeId": f"L_{metric.target}-{metric.position}",
        "clerp": f'Output "{target}" (p={probability:.3f})',
        "token_prob": probability,
        "is_target_logit": True,
        "influence": None,
        "activation": None,
        "saelab": {"kind": "metric", "metric": metric.kind, "value": trace.value, "token": target},
    }


def write_graph(path: str | Path, graph: dict[str, Any]) -> None:
    atomic_write_json(path, graph)


def read_graph(path: str | Path) -> dict[str, Any]:
    """A graph file, with a one-line error when it is not one."""
    path = Path(path)
    try:
        graph = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SaelabError(f"{path} cannot be read as a graph file: {error}") from error
    missing = [
        key for key in ("metadata", "qParams", "nodes", "links") if not isinstance(graph, dict) or key not in graph
    ]
    if missing:
        raise SaelabError(f"{path} is not a graph file (no {', '.join(missing)}); make one with `saelab attribute`")
    return graph


def graph_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())
