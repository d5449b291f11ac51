"""Circuits: which latents, at which hooks and positions, make a model predict a token, and how they feed
each other (docs/circuits.md).

    trace (dictionaries spliced with their errors kept) → node effects (atp / ig / exact) → edges →
    pruning → faithfulness and completeness → a graph file in circuit-tracer's format → its figure

`attribute_circuit` (in `job`) runs the whole chain for `saelab attribute` and the dashboard's Circuit page.
"""

from saelab.circuits.attribution import METHODS, exact_effects, node_effects, with_exact_errors
from saelab.circuits.dictionaries import Dictionary, load_dictionaries
from saelab.circuits.edges import Edges, edge_effects, exact_edge_effects
from saelab.circuits.faithfulness import evaluate_circuits
from saelab.circuits.graph import build_graph, read_graph, write_graph
from saelab.circuits.job import CircuitRequest, attribute_circuit
from saelab.circuits.metric import Metric
from saelab.circuits.nodes import Nodes, enumerate_nodes
from saelab.circuits.pruning import Pruning, prune
from saelab.circuits.sources import folder_dictionaries, run_dictionaries
from saelab.circuits.trace import Trace, trace_prompt

__all__ = [
    "METHODS",
    "CircuitRequest",
    "Dictionary",
    "Edges",
    "Metric",
    "Nodes",
    "Pruning",
    "Trace",
    "attribute_circuit",
    "build_graph",
    "edge_effects",
    "enumerate_nodes",
    "evaluate_circuits",
    "exact_edge_effects",
    "exact_effects",
    "folder_dictionaries",
    "load_dictionaries",
    "node_effects",
    "prune",
    "read_graph",
    "run_dictionaries",
    "trace_prompt",
    "with_exact_errors",
    "write_graph",
]
