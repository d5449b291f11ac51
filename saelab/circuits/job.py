"""One circuit, end to end: dictionaries (`saelab.circuits.sources`), a prompt, a metric → a graph file.

    trace (one forward + backward) → node effects (atp / ig / exact) → the nodes a graph keeps →
    edges between them (optional) → pruning → faithfulness and completeness (optional) → graph file

What `saelab attribute`, the dashboard's Circuit page and `benchmarks/circuits.py` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.circuits.attribution import METHODS, Method, node_effects, with_exact_errors
from saelab.circuits.dictionaries import check_against_model
from saelab.circuits.edges import Edges, edge_effects
from saelab.circuits.faithfulness import SIZES, evaluate_circuits
from saelab.circuits.graph import build_graph, graph_layers
from saelab.circuits.labels import latent_labels
from saelab.circuits.metric import resolve_metric
from saelab.circuits.nodes import KIND_NAMES, LATENT, TOKEN, TOKENS, Nodes, enumerate_nodes
from saelab.circuits.pruning import Pruning, drop_dangling, keep_edges, keep_nodes
from saelab.circuits.sources import Dictionaries, circuit_means, means_store
from saelab.circuits.trace import EMBED_HOOK, Trace, trace_prompt
from saelab.errors import SaelabError
from saelab.harvest.packing import text_token_ids


@dataclass
class CircuitRequest:
    """What to attribute and how (defaults: the prompt's last position, the model's own top token, AtP)."""

    prompt: str
    target: str | None = None
    contrast: str | None = None
    position: int = -1
    method: Method = "atp"
    steps: int = 10
    exact_errors: bool = False  # error and token nodes by exact ablation (see saelab.circuits.attribution)
    edges: bool = False
    max_nodes: int = 200  # the most nodes a graph keeps: edges are computed between these
    pruning: Pruning = field(default_factory=Pruning)
    evaluate: bool = False
    sizes: tuple[int, ...] = SIZES
    random_draws: int = 3
    first_position: int | None = None
    slug: str = "saelab-circuit"

    def check(self) -> None:
        if self.method not in METHODS:
            raise SaelabError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.steps < 1:
            raise SaelabError(f"--steps {self.steps}: integrated gradients need at least 1 step (10 is usual)")
        if self.max_nodes < 1:
            raise SaelabError(f"--max-nodes {self.max_nodes}: a graph needs at least one node")
        self.pruning.thresholds()


@dataclass
class Circuit:
    """The result: every node with its effect, what the graph kept, the edges, and the graph file."""

    trace: Trace
    nodes: Nodes
    effects: torch.Tensor
    kept: torch.Tensor
    edges: Edges | None
    kept_edges: torch.Tensor | None
    graph: dict[str, Any]
    seconds: dict[str, float]
    labels: dict[tuple[int, int], str] = field(default_factory=dict)

    def top(self, n: int, tokens: bool = False) -> list[int]:
        """The `n` nodes of largest |effect| (token nodes only with `tokens`), largest first (indices into `nodes`)."""
        scores = self.effects.abs()
        if not tokens:
            scores = torch.where(self.nodes.kind == TOKEN, torch.full_like(scores, -1.0), scores)
        order = scores.argsort(descending=True)
        return [i for i in order[:n].tolist() if scores[i] >= 0]

    def node_row(self, index: int) -> dict[str, Any]:
        """Node `index` as a table row: kind, hook, dictionary, position, token, latent, effect, label."""
        kind, site, t, latent = self.nodes.key(index)
        tokenizer_token = self.graph["metadata"]["prompt_tokens"][t]
        dictionary = None if site == TOKENS else self.trace.dictionaries[site]
        return {
            "kind": KIND_NAMES[kind],
            "hook": EMBED_HOOK if dictionary is None else dictionary.writes,
            "dictionary": None if dictionary is None else dictionary.label,
            "position": t,
            "token": tokenizer_token,
            "latent": latent if kind == LATENT else None,
            "effect": float(self.effects[index]),
            "label": self.labels.get((site, latent), "") if kind == LATENT else "",
        }


def prompt_tokens(model: Any, prompt: str, model_name: str) -> torch.Tensor:
    """BOS + the prompt's tokens, [1, T]; one-line errors for an empty prompt and one longer than the context."""
    ids = text_token_ids(prompt, model.tokenizer)
    if not ids:
        raise SaelabError("--prompt is empty: give the text whose next token the circuit should explain")
    bos = model.tokenizer.bos_token_id
    ids = ids if bos is None else [bos, *ids]
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and len(ids) > n_ctx:
        raise SaelabError(
            f"the prompt is {len(ids):,} tokens (BOS included) but {model_name or 'the model'} reads at most "
            f"{n_ctx:,}; shorten it to its last {n_ctx - 1:,} tokens or fewer"
        )
    return torch.tensor([ids], device=next(model.parameters()).device)


def attribute_circuit(model: Any, found: Dictionaries, request: CircuitRequest) -> Circuit:
    """The circuit of `request` on `model` with the dictionaries `found` (see the module docstring)."""
    request.check()
    check_against_model(found.dictionaries, model, found.model)
    if request.evaluate:
        means_store(found)  # no store: the one-line error before any work
    tokens = prompt_tokens(model, request.prompt, found.model)
    first = found.first_position if request.first_position is None else request.first_position
    last = (request.position % tokens.shape[1]) if -tokens.shape[1] <= request.position < tokens.shape[1] else None
    if last is not None and last < first:
        raise SaelabError(
            f"the prompt has no node position: its metric is at position {last}, before position {first} where "
            f"the dictionaries' nodes start (the store's first position); give a longer prompt"
        )
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    trace = trace_prompt(
        model,
        tokens,
        found.dictionaries,
        first,
        lambda logits: resolve_metric(model.tokenizer, logits, request.target, request.contrast, request.position),
    )
    seconds["trace"] = _lap(clock)
    nodes = enumerate_nodes(trace)
    clock = time.perf_counter()
    effects = node_effects(model, trace, nodes, request.method, request.steps)
    if request.exact_errors and request.method != "exact":
        effects = with_exact_errors(model, trace, nodes, effects)
    seconds["effects"] = _lap(clock)
    kept = keep_nodes(nodes, effects, request.pruning)
    kept &= _top_mask(nodes, effects, request.max_nodes) | (nodes.kind == TOKEN)
    edges = kept_edges = None
    if request.edges:
        clock = time.perf_counter()
        edges = edge_effects(model, trace, nodes, kept.nonzero().flatten())
        seconds["edges"] = _lap(clock)
        kept, kept_edges = drop_dangling(nodes, kept, edges, keep_edges(edges, kept, request.pruning))
    evaluation = None
    if request.evaluate:
        clock = time.perf_counter()
        evaluation = evaluate_circuits(
            model, trace, nodes, effects, circuit_means(found), request.sizes, request.random_draws
        )
        seconds["evaluation"] = _lap(clock)
    info = _info(trace, found, request, model.tokenizer, nodes, effects, evaluation, seconds)
    labels = latent_labels(found.folders, _wanted_latents(nodes, kept | _top_mask(nodes, effects, 50)))
    graph = build_graph(
        trace, nodes, effects, kept, edges, kept_edges, model.tokenizer, info, labels, model.cfg.n_layers
    )
    return Circuit(trace, nodes, effects, kept, edges, kept_edges, graph, seconds, labels)


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _top_mask(nodes: Nodes, effects: torch.Tensor, n: int) -> torch.Tensor:
    """[N] bool: the `n` non-token nodes of largest |effect|."""
    scores = torch.where(nodes.kind == TOKEN, torch.full_like(effects, -1.0), effects.abs())
    mask = torch.zeros(len(nodes), dtype=torch.bool)
    mask[scores.argsort(descending=True)[:n]] = True
    return mask & (nodes.kind != TOKEN)


def _wanted_latents(nodes: Nodes, mask: torch.Tensor) -> dict[int, set[int]]:
    wanted: dict[int, set[int]] = {}
    for index in (mask & (nodes.kind == LATENT)).nonzero().flatten().tolist():
        wanted.setdefault(int(nodes.site[index]), set()).add(int(nodes.latent[index]))
    return wanted


def _info(
    trace: Trace,
    found: Dictionaries,
    request: CircuitRequest,
    tokenizer: Any,
    nodes: Nodes,
    effects: torch.Tensor,
    evaluation: dict[str, Any] | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """`metadata.saelab`: how the graph was made, and the numbers the dashboard shows beside it."""
    metric = trace.metric
    node_threshold, edge_threshold = request.pruning.thresholds()
    probabilities = trace.next_logits.softmax(-1)
    top = probabilities.topk(5)
    return {
        "model": found.model,
        "prompt": request.prompt,
        "slug": request.slug,
        "method": request.method,
        "steps": request.steps,
        "exact_errors": request.exact_errors,
        "metric": {
            "kind": metric.kind,
            "target": tokenizer.decode([metric.target]),
            "target_id": metric.target,
            "contrast": None if metric.contrast is None else tokenizer.decode([metric.contrast]),
            "contrast_id": metric.contrast,
            "position": metric.position,
            "value": trace.value,
            "probability": float(probabilities[metric.target]),
        },
        "top_next_tokens": [
            {"token": tokenizer.decode([int(i)]), "id": int(i), "probability": float(p)}
            for p, i in zip(top.values, top.indices, strict=True)
        ],
        "dictionaries": [
            {"label": d.label, "reads": d.reads, "writes": d.writes, "kind": d.kind, "layer": layer, "cut": d.is_cut}
            for d, layer in zip(trace.dictionaries, graph_layers(trace), strict=True)
        ],
        "token_ids": trace.tokens[0].tolist(),
        "first_position": trace.first,
        "store": None if found.store is None else str(found.store),
        "n_nodes": int((nodes.kind != TOKEN).sum()),
        "sum_of_effects": float(effects[nodes.kind != TOKEN].sum()),
        "edges": request.edges,
        "max_nodes": request.max_nodes,
        "prune": request.pruning.rule,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "evaluation": evaluation,
        "seconds": seconds,
    }
