"""Tokens as HTML, each shaded in proportion to a latent's activation on it; hovering shows the value.

Plain inline-styled spans (no script, no stylesheet), so the HTML survives Streamlit's sanitiser and
reads the same in a notebook (`IPython.display.HTML`). Whitespace that would vanish is made
visible: a newline is `↵` (a context stays on one line), a tab `⇥`; spaces are kept (`white-space: pre-wrap`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from saelab.analysis.feature_store import ContextWindow

HIGHLIGHT_RGB = (255, 127, 14)  # plotly's orange: the colour of "this latent fired here"
_MIN_ALPHA = 0.12  # the faintest firing must still be visible


def token_text(token: str) -> str:
    """A token as it should read in a highlighted line: escaped, with invisible whitespace shown."""
    if token == "":
        return "∅"
    return html.escape(token).replace("\t", "⇥").replace("\r", "").replace("\n", "↵")


def activation_title(value: float | None) -> str:
    return "not encoded (BOS / attention sink)" if value is None else f"activation {value:.4g}"


def tokens_html(
    tokens: Sequence[str],
    activations: Sequence[float | None],
    scale: float,
    focus: int | None = None,
) -> str:
    """One `<div>` of `tokens`, token i shaded by `activations[i] / scale` (capped at 1; 0 unshaded);
    the token at index `focus` (the one a context is about) is outlined."""
    if len(tokens) != len(activations):
        raise ValueError(f"{len(tokens)} tokens but {len(activations)} activations")
    r, g, b = HIGHLIGHT_RGB
    spans = []
    for i, (token, value) in enumerate(zip(tokens, activations, strict=True)):
        style = []
        if value is None:
            style.append("color:#999")
        elif value > 0 and scale > 0:
            alpha = _MIN_ALPHA + (1 - _MIN_ALPHA) * min(1.0, value / scale)
            style.append(f"background:rgba({r},{g},{b},{alpha:.3f})")
        if i == focus:
            style.append("outline:2px solid #d62728;outline-offset:-1px;font-weight:600")
        spans.append(f'<span title="{activation_title(value)}" style="{";".join(style)}">{token_text(token)}</span>')
    return (
        '<div style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.85em;'
        'white-space:pre-wrap;line-height:1.8;word-break:break-word">' + "".join(spans) + "</div>"
    )


def windows_html(windows: Sequence[ContextWindow], scale: float) -> str:
    """Context windows as rows of a table: the activation at the window's token, then the tokens,
    shaded by `scale` with that token outlined."""
    rows = []
    for window in windows:
        value = window.value
        shown = "—" if value is None else f"{value:.3g}"
        line = tokens_html(window.tokens, window.activations, scale, window.highlight)
        rows.append(
            '<tr><td style="padding:2px 10px 2px 0;vertical-align:top;text-align:right;'
            f'font-family:ui-monospace,monospace;font-size:0.85em;color:#666">{shown}</td>'
            f'<td style="padding:2px 0">{line}</td></tr>'
        )
    return '<table style="border-collapse:collapse;border:none">' + "".join(rows) + "</table>"
