"""Feature browser: find latents by index, by a token in their logit effects, by text that activates
them, or by density, max activation and label (an explanation or token summary); open one on its page."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import ui

from saelab.browse.feature_filter import SORT_KEYS, FeatureFilter, random_live_latent
from saelab.errors import SaelabError

SHOWN_ROWS = 500  # the table shows the first rows of the filtered, sorted latents
LINKS = 15

sel = ui.selection()
st.title("Feature browser")
sae = ui.require_sae(sel)
store = ui.feature_store(sae)
meta = store.meta if store is not None else {}
table = ui.summary_table(store) if store is not None else None
n_latents = store.n_latents if store is not None else sae.d_sae


def link(latent: int, detail: str = "") -> None:
    st.page_link(ui.FEATURE_PAGE, label=f"latent {latent}{detail}", query_params=ui.feature_query(latent))


by_index, by_token, by_chance = st.columns([2, 3, 1], vertical_alignment="bottom")
with by_index:
    index = int(st.number_input("open latent by index", min_value=0, value=0, step=1, key="index"))
    if st.button("open", key="open_index"):
        ui.open_feature(index)
with by_token:
    token = st.text_input("latents whose logit effects include a token", placeholder="e.g. Paris", key="token")
with by_chance:
    if st.button("random latent") and table:
        choice = random_live_latent(table)
        if choice is None:
            st.info("No latent fired in the analysed tokens.")
        else:
            ui.open_feature(choice)

if token.strip() and store is not None:
    direction = st.radio("the token is", ["pushed up", "pushed down"], horizontal=True, key="direction")
    try:
        found = store.search_by_logit_token(token, "positive" if direction == "pushed up" else "negative")
    except SaelabError as error:
        st.error(str(error))
        found = []
    if not found:
        st.info(f"No latent has {token.strip()!r} among its top {direction} tokens (matched after stripping spaces).")
    for latent in found[:LINKS]:
        effects = store.feature(latent)
        pushed = effects.positive_logits if direction == "pushed up" else effects.negative_logits
        shown = ", ".join(ui.token_label(e.token) for e in pushed[:6])
        link(latent, f": {direction} {shown} · density {ui.percent(effects.frequency)}")
    if len(found) > LINKS:
        st.caption(f"… and {len(found) - LINKS} more")

st.subheader("Latents that fire on a text")
text = ui.text_to_run("search_text", "search_text_value", "Type a phrase: which latents fire on it?")
if text is not None:
    result = ui.run_text(sae, meta, text)
    if result is not None:
        strongest = result.strongest(LINKS)
        if not strongest:
            st.info("No latent fires on this text.")
        else:
            first = strongest[0]
            st.caption(f"the strongest, latent {first.latent}, on the text (hover a token for its activation):")
            ui.show_tokens(result.tokens, result.feature(first.latent), first.max_activation)
            for found in strongest:
                where = f"{ui.token_label(found.token)} (position {found.position})"
                count = f"{found.n_tokens} token" + ("" if found.n_tokens == 1 else "s")
                link(found.latent, f": max {found.max_activation:.3g} on {where}, fires on {count}")
            rows = [
                {
                    "position": position,
                    "token": ui.token_label(token_text),
                    "latents (activation)": ", ".join(f"{f} ({v:.3g})" for f, v in pairs),
                }
                for position, token_text, pairs in result.by_token()
            ]
            with st.expander("each token's strongest latents"):
                st.dataframe(rows, hide_index=True)

st.subheader("All latents by density and max activation")
if table is None:
    st.stop()
if not table:
    st.info("The feature store holds no latents.")
    st.stop()
live = [row for row in table if row[1] > 0]
n_dead = len(table) - len(live)
if live:
    lowest = math.floor(math.log10(min(row[1] for row in live)) * 4) / 4
    top_max = max(row[2] for row in live)
else:
    lowest, top_max = -6.0, 1.0
left, middle, right = st.columns(3)
density = left.slider("log10 density", min_value=lowest, max_value=0.0, value=(lowest, 0.0), step=0.25, key="density")
minimum = middle.slider("max activation at least", 0.0, float(top_max), value=0.0, key="min_max_activation")
sort_by = right.selectbox("sort by", list(SORT_KEYS), key="sort_by")
order = right.radio("order", ["descending", "ascending"], horizontal=True, label_visibility="collapsed", key="order")
show_dead = left.checkbox(f"include the {n_dead:,} dead latents (never fired)", value=False)
chosen = FeatureFilter(
    min_frequency=0.0 if show_dead else 10 ** density[0] * (1 - 1e-9),
    max_frequency=10 ** density[1],
    min_max_activation=minimum,
    sort_by=sort_by,
    order=order,
).apply(table)


def percent_of(score: float | None) -> float | None:
    return None if score is None else 100 * score


book = ui.label_book(sae, ui.peak_tokens(store))
label_query = st.text_input(
    "label contains",
    placeholder='words of a label or token summary, e.g. def  or  "self"',
    key="label_query",
    help="every word, in any of the latent's labels: its explanations and its token summary",
)
if label_query.strip():
    matching = set(book.search(label_query))
    chosen = [row for row in chosen if row[0] in matching]
st.caption(
    f"{len(chosen):,} of {len(table):,} latents match; the first {min(len(chosen), SHOWN_ROWS):,} are listed. "
    "label: the latent's headline (a label that beats shuffled labels), else its token summary, greyed out; "
    "detection %: how well the label tells where the latent fires, shuffled %: another latent's label, same examples"
)
shown = [(row, book.shown(row[0])) for row in chosen[:SHOWN_ROWS]]
frame = pd.DataFrame(
    [
        {
            "latent": i,
            "label": label.text if label else "",
            "label test": label.verdict() if label else "",
            "detection %": percent_of(label.detection if label else None),
            "shuffled %": percent_of(label.shuffled if label else None),
            "density %": 100 * f,
            "max activation": m,
            "mean activation": mean,
        }
        for (i, f, m, mean), label in shown
    ],
    columns=[
        "latent",
        "label",
        "label test",
        "detection %",
        "shuffled %",
        "density %",
        "max activation",
        "mean activation",
    ],
)
untrusted = [label is None or not label.trusted for _, label in shown]
grey = frame.style.apply(
    lambda column: ["color: #9e9e9e" if flag and column.name in ("label", "label test") else "" for flag in untrusted]
)
picked = st.dataframe(
    grey,
    hide_index=True,
    on_select="rerun",
    selection_mode="single-row",
    column_config={
        "label": st.column_config.TextColumn(width="large"),
        "detection %": st.column_config.NumberColumn(format="%.0f", help="the label's detection score"),
        "shuffled %": st.column_config.NumberColumn(format="%.0f", help="shuffled labels' score, same examples"),
        "density %": st.column_config.NumberColumn(format="%.4f"),
        "max activation": st.column_config.NumberColumn(format="%.3g"),
        "mean activation": st.column_config.NumberColumn(format="%.3g"),
    },
    key="latents_table",
)
if picked and picked.selection.rows:
    ui.open_feature(chosen[picked.selection.rows[0]][0])

figure = go.Figure(
    go.Scatter(
        x=[math.log10(row[1]) for row in live],
        y=[row[2] for row in live],
        mode="markers",
        marker={"size": 4, "opacity": 0.5},
        text=[f"latent {row[0]}" for row in live],
        hovertemplate="%{text}: log10 density %{x:.2f}, max %{y:.3g}<extra></extra>",
    )
)
figure.add_vrect(x0=density[0], x1=density[1], fillcolor="#ff7f0e", opacity=0.08, line_width=0)
figure.update_layout(
    title="every live latent: density against max activation",
    xaxis_title="log10 density (fraction of tokens it fires on)",
    yaxis_title="max activation",
    yaxis={"type": "log", "tickformat": "~g"},
    height=360,
    **ui.CHART_LAYOUT,
)
st.plotly_chart(figure, key="density_chart")
