"""Runs: every SAE of every run under the runs folder, the sidebar run's SAEs on the L0–FVU and L0–CE-recovered
frontier, and training curves of the ones ticked."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
import ui
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from saelab.browse.frontier import Frontier, sae_frontier
from saelab.browse.runs import RunInfo, group_frequency_curves, read_metrics, training_curves

CURVES = {"loss": "loss", "fvu": "FVU", "l0": "L0", "dead_fraction": "dead fraction"}
FRONTIER_METRICS = {  # the y of each panel of the frontier plot, and its title
    "fvu": "L0 against FVU (lower is better)",
    "ce_loss_recovered": "L0 against CE loss recovered (higher is better)",
}
FRONTIER_HOVER = (
    "<b>%{customdata[0]}</b><br>L0 %{x:.1f}<br>FVU %{customdata[1]}<br>CE loss recovered %{customdata[2]}"
    "<extra>%{fullData.name}</extra>"
)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _shown(value: float | None, format_spec: str) -> str:
    return "—" if value is None else format(value, format_spec)


def frontier_section(run: RunInfo) -> None:
    """The frontier plot of `run`'s SAEs, with a caption naming those left out and saying what ◆ means."""
    if not run.saes:
        return
    st.subheader(f"Sparsity against fidelity: `{run.name}`")
    frontier = sae_frontier(run.saes)
    notes = [
        "One marker per SAE from its eval.json (held-out text); SAEs of one architecture are joined in order "
        "of L0. Left is sparser; down is better for FVU, up for CE loss recovered."
    ]
    if frontier.not_evaluated:
        left_out = ", ".join(f"`{label}`" for label in frontier.not_evaluated)
        notes.append(f"Not plotted, no eval.json yet: {left_out}; `saelab eval run={run.path}` measures them.")
    if frontier.has_transcoders:
        notes.append(
            "◆ marks transcoders: they reconstruct another hook's output, not this hook's input, so their FVU "
            "and CE loss recovered are not the same task as an SAE's (●)."
        )
    if not frontier.by_architecture:
        st.info(" ".join(notes[1:]))
        return
    st.plotly_chart(frontier_figure(frontier), key="frontier")
    st.caption(" ".join(notes))


def shared_section(run: RunInfo) -> None:
    """How many features the run's SAEs share, from `saelab compare <run>` (compare.json), as a heatmap."""
    if len(run.saes) < 2:
        return
    st.subheader(f"Shared features: `{run.name}`")
    report = run.comparison
    if not report:
        st.caption(f"`saelab compare {run.path}` measures how many features these SAEs share (shown here).")
        return
    labels = [sae["label"] for sae in report["saes"]]
    pairwise = report.get("pairwise") or {
        "shared_fraction": [[1.0, report["shared_fraction"]], [report["shared_fraction_b"], 1.0]]
    }
    shared = [[None if v is None else 100 * v for v in row] for row in pairwise["shared_fraction"]]
    figure = go.Figure(
        go.Heatmap(
            z=shared,
            x=labels,
            y=labels,
            colorscale="Blues",
            zmin=0,
            zmax=100,
            text=[["—" if v is None else f"{v:.0f}%" for v in row] for row in shared],
            texttemplate="%{text}",
            hovertemplate="%{z:.1f}% of %{y}'s latents are shared with %{x}<extra></extra>",
        )
    )
    figure.update_layout(height=120 + 40 * len(labels), **ui.CHART_LAYOUT)
    figure.update_yaxes(autorange="reversed")
    st.plotly_chart(figure, key="shared")
    st.caption(
        f"Row SAE's latents whose decoder and encoder both match a latent of the column SAE at cosine ≥ "
        f"{report['threshold']:g} (one-to-one matchings; Paulo & Belrose 2025), from `{run.path}/compare.json`."
    )


def frontier_figure(frontier: Frontier) -> go.Figure:
    """L0 (log) against FVU and against CE loss recovered, one trace per architecture and panel; the two
    traces of an architecture share colour and legend entry, so a legend click hides it in both panels."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=list(FRONTIER_METRICS.values()), horizontal_spacing=0.08)
    for i, (architecture, points) in enumerate(frontier.by_architecture.items()):
        for col, metric in enumerate(FRONTIER_METRICS, start=1):
            placed = [p for p in points if getattr(p, metric) is not None]  # a None would break the line
            trace = go.Scatter(
                x=[p.l0 for p in placed],
                y=[getattr(p, metric) for p in placed],
                mode="lines+markers",
                name=architecture,
                legendgroup=architecture,
                showlegend=col == 1,
                line={"color": qualitative.Plotly[i % len(qualitative.Plotly)]},
                marker={"size": 10, "symbol": "diamond" if points[0].is_transcoder else "circle"},
                customdata=[[p.label, _shown(p.fvu, ".4f"), _shown(p.ce_loss_recovered, ".1%")] for p in placed],
                hovertemplate=FRONTIER_HOVER,
            )
            figure.add_trace(trace, row=1, col=col)
    figure.update_xaxes(type="log", title_text="L0 (latents active per token)", tickformat="~g")
    figure.update_yaxes(title_text="FVU", row=1, col=1)
    figure.update_yaxes(title_text="CE loss recovered", tickformat=".0%", row=1, col=2)
    figure.update_layout(height=400, **ui.CHART_LAYOUT, legend={"orientation": "h", "y": -0.25})
    figure.update_layout(margin={"t": 60})  # room for the panel titles
    return figure


sel = ui.selection()
st.title("Runs")
if not sel.runs:
    st.info(f"No training runs under `{sel.root}` yet. {ui.MAKE_A_RUN}")
    st.stop()

rows = []
for run in sel.runs:
    for sae in run.saes:
        rows.append(  # the numbers first: they are what a reader compares
            {
                "run": run.name,
                "SAE": sae.label,
                "variant": sae.architecture,
                "width": sae.d_sae,
                "k / target": sae.sparsity,
                "tokens trained": sae.tokens,
                "FVU": sae.fvu,
                "L0": sae.l0,
                "dead %": _percent(sae.dead_fraction),
                "CE recovered %": _percent(sae.ce_loss_recovered),
                "numbers from": sae.metrics_from,
                "feature store": "yes" if sae.has_features else "no",
                "status": "finished" if run.finished else "training",
                "model": sae.model,
                "hook": sae.hook,
            }
        )
st.dataframe(
    rows,
    hide_index=True,
    column_config={
        "tokens trained": st.column_config.NumberColumn(format="localized"),
        "FVU": st.column_config.NumberColumn(format="%.3f"),
        "L0": st.column_config.NumberColumn(format="%.1f"),
        "dead %": st.column_config.NumberColumn(format="%.1f"),
        "CE recovered %": st.column_config.NumberColumn(format="%.1f"),
    },
)
judged = [
    (run, sae)
    for run in sel.runs
    for sae in run.saes
    if sae.probing or sae.absorption_rate is not None or sae.autointerp
]
if judged:
    st.subheader("Judged by use: sparse probing, absorption, explanations")
    st.caption(
        "`saelab probe`: held-out accuracy of probes for 8 token concepts (mean over concepts; 50 % is chance) "
        "on the k latents that differ most, beside a dense probe on the residual stream, and the mean "
        "first-letter absorption rate (Chanin et al. 2024; lower is better). `saelab explain`: how well an "
        "explanation of a latent tells held-out contexts where it fires from ones where it does not "
        "(detection balanced accuracy, mean over the latents scored), beside another latent's explanation; "
        "explainer: the LLM's or the token summary's, whichever detects better (the SAE's default)."
    )
    ks = sorted({key for _, sae in judged for key in sae.probing if key != "dense"}, key=lambda key: int(key[1:]))
    table = []
    for run, sae in judged:
        row = {"run": run.name, "SAE": sae.label, "dense probe %": _percent(sae.probing.get("dense"))}
        row |= {f"{key[1:]}-sparse %": _percent(sae.probing.get(key)) for key in ks}
        row["absorption %"] = _percent(sae.absorption_rate)
        row["explainer"] = sae.autointerp.get("explainer")
        for key, name in (("detection", "detection %"), ("detection_shuffled", "shuffled %"), ("fuzzing", "fuzzing %")):
            row[name] = _percent((sae.autointerp.get(key) or {}).get("mean"))
        table.append(row | {"latents explained": sae.autointerp.get("n_latents")})
    percent_format = st.column_config.NumberColumn(format="%.1f")
    st.dataframe(table, hide_index=True, column_config={key: percent_format for key in table[0] if "%" in key})

for run in sel.runs:
    if not run.finished:
        st.caption(f"`{run.name}`: {run.status}; showing what it has written so far.")
    for problem in run.problems:
        st.warning(f"`{run.name}`: cannot read {problem}")
    if not run.saes:
        st.info(f"`{run.name}` names no SAE yet.")

if sel.run:
    frontier_section(sel.run)
    shared_section(sel.run)

st.subheader("Training curves")
choices = [f"{run.name} / {sae.label}" for run in sel.runs for sae in run.saes]
default = [f"{sel.run.name} / {sae.label}" for sae in sel.run.saes] if sel.run else []
ticked = st.multiselect("curves of", choices, default=default, help="the SAEs whose training curves are overlaid")
if not ticked:
    st.info("Tick one or more SAEs above to overlay their training curves.")
    st.stop()

figures = {name: go.Figure() for name in CURVES}
records = {run.name: read_metrics(run.path) for run in sel.runs if any(f"{run.name} / " in t for t in ticked)}
empty = []
for choice in ticked:
    run_name, label = choice.split(" / ", 1)
    curves = training_curves(records.get(run_name, []), label)
    if not curves["tokens"]:
        empty.append(choice)
        continue
    for name, figure in figures.items():
        figure.add_trace(go.Scatter(x=curves["tokens"], y=curves[name], mode="lines", name=choice))
if empty:
    st.info(f"No training steps logged yet for {', '.join(empty)}.")
columns = st.columns(2)
for i, (name, figure) in enumerate(figures.items()):
    figure.update_layout(
        title=CURVES[name],
        xaxis_title="tokens",
        height=320,
        **ui.CHART_LAYOUT,
        legend={"orientation": "h", "y": -0.3},
    )
    if name in ("loss", "fvu"):  # both fall by orders of magnitude; label every tick in full
        figure.update_yaxes(type="log", tickformat="~g")
    columns[i % 2].plotly_chart(figure, key=f"curve-{name}")

for choice in ticked:  # GBA: each group's measured firing frequency against its target
    run_name, label = choice.split(" / ", 1)
    groups = group_frequency_curves(records.get(run_name, []), label)
    if not groups:
        continue
    figure = go.Figure()
    for group, curve in groups.items():
        ratio = [f / t for f, t in zip(curve["freq"], curve["target"], strict=True)]
        figure.add_trace(
            go.Scatter(
                x=curve["tokens"], y=ratio, mode="lines", name=f"group {group} (target {curve['target'][-1]:.2g})"
            )
        )
    figure.add_hline(y=1.0, line_dash="dash", line_color="grey")
    figure.update_layout(
        title=f"{choice}: GBA group frequency ÷ target", xaxis_title="tokens", height=360, **ui.CHART_LAYOUT
    )
    figure.update_yaxes(type="log", tickformat="~g")
    st.plotly_chart(figure, key=f"gba-groups-{choice}")
