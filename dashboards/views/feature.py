"""Feature page: one latent's density, histogram, top and sampled contexts, logit effects, and live text."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
import ui

from saelab.analysis.feature_store import FeaturePage
from saelab.browse.feature_filter import random_live_latent
from saelab.browse.highlight import windows_html
from saelab.errors import SaelabError

sel = ui.selection()
st.title("Feature page")
sae = ui.require_sae(sel)
store = ui.feature_store(sae)
n_latents = store.n_latents if store is not None else sae.d_sae
meta = store.meta if store is not None else {}

# The latent: `latent` in the session (set by the URL, another page, the random button or the box) is
# the truth; the box shows it. (A box with `value=latent` would change identity with each latent and
# drop every other edit.)
wanted = st.session_state.get("latent", 0)
try:
    latent = int(wanted)
except (TypeError, ValueError):
    latent = -1
if latent < 0:  # not a number, or negative: say so, and show latent 0
    st.error(f"`{wanted}` is not a latent index; pick one in [0, {n_latents}).")
    latent = 0
st.session_state["latent"] = st.session_state["latent_box"] = latent


def _box_changed() -> None:
    st.session_state["latent"] = st.session_state["latent_box"]


left, right = st.columns([3, 1], vertical_alignment="bottom")
left.number_input("latent", min_value=0, step=1, key="latent_box", on_change=_box_changed)
if right.button("random latent", help="a latent that fired at least once in the analysed tokens"):
    table = ui.summary_table(store) if store is not None else None
    choice = random_live_latent(table) if table else None
    if choice is None:
        st.info("No latent to pick from: no feature store, or no latent fired in the analysed tokens.")
    else:
        st.session_state["latent"] = choice
        st.rerun()  # so the number box shows it too
ui.write_query_params(feature=latent)
st.page_link(
    ui.STEERING_PAGE, label="steer with this latent", icon=":material/tune:", query_params=ui.feature_query(latent)
)


def show_page(page: FeaturePage) -> None:
    n_tokens = meta.get("n_tokens")
    st.subheader(f"Latent {page.index} of {sae.label}")
    ui.show_labels(ui.label_book(sae, ui.page_peak_tokens(page)).labels(page.index))
    st.caption(f"{meta.get('model', sae.model)} · {meta.get('hook', sae.hook)} · {n_latents:,} latents")
    cells = st.columns(4)
    firing = f"{page.n_firing:,} of {n_tokens:,} tokens" if n_tokens else f"{page.n_firing:,} tokens"
    cells[0].metric("density", ui.percent(page.frequency, 3), help=f"fires on {firing}")
    cells[1].metric("max activation", f"{page.max_activation:.4g}")
    cells[2].metric("mean activation", f"{page.mean_activation:.4g}", help="over the tokens it fires on")
    cells[3].metric("tokens firing", f"{page.n_firing:,}")
    if page.n_firing == 0:
        st.info("This latent never fired on the analysed tokens (dead): there are no contexts to show.")
    nearby_section(page.index)

    left, right = st.columns(2)
    width = page.histogram_bin_width
    histogram = go.Figure(
        go.Bar(
            x=[(b + 0.5) * width for b in range(len(page.histogram_counts))],
            y=page.histogram_counts,
            width=width,
            marker_color="#ff7f0e",
        )
    )
    histogram.update_layout(
        title="activation histogram (tokens where it fires)",
        xaxis_title="activation",
        yaxis_title="tokens",
        height=320,
        **ui.CHART_LAYOUT,
    )
    left.plotly_chart(histogram, key="histogram")

    effects = [*page.negative_logits, *reversed(page.positive_logits)]  # bottom to top: most negative … most positive
    logits = ui.signed_token_bars(
        [e.token for e in effects],
        [e.token_id for e in effects],
        [e.value for e in effects],
        "logit effects: tokens it pushes up (green) and down (red)",
        hovertemplate="%{y}: %{x:.3f}<extra></extra>",
    )
    right.plotly_chart(logits, key="logits")

    scale = page.max_activation
    st.subheader("Top-activating contexts")
    if page.top_contexts:
        st.html(windows_html(page.top_contexts, scale))
    for band in page.quantile_bands:
        if band.contexts:
            title = f"sampled from the {band.low:.0%}–{band.high:.0%} quantile band of its activations"
            with st.expander(title, expanded=band is page.quantile_bands[-1]):
                st.html(windows_html(band.contexts, scale))


def nearby_section(index: int) -> None:
    """Links to the latents of the run's other SAEs whose decoder directions are nearest to this one's."""
    nearby = ui.nearest_in_run(sel.run, sae, index)
    if not nearby:
        return
    st.markdown(f"**Nearest latents in the other SAEs of `{sel.run.name}`** (decoder cosine)")
    columns = st.columns(3)
    for n, near in enumerate(nearby):
        query = {"run": sel.run.name, "sae": near.sae, "feature": str(near.latent)}
        columns[n % 3].page_link(
            ui.FEATURE_PAGE, label=f"{near.sae} · latent {near.latent} · cos {near.cosine:.2f}", query_params=query
        )
    st.caption(
        "Cosine ≥ 0.7 in both decoder and encoder is what `saelab compare` counts as the same feature; "
        f"`saelab compare {sel.run.path}` measures it for every latent."
    )


page = None
if store is not None:
    try:
        page = store.feature(latent)
    except SaelabError as error:  # out of range (FeatureIndexError) or a damaged page
        st.error(str(error))
if page is not None:
    show_page(page)

st.subheader("Live: run any text through the model and the SAE")
text = ui.text_to_run("live", "live_text", "Type a phrase; this latent is highlighted on it.")
if text is not None:
    result = ui.run_text(sae, meta, text)
    if result is not None:
        try:
            values = result.feature(latent)
        except SaelabError as error:
            st.error(str(error))
        else:
            fired = [v for v in values if v]
            peak = max(fired, default=0.0)
            reference = page.max_activation if page is not None else 0.0
            st.caption(
                f"latent {latent} fires on {len(fired)} of {len(values) - result.first_position} tokens, "
                f"max {peak:.4g}" + (f" (its max in the analysed tokens: {reference:.4g})" if reference else "")
            )
            ui.show_tokens(result.tokens, values, reference or peak)
