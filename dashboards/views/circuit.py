"""Circuit: which latents, at which layers and positions, make the model predict a token, and what happens when
some of them are ablated or boosted. The graph is `saelab.circuits`' graph file (a new one, or one saved by
`saelab attribute` under the run's `graphs/`); the edits go through `saelab.steer` (`saelab.browse.circuit_edits`)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st
import ui

from saelab.browse.circuit_edits import edit_graph_nodes
from saelab.circuits.figure import circuit_figure
from saelab.circuits.graph import read_graph
from saelab.errors import SaelabError
from saelab.run_layout import GRAPHS_DIR

DEFAULT_PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2"
NEW = "a new graph (the form below)"
EDITABLE = ("latent", "error")

sel = ui.selection()
st.title("Circuit")
ui.require_sae(sel)
run = sel.run
st.caption(
    "Which nodes (latents, SAE errors, tokens) move the model's prediction: each node's effect is the change of the "
    "metric when it is zeroed. Rows are the run's SAEs in forward order, columns the prompt's tokens; blue nodes "
    "and edges push the metric up, red down; diamonds are error nodes. Click a latent to open its feature page."
)

# ---- which graph: a saved one, or a new one from the form -------------------------------------------
saved = sorted((run.path / GRAPHS_DIR).glob("*.json")) if (run.path / GRAPHS_DIR).is_dir() else []
source = st.selectbox("graph", [NEW, *(path.name for path in saved)], key="circuit_source")
usable = [sae for sae in run.saes if sae.has_weights]
one_per_hook: dict[str, str] = {}
for sae in sorted(usable, key=lambda s: s.label != (sel.sae.label if sel.sae else "")):
    one_per_hook.setdefault(sae.hook or sae.label, sae.label)

with st.form("circuit"):
    prompt = st.text_area("prompt", value=DEFAULT_PROMPT, key="circuit_prompt", height=110)
    left, middle, right = st.columns(3)
    target = left.text_input("target token", key="circuit_target", help="empty: the model's top next token")
    contrast = middle.text_input("contrast token", key="circuit_contrast", help="logit(target) − logit(contrast)")
    method = right.selectbox("method", ["atp", "ig"], key="circuit_method", help="exact is for small sets: the CLI")
    left, middle, right = st.columns(3)
    labels = left.multiselect(
        "SAEs (one per hook)", [s.label for s in usable], default=list(one_per_hook.values()), key="circuit_saes"
    )
    max_nodes = middle.number_input("max nodes", min_value=5, max_value=1000, value=60, step=5, key="circuit_max")
    edges = right.checkbox("edges", value=False, key="circuit_edges", help="one backward pass per kept node")
    exact_errors = right.checkbox(
        "exact errors and tokens", value=False, key="circuit_exact_errors", help="few, large, far from linear"
    )
    evaluate = right.checkbox("faithfulness", value=False, key="circuit_evaluate", help="mean ablation, N = 10 … 1000")
    submitted = st.form_submit_button("Attribute", type="primary")


def new_graph() -> dict | None:
    """The graph of the form's request, or None after a message."""
    from saelab.circuits.job import CircuitRequest, attribute_circuit

    found = ui.circuit_dictionaries(run, labels)
    if found is None:
        return None
    request = CircuitRequest(
        prompt=prompt,
        target=target or None,
        contrast=contrast or None,
        method=method,
        exact_errors=exact_errors,
        edges=edges,
        max_nodes=int(max_nodes),
        evaluate=evaluate,
    )
    try:
        with st.spinner(f"loading {found.model} (once per dashboard process) and attributing…"):
            model = ui.cached_model(found.model)
            with ui.model_lock():
                return attribute_circuit(model, found, request).graph
    except SaelabError as error:
        st.error(str(error))
        return None


if source != NEW:
    try:
        st.session_state["circuit_graph"] = read_graph(run.path / GRAPHS_DIR / source)
    except SaelabError as error:
        st.error(str(error))
        st.stop()
elif submitted:
    if not labels:
        st.info("Pick at least one SAE: its latents and errors are the graph's nodes.")
        st.stop()
    st.session_state["circuit_graph"] = new_graph()
    st.session_state.pop("circuit_edit", None)
graph = st.session_state.get("circuit_graph")
if not graph:
    st.caption("Write a prompt and press Attribute.")
    st.stop()

# ---- the graph ---------------------------------------------------------------------------------------
info = graph["metadata"].get("saelab", {})
metric = info.get("metric", {})
nodes = {node["node_id"]: node for node in graph["nodes"]}
described = f"log p({metric.get('target')!r})"
if metric.get("contrast") is not None:
    described = f"logit({metric.get('target')!r}) − logit({metric.get('contrast')!r})"
top = ", ".join(f"{t['token']!r} {t['probability']:.1%}" for t in info.get("top_next_tokens", [])[:5])
value = metric.get("value", float("nan"))
st.markdown(f"**{described} = {value:.4f}** at position {metric.get('position')}; top next tokens {top}")
st.caption(
    f"{info.get('method')} over {info.get('n_nodes', '?'):,} nodes; the graph keeps {len(graph['nodes'])} nodes and "
    f"{len(graph['links'])} edges · seconds {info.get('seconds', {})}"
)
chosen = [node_id for node_id in st.session_state.get("circuit_nodes", []) if node_id in nodes]
click = st.radio(
    "clicking a node", ["opens its feature page", "selects it for editing"], horizontal=True, key="circuit_click"
)
event = st.plotly_chart(
    circuit_figure(graph, selected=set(chosen)), key="circuit_chart", on_select="rerun", selection_mode="points"
)
clicked = [point.get("customdata") for point in (event.selection.points if event else [])]
clicked = [node_id for node_id in clicked if nodes.get(node_id, {}).get("saelab", {}).get("kind") in EDITABLE]
if clicked and click.startswith("opens"):
    extra = nodes[clicked[0]]["saelab"]
    if extra["kind"] == "latent":
        st.switch_page(
            ui.FEATURE_PAGE, query_params={"run": run.name, "sae": extra["dictionary"], "feature": str(extra["latent"])}
        )
elif clicked:
    st.session_state["circuit_nodes"] = chosen = list(dict.fromkeys([*chosen, *clicked]))

rows = sorted(
    (n for n in graph["nodes"] if n.get("saelab", {}).get("kind") in EDITABLE),
    key=lambda n: -abs(n["saelab"].get("effect", 0.0)),
)
st.dataframe(
    pd.DataFrame(
        {
            "node": [n["node_id"] for n in rows],
            "SAE": [n["saelab"].get("dictionary") for n in rows],
            "position": [n["ctx_idx"] for n in rows],
            "token": [ui.token_label(n["saelab"].get("token", "")) for n in rows],
            "latent": [n["saelab"].get("latent", "error") for n in rows],
            "effect": [n["saelab"].get("effect") for n in rows],
            "label": [n["clerp"] for n in rows],
        }
    ).astype({"latent": str}),
    hide_index=True,
    height=min(420, 35 * (len(rows) + 1) + 3),
    column_config={"effect": st.column_config.NumberColumn(format="%+.4f")},
    key="circuit_table",
)

# ---- edits through saelab.steer --------------------------------------------------------------------
st.subheader("Ablate or boost nodes")
picked = st.multiselect(
    "nodes to edit",
    [n["node_id"] for n in rows],
    format_func=lambda i: f"{i} · {nodes[i]['clerp'][:50]}",
    key="circuit_nodes",
)
left, middle, right = st.columns([1, 1, 2], vertical_alignment="bottom")
factor = right.number_input("boost factor", value=2.0, step=0.5, key="circuit_factor")
action = None
if left.button("Ablate selected", disabled=not picked):
    action = 0.0
if middle.button("Boost selected", disabled=not picked):
    action = float(factor)
for node_id in picked:
    extra = nodes[node_id]["saelab"]
    if extra["kind"] == "latent":
        query = {"run": run.name, "sae": extra["dictionary"], "feature": str(extra["latent"])}
        st.page_link(
            ui.FEATURE_PAGE, label=f"feature page: {extra['dictionary']} · latent {extra['latent']}", query_params=query
        )
if action is not None:
    found = ui.circuit_dictionaries(run, [d["label"] for d in info.get("dictionaries", [])])
    if found is not None:
        try:
            model = ui.cached_model(found.model)
            saes = {d.label: d.sae for d in found.dictionaries}
            st.session_state["circuit_edit"] = (action, edit_graph_nodes(model, graph, picked, action, saes))
        except SaelabError as error:
            st.error(str(error))
if st.session_state.get("circuit_edit"):
    factor_used, result = st.session_state["circuit_edit"]
    what = "ablated" if factor_used == 0 else f"×{factor_used:g}"
    st.markdown(
        f"{result.edited} node(s) {what}: metric {result.metric_before:.4f} → **{result.metric_after:.4f}** "
        f"(change {result.change:+.4f})"
    )
    st.dataframe(
        pd.DataFrame(
            {
                "before": [f"{t!r} {p:.1%}" for t, _, p in result.top_before],
                "after": [f"{t!r} {p:.1%}" for t, _, p in result.top_after],
            }
        ),
        hide_index=True,
        key="circuit_edit_table",
    )

# ---- evaluation and the file -------------------------------------------------------------------------
evaluation = info.get("evaluation")
if evaluation:
    st.subheader("Faithfulness and completeness (mean ablation)")
    st.dataframe(
        pd.DataFrame(
            {
                "nodes": evaluation["sizes"],
                "faithfulness": evaluation["faithfulness"],
                "completeness": evaluation["completeness"],
                f"random (mean of {evaluation['random_draws']})": evaluation["random_faithfulness"],
            }
        ),
        hide_index=True,
        key="circuit_evaluation",
    )
st.download_button(
    "graph file (circuit-tracer's format)",
    json.dumps(graph),
    file_name=f"{graph['metadata'].get('slug', 'circuit')}.json",
    mime="application/json",
)
