"""A graph file drawn with plotly: layers as rows (tokens at the bottom, the metric on top), prompt positions as
columns, a node's area by |effect|, edges by |effect|. Error nodes are diamonds, tokens squares, the metric a
star; colour is the sign of the attribution (blue: the node, where it is, pushes the metric up; red: down).

It reads only the graph file (`saelab.circuits.graph`), so a saved graph draws the same as a new one: the
standalone HTML of `saelab attribute --html` and the dashboard's Circuit page are this figure.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go

UP, DOWN = "#1f77b4", "#d62728"
SYMBOLS = {"latent": "circle", "error": "diamond", "token": "square", "metric": "star"}
MAX_SIZE, MIN_SIZE = 34, 6
CELL = 0.8  # the share of a position's column the nodes of one layer spread over


def node_rows(graph: dict[str, Any]) -> list[str]:
    """The graph's layers bottom to top: "E" (tokens), the dictionaries in forward order, the metric."""
    layers = {str(node["layer"]) for node in graph["nodes"] if node["feature_type"] != "logit"} - {"E"}
    metric = [str(node["layer"]) for node in graph["nodes"] if node["feature_type"] == "logit"]
    return ["E", *sorted(layers, key=float), *metric]


def node_positions(graph: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(x, y) of each node id: x its position, spread within the column by |effect|; y its layer's row."""
    rows = {layer: i for i, layer in enumerate(node_rows(graph))}
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for node in graph["nodes"]:
        cells[(str(node["layer"]), node["ctx_idx"])].append(node)
    places = {}
    for (layer, position), members in cells.items():
        members.sort(key=lambda n: -abs(n.get("saelab", {}).get("effect", 0.0)))
        for i, node in enumerate(members):
            offset = 0.0 if len(members) == 1 else CELL * (i / (len(members) - 1) - 0.5)
            places[node["node_id"]] = (position + offset, rows[layer])
    return places


def circuit_figure(graph: dict[str, Any], title: str | None = None, selected: set[str] | None = None) -> go.Figure:
    """The graph as a plotly figure; nodes carry their id in `customdata` (for clicks), `selected` ones a ring."""
    places = node_positions(graph)
    nodes = graph["nodes"]
    effects = [abs(n.get("saelab", {}).get("effect", 0.0)) for n in nodes if n["feature_type"] != "logit"]
    largest = max(effects, default=0.0) or 1.0
    figure = go.Figure()
    _add_edges(figure, graph, places)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for node in nodes:
        by_kind[node.get("saelab", {}).get("kind", "latent")].append(node)
    for kind, members in by_kind.items():
        figure.add_trace(_node_trace(kind, members, places, largest, selected or set()))
    rows = node_rows(graph)
    labels = _row_labels(graph, rows)
    tokens = graph["metadata"]["prompt_tokens"]
    shown = sorted({n["ctx_idx"] for n in nodes})
    figure.update_layout(
        title=title or _title(graph),
        showlegend=True,
        height=max(420, 110 * len(rows)),
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        xaxis={
            "tickmode": "array",
            "tickvals": shown,
            "ticktext": [repr(tokens[t])[1:-1] for t in shown],
            "tickangle": -45,
        },
        yaxis={"tickmode": "array", "tickvals": list(range(len(rows))), "ticktext": labels, "zeroline": False},
        plot_bgcolor="white",
        clickmode="event+select",
        legend={"orientation": "h", "y": 1.02, "x": 0},
    )
    return figure


def _title(graph: dict[str, Any]) -> str:
    info = graph["metadata"].get("saelab", {})
    metric = info.get("metric", {})
    what = (
        f"logit({metric.get('target')!r}) − logit({metric.get('contrast')!r})"
        if metric.get("contrast")
        else (f"log p({metric.get('target')!r})")
    )
    method = info.get("method", "?") + (" (errors and tokens exact)" if info.get("exact_errors") else "")
    return f"{what} = {metric.get('value', float('nan')):.3f} · {method} · {len(graph['nodes'])} nodes"


def _row_labels(graph: dict[str, Any], rows: list[str]) -> list[str]:
    by_layer = {d["layer"]: d["label"] for d in graph["metadata"].get("saelab", {}).get("dictionaries", [])}
    return ["tokens", *(by_layer.get(layer, f"layer {layer}") for layer in rows[1:-1]), "metric"]


def _node_trace(
    kind: str, members: list[dict[str, Any]], places: dict, largest: float, selected: set[str]
) -> go.Scatter:
    sizes, colours, texts = [], [], []
    for node in members:
        effect = node.get("saelab", {}).get("effect", 0.0)
        sizes.append(
            MAX_SIZE if kind == "metric" else MIN_SIZE + (MAX_SIZE - MIN_SIZE) * (abs(effect) / largest) ** 0.5
        )
        colours.append("#444" if kind == "metric" else (UP if effect < 0 else DOWN))
        texts.append(_hover(node))
    return go.Scatter(
        x=[places[n["node_id"]][0] for n in members],
        y=[places[n["node_id"]][1] for n in members],
        mode="markers",
        name=kind,
        marker={
            "size": sizes,
            "color": colours,
            "symbol": SYMBOLS.get(kind, "circle"),
            "line": {"width": [3 if n["node_id"] in selected else 0.5 for n in members], "color": "black"},
        },
        customdata=[n["node_id"] for n in members],
        hovertext=texts,
        hoverinfo="text",
    )


def _hover(node: dict[str, Any]) -> str:
    extra = node.get("saelab", {})
    lines = [
        f"<b>{node['clerp']}</b>",
        f"{extra.get('kind', '')} at {extra.get('token', '')!r} (position {node['ctx_idx']})",
    ]
    if "effect" in extra:
        lines.append(f"effect if zeroed: {extra['effect']:+.4f}")
    if node.get("activation") is not None:
        lines.append(f"activation {node['activation']:.3f}")
    return "<br>".join(lines)


def _add_edges(figure: go.Figure, graph: dict[str, Any], places: dict) -> None:
    """Edges in three width bins per sign, one trace each (plotly draws one width per trace)."""
    links = [link for link in graph["links"] if link["source"] in places and link["target"] in places]
    if not links:
        return
    largest = max(abs(link["weight"]) for link in links) or 1.0
    for sign, colour in (("up", UP), ("down", DOWN)):
        for width in (1, 2.5, 5):
            xs, ys = [], []
            for link in links:
                strength = abs(link["weight"]) / largest
                if (link["weight"] > 0) != (sign == "up") or _bin(strength) != width:
                    continue
                (x0, y0), (x1, y1) = places[link["source"]], places[link["target"]]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
            if xs:
                figure.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines",
                        line={"width": width, "color": colour},
                        opacity=0.45,
                        hoverinfo="skip",
                        showlegend=False,
                    )
                )


def _bin(strength: float) -> float:
    return 5 if strength > 0.5 else 2.5 if strength > 0.15 else 1
