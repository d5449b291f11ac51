"""The figure of a steering experiment: each target token's log-probability against the coefficient, per feature."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots


def steering_figure(rows: list[dict[str, Any]], targets: list[str], title: str) -> go.Figure:
    """One panel per target: log p(target) at the last prompt position, averaged over the prompts, against
    the coefficient, one line per feature; the dotted line is the unsteered model. Without targets, one
    panel of the KL divergence from the unsteered model instead."""
    panels = targets or [None]
    names = [f"log p({target!r})" for target in targets] or ["KL(steered ‖ baseline), nats"]
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=names)
    features = list(dict.fromkeys(row["feature"] for row in rows))
    palette = qualitative.Plotly
    color = {feature: palette[i % len(palette)] for i, feature in enumerate(features)}  # the same in every panel
    for column, target in enumerate(panels, start=1):
        by_feature: dict[int, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        baseline: dict[int, float] = {}
        for row in rows:
            value = row["kl"] if target is None else row["target_logprob"][target]
            by_feature[row["feature"]][row["coefficient"]].append(value)
            if target is not None:
                baseline[row["prompt_index"]] = row["baseline_logprob"][target]
        for feature, cells in by_feature.items():
            coefficients = sorted(cells)
            figure.add_trace(
                go.Scatter(
                    x=coefficients,
                    y=[sum(cells[c]) / len(cells[c]) for c in coefficients],
                    mode="lines+markers",
                    line={"color": color[feature]},
                    name=f"feature {feature}",
                    legendgroup=str(feature),
                    showlegend=column == 1,
                    hovertemplate="coefficient %{x}<br>%{y:.3f}<extra>feature " + str(feature) + "</extra>",
                ),
                row=1,
                col=column,
            )
        if baseline:
            mean = sum(baseline.values()) / len(baseline)
            figure.add_hline(y=mean, line_dash="dot", annotation_text="unsteered", row=1, col=column)
        figure.update_xaxes(title_text="coefficient", row=1, col=column)
    figure.update_layout(title=title + " (mean over prompts)", template="plotly_white")
    return figure
