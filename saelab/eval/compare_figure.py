"""`saelab compare`'s picture: histograms of the matched pairs' cosines (and activation correlations)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from saelab.eval.compare import Comparison

BIN = 0.02  # histogram bin width, in cosine (or correlation)


def comparison_figure(comparison: Comparison) -> go.Figure:
    """One panel per measure of the matched pairs (decoder cosine, encoder cosine, activation correlation
    with a store); one trace per pair of SAEs, the same colour in every panel."""
    panels = ["decoder cosine of matched pairs", "encoder cosine of the decoder-matched pairs"]
    with_store = any(pair.moments is not None for pair in comparison.pairs.values())
    if with_store:
        panels.append("activation correlation of matched pairs")
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, horizontal_spacing=0.06)
    threshold = comparison.report["threshold"]
    for n, pair in enumerate(comparison.pairs.values()):
        matched = pair.decoder.partner >= 0
        values = [pair.decoder.cosine[matched], pair.encoder_cosine_of_decoder_partners()[matched]]
        if with_store:
            values.append(pair.moments.correlation())
        colour = qualitative.Plotly[n % len(qualitative.Plotly)]
        for col, series in enumerate(values, start=1):
            figure.add_trace(
                go.Histogram(
                    x=series[~series.isnan()].tolist(),
                    xbins={"start": -1, "end": 1 + BIN, "size": BIN},
                    name=f"{pair.a.label} ↔ {pair.b.label}",
                    legendgroup=str(n),
                    showlegend=col == 1,
                    marker_color=colour,
                    opacity=0.6,
                ),
                row=1,
                col=col,
            )
    for col in (1, 2):
        figure.add_vline(x=threshold, line_dash="dash", line_color="grey", row=1, col=col)
    figure.update_layout(
        barmode="overlay",
        title=f"Matched latents (dashed: the shared threshold {threshold:g})",
        template="plotly_white",
        height=420,
        legend={"orientation": "h", "y": -0.2},
    )
    figure.update_yaxes(title_text="latents", row=1, col=1)
    return figure
