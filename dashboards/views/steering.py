"""Steering playground: continue a prompt with and without some latents added, clamped or ablated, and
see which next tokens rose and fell. What it computes is `saelab.browse.playground` (over `saelab.steer`).

A first visit opens already run: on the feature page's latent (`?feature=`), else a live latent with a
readable label (`LabelBook.readable_latent`), added at the largest strength whose KL stays within the
budget (`saelab.steer.strength`), with that sweep of strengths against KL shown beside the text."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import streamlit as st
import ui

from saelab.browse.playground import HUGE, MAX_NEW_TOKENS, MODES, FeatureEdit, SteeringComparison
from saelab.errors import SaelabError
from saelab.steer.interventions import POSITIONS

DEFAULT_PROMPT = "The os module provides functions for"
MAX_ROWS = 8

sel = ui.selection()
st.title("Steering playground")
sae = ui.require_sae(sel)
store = ui.feature_store(sae) if sae.features_path.is_file() else None  # none: no scaling, steering still works
meta = store.meta if store is not None else {}
n_latents = store.n_latents if store is not None else sae.d_sae
st.caption(
    f"{sae.label} · {sae.hook or meta.get('hook', 'hook ?')} · {n_latents or '?'} latents. Greedy continuations, "
    "unsteered and steered, and the next-token probabilities at the prompt's last token."
)

# Defaults, set once per visit: the first row's latent is the one the feature page (or `?feature=`) had.
linked = st.session_state.get("latent")
if "steer_latent_0" not in st.session_state:
    try:
        st.session_state["steer_latent_0"] = max(int(linked if linked is not None else 0), 0)
    except (TypeError, ValueError):
        st.session_state["steer_latent_0"] = 0
st.session_state.setdefault("steer_prompt", DEFAULT_PROMPT)
if st.session_state.get("steer_sae") != str(sae.folder):  # another SAE: its own hook by default
    st.session_state["steer_sae"] = str(sae.folder)
    st.session_state["steer_hook"] = sae.hook or meta.get("hook") or ""
book = ui.label_book(sae, ui.peak_tokens(store)) if store is not None else None


def first_look() -> bool:
    """Once per visit and SAE: pick the latent (the linked one, else `readable_latent`), sweep its strength on
    the default prompt (`saelab.steer.strength`) and fill the form with the largest strength within the KL
    budget. True when the form was filled, so the page runs it at once."""
    import torch  # the model stack, on first use

    from saelab.browse.model_lock import MODEL_LOCK
    from saelab.browse.playground import MAX_PROMPT_TOKENS, prompt_ids
    from saelab.steer.strength import strength_sweep

    if st.session_state.get("steer_opened") == str(sae.folder) or store is None or book is None:
        return False
    st.session_state["steer_opened"] = str(sae.folder)
    try:
        latent = int(linked) if linked is not None else book.readable_latent()
        if latent is None or not 0 <= latent < n_latents or store.feature(latent).max_activation <= 0:
            return False
    except (TypeError, ValueError, SaelabError):
        return False  # the feature page says what is wrong with a bad ?feature=
    loaded = ui.model_and_sae(sae, meta)
    if loaded is None:
        return False
    model, sae_module, own_hook = loaded
    hook = st.session_state["steer_hook"] or own_hook
    try:
        ids, _ = prompt_ids(model, DEFAULT_PROMPT, MAX_PROMPT_TOKENS)
        tokens = torch.tensor([ids], device=next(model.parameters()).device)
        with st.spinner(f"a first look: sweeping the strength of latent {latent}…"), MODEL_LOCK:
            sweep = strength_sweep(model, sae_module, sae.folder, latent, DEFAULT_PROMPT, tokens, hook=hook)
    except SaelabError as error:
        st.warning(f"No first look at latent {latent}: {error}")
        return False
    coefficient = sweep.coefficient if sweep.coefficient is not None else sweep.rows[0]["coefficient"]
    st.session_state.update(
        steer_rows=1, steer_latent_0=latent, steer_mode_0="add", steer_value_0=coefficient, steer_scale=True
    )
    st.session_state.update(steer_positions="all", steer_max_new=16, steer_prompt=DEFAULT_PROMPT)
    st.session_state["steer_sweep"] = (sweep_key(DEFAULT_PROMPT, latent, hook, "all", 16), sweep)
    return True


def sweep_key(prompt: str, latent: int, hook: str, positions: str, max_new: int) -> tuple:
    return (str(sae.folder), prompt, latent, hook, positions, max_new)


opened = first_look()

n_rows = st.number_input("feature rows", min_value=1, max_value=MAX_ROWS, value=1, step=1, key="steer_rows")
with st.form("steer"):
    prompt = st.text_area("prompt", key="steer_prompt", height=100)
    edits = []
    for i in range(int(n_rows)):
        left, middle, right = st.columns([2, 1, 2])
        latent = left.number_input(f"latent {i + 1}", min_value=0, step=1, key=f"steer_latent_{i}")
        mode = middle.selectbox(f"mode {i + 1}", MODES, key=f"steer_mode_{i}")
        value = right.number_input(
            f"coefficient / value {i + 1}",
            value=4.0,
            step=1.0,
            key=f"steer_value_{i}",
            help="add: the coefficient of the latent's decoder direction; clamp: the latent's value; ablate: unused",
        )
        edits.append(FeatureEdit(int(latent), mode, float(value)))
    scale = st.checkbox(
        "scale add by the latent's max activation (from the feature store)",
        value=store is not None,
        disabled=store is None,
        key="steer_scale",
        help="then 4 means four times the latent's strongest activation on the analysed tokens",
    )
    left, middle, right = st.columns(3)
    hook = left.text_input("hook", key="steer_hook", help="where add edits; clamp and ablate need the SAE's hook")
    positions = middle.selectbox("positions", POSITIONS, key="steer_positions", help="position 0 (BOS) never")
    max_new = right.number_input(
        "max new tokens", min_value=1, max_value=MAX_NEW_TOKENS, value=16, step=1, key="steer_max_new"
    )
    submitted = st.form_submit_button("Run", type="primary")

inputs = (
    str(sae.folder),
    prompt,
    tuple(edits),
    bool(scale and store is not None),
    hook.strip(),
    positions,
    int(max_new),
)


def steered_edits() -> list[FeatureEdit] | None:
    """`edits` with each add's coefficient × its latent's max activation when asked; None after a message."""
    if not inputs[3]:
        return edits
    from saelab.steer.experiment import feature_scales

    added = sorted({e.latent for e in edits if e.mode == "add"})
    try:
        scales = feature_scales(sae.folder, added, "max_activation", loaded[1]) if added else {}
    except SaelabError as error:
        st.error(f"cannot scale by max activation: {error} (or untick the scaling)")
        return None
    return [replace(e, value=e.value * scales[e.latent]) if e.mode == "add" else e for e in edits]


def run() -> tuple[SteeringComparison, list[FeatureEdit]] | None:
    from saelab.browse.playground import check_edits, compare_steering

    if not prompt.strip():
        st.info("Type a prompt first: the model continues it with and without the steering.")
        return None
    if loaded is None:
        return None
    model, sae_module, own_hook = loaded
    try:
        check_edits(sae_module, edits, hook.strip() or own_hook, own_hook)
    except SaelabError as error:
        st.error(str(error))
        return None
    strengths = steered_edits()
    if strengths is None:
        return None
    try:
        with st.spinner("steering…"):  # holds the model lock: live text in other tabs waits
            result = compare_steering(
                model, sae_module, prompt, strengths, hook.strip() or own_hook, positions, int(max_new)
            )
    except SaelabError as error:
        st.error(str(error))
        return None
    return result, strengths


loaded = None
if submitted or opened:
    loaded = ui.model_and_sae(sae, meta)
    outcome = run()
    st.session_state["steer_result"] = (inputs, outcome) if outcome is not None else None
else:
    last = st.session_state.get("steer_result")
    outcome = last[1] if last is not None and last[0] == inputs else None


def show(result: SteeringComparison, strengths: list[FeatureEdit]) -> None:
    for edit in strengths:
        if edit.mode != "ablate" and abs(edit.value) > HUGE:
            st.warning(
                f"latent {edit.latent}: {edit.mode} at {edit.value:.4g} is far beyond any activation the SAE sees "
                f"(its latents rarely pass ~100): the output below is likely degenerate. Shown anyway."
            )
    if result.non_finite:
        st.warning("The steered logits hold NaN or ±inf at the last prompt token; those probabilities count as 0.")
    if result.truncated:
        st.warning(
            f"The prompt was cut to its first {len(result.prompt_ids)} tokens (BOS included): the model's context "
            f"and the page's limit, with {int(max_new)} new tokens after it. Both continuations start there."
        )
    applied = ", ".join(
        f"{e.mode} {e.latent}" + ("" if e.mode == "ablate" else f" at {e.value:.4g}") for e in strengths
    )
    st.caption(f"{len(result.prompt_ids)} prompt tokens · {applied} · hook {hook.strip() or sae.hook} · {positions}")
    left, right = st.columns(2)
    left.markdown("**baseline**")
    left.code(result.baseline_text, language=None, wrap_lines=True)
    right.markdown("**steered**")
    right.code(result.steered_text, language=None, wrap_lines=True)
    show_sweep(strengths)

    st.subheader("Next token at the prompt's last token: what rose and fell")
    if positions == "generated":
        st.info("positions = generated: nothing is edited up to the prompt's last token, so nothing changes there.")
    kl = "—" if result.non_finite else f"{result.kl:.4g} nats"
    st.caption(f"D_KL(steered ‖ baseline) = {kl}")
    rows = [("rose", c) for c in result.risen] + [("fell", c) for c in result.fallen]
    if not rows:
        st.info("No next-token probability changed.")
        return
    table = pd.DataFrame(
        {
            "": [direction for direction, _ in rows],
            "token": [ui.token_label(c.token) for _, c in rows],
            "id": [c.token_id for _, c in rows],
            "p before": [c.before for _, c in rows],
            "p after": [c.after for _, c in rows],
            "change": [c.change for _, c in rows],
        }
    )
    left, right = st.columns([3, 2])
    left.dataframe(
        table,
        hide_index=True,
        height=35 * (len(rows) + 1) + 3,  # every row, no inner scrolling
        column_config={
            name: st.column_config.NumberColumn(format="%.4f") for name in ("p before", "p after", "change")
        },
        key="steer_table",
    )
    ordered = [c for _, c in reversed(rows)]  # bottom to top: the most fallen … the most risen
    figure = ui.signed_token_bars(
        [c.token for c in ordered],
        [c.token_id for c in ordered],
        [c.change for c in ordered],
        "Δ probability (steered − baseline)",
        customdata=[[c.before, c.after] for c in ordered],
        hovertemplate="%{y}: %{customdata[0]:.4f} → %{customdata[1]:.4f}<extra></extra>",
    )
    right.plotly_chart(figure, key="steer_changes")


def show_sweep(strengths: list[FeatureEdit]) -> None:
    """The latent's strength sweep beside the text, when the page has one for exactly this input."""
    if len(strengths) != 1 or strengths[0].mode != "add" or not inputs[3]:
        return
    kept = st.session_state.get("steer_sweep")
    key = sweep_key(prompt, strengths[0].latent, hook.strip() or sae.hook or "", positions, int(max_new))
    if kept is None or kept[0] != key:
        return
    sweep = kept[1]  # a saelab.steer.strength.StrengthSweep
    label = book.shown(sweep.latent) if book is not None else None
    st.subheader(f"How hard to steer latent {sweep.latent}")
    if label is not None:
        st.caption(f"label ({label.explainer}): {ui.markdown_text(label.text)} · {label.verdict()}")
    chosen = sweep.coefficient
    said = (
        f"{chosen:g} × its max activation ({sweep.scale:.3g}), the largest swept strength whose"
        if chosen is not None
        else f"even the smallest swept strength breaks the budget; shown at {sweep.rows[0]['coefficient']:g} ×. The"
    )
    st.caption(
        f"add at {said} D_KL(steered ‖ unsteered) of the next token at the prompt's end stays within "
        f"{sweep.budget:g} nat (`saelab.steer.strength`, the sweep `saelab steer` runs). Past it the text breaks."
    )
    left, right = st.columns([2, 3])
    left.plotly_chart(ui.strength_kl_figure(sweep), key="steer_sweep_chart")
    right.dataframe(
        pd.DataFrame(
            {
                "× max": [row["coefficient"] for row in sweep.rows],
                "KL (nats)": [row["kl"] for row in sweep.rows],
                "steered continuation": [row["generation"] for row in sweep.rows],
            }
        ),
        hide_index=True,
        column_config={"KL (nats)": st.column_config.NumberColumn(format="%.3g")},
        key="steer_sweep_table",
    )


if outcome is not None:
    show(*outcome)
elif not submitted:
    st.caption("Pick latents and press Run.")
