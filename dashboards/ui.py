"""What every page of the dashboard shares: the run and SAE picked in the sidebar, cached loaders
(runs, feature stores, the model, SAEs) that turn a broken file into a message, and small renderers.

The selection lives in `st.session_state` (`run`, `sae`, `latent`) and is mirrored to the URL's
query parameters (`?run=…&sae=…&feature=…`), so a feature page can be linked to.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from saelab.analysis.explanations import Explanation, read_explanations
from saelab.analysis.feature_store import FeaturePage, FeatureStore
from saelab.analysis.token_summary import EXPLAINER as TOKEN_SUMMARY
from saelab.browse.feature_filter import SummaryRow
from saelab.browse.highlight import tokens_html
from saelab.browse.labels import SUMMARY_CONTEXTS, Label, LabelBook, PeakTokens
from saelab.browse.model_lock import MODEL_LOCK
from saelab.browse.runs import RunInfo, SAEInfo, find_runs, runs_root
from saelab.errors import SaelabError
from saelab.run_layout import EXPLANATIONS_FILE, TOKEN_SUMMARIES_FILE
from saelab.sae.saelens_format import WEIGHTS_FILE

FEATURE_PAGE = "views/feature.py"
STEERING_PAGE = "views/steering.py"
CIRCUIT_PAGE = "views/circuit.py"
# Every chart: tight margins, the plotly toolbar upright at the right so it never covers the title.
CHART_LAYOUT = {"margin": {"l": 10, "r": 40, "t": 40, "b": 10}, "modebar": {"orientation": "v"}}
MAKE_A_RUN = (
    "Make one with `make demo` (harvest → train → eval → analyze on the offline default, SmolLM2-135M) or "
    "`saelab train --config configs/train-smollm2.yaml`, then `saelab eval` and `saelab analyze` for its "
    "numbers and feature pages; or point the dashboard at another folder: `saelab dashboard --runs DIR`."
)


@dataclass
class Selection:
    root: Path
    runs: list[RunInfo] = field(default_factory=list)
    run: RunInfo | None = None
    sae: SAEInfo | None = None


# ---- the selection: sidebar, session state, URL ------------------------------------------------


def sidebar() -> Selection:
    """Render the run and SAE pickers in the sidebar (on every page) and return the selection."""
    _apply_query_params()
    root = runs_root()
    runs = cached_runs(str(root))
    selection = Selection(root, runs)
    st.sidebar.caption(f"runs from `{root}` (`saelab dashboard --runs DIR` or `$SAELAB_RUNS` to change)")
    if not runs:
        st.session_state["selection"] = selection
        return selection
    names = [run.name for run in runs]
    if st.session_state.get("run") not in names:
        if st.session_state.get("run"):
            st.sidebar.warning(f"no run {st.session_state['run']!r} under `{root}`; showing {names[0]!r}")
        whole = [r.name for r in runs if r.finished and not r.problems and any(s.has_features for s in r.saes)]
        st.session_state["run"] = (whole or names)[0]
    name = st.sidebar.selectbox("run", names, key="run")
    selection.run = runs[names.index(name)]
    labels = [sae.label for sae in selection.run.saes]
    if labels:
        if st.session_state.get("sae") not in labels:
            st.session_state["sae"] = next((s.label for s in selection.run.saes if s.has_features), labels[0])
        label = st.sidebar.selectbox("SAE", labels, key="sae")
        selection.sae = selection.run.sae(label)
        sae = selection.sae
        st.sidebar.caption(f"{sae.architecture or '?'} · {sae.d_sae or '?'} latents · {sae.hook or 'hook ?'}")
    write_query_params(run=name, sae=st.session_state.get("sae"))
    st.session_state["selection"] = selection
    return selection


def selection() -> Selection:
    """The selection the sidebar made in this script run."""
    return st.session_state["selection"]


def write_query_params(**values: Any) -> None:
    """Mirror `values` to the URL (None removes a key) and remember it, so it is not applied back."""
    for key, value in values.items():
        if value is None:
            st.query_params.pop(key, None)
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)
    st.session_state["_query"] = st.query_params.to_dict()


def _apply_query_params() -> None:
    """Take `run`, `sae` and `feature` from the URL when it changed (opened from a link, or a page switch)."""
    current = st.query_params.to_dict()
    if current == st.session_state.get("_query"):
        return
    st.session_state["_query"] = current
    for key in ("run", "sae"):
        if key in current:
            st.session_state[key] = current[key]
    if "feature" in current:
        st.session_state["latent"] = current["feature"]  # checked by the feature page, which says what is wrong


def open_feature(latent: int) -> None:
    """Go to the feature page of `latent` of the selected SAE."""
    st.session_state["latent"] = latent
    st.switch_page(FEATURE_PAGE, query_params=feature_query(latent))


def feature_query(latent: int) -> dict[str, str]:
    sel = selection()
    return {"run": sel.run.name if sel.run else "", "sae": sel.sae.label if sel.sae else "", "feature": str(latent)}


def require_sae(sel: Selection) -> SAEInfo:
    """The selected SAE, or a message saying why there is none and a stop of the page."""
    if not sel.runs:
        st.info(f"No training runs under `{sel.root}` yet. {MAKE_A_RUN}")
        st.stop()
    if sel.sae is None:
        st.info(f"The run `{sel.run.name}` has no SAE yet ({sel.run.status}).")
        st.stop()
    return sel.sae


# ---- cached loaders -------------------------------------------------------------------------------


@st.cache_data(ttl=5, show_spinner=False)
def cached_runs(root: str) -> list[RunInfo]:
    """The runs under `root`, read again at most every 5 s (a run being trained grows)."""
    return find_runs(root)


def _stamp(path: Path) -> tuple[int, int]:
    """A file's identity for caching: a rerun of `saelab analyze` replaces the file, changing it."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@st.cache_resource(show_spinner=False, max_entries=8)
def _open_feature_store(path: str, stamp: tuple[int, int]) -> FeatureStore:
    return FeatureStore(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def _summary_table(path: str, stamp: tuple[int, int]) -> list[SummaryRow]:
    return _open_feature_store(path, stamp).summary_table()


def feature_store(sae: SAEInfo) -> FeatureStore | None:
    """The SAE's feature store, or None after a message saying why not (the page goes on without it)."""
    path = sae.features_path
    if not path.is_file():
        st.warning(
            f"No feature store for `{sae.label}` yet (`{path}`): make it with "
            f"`saelab analyze run={sae.run} saes=[{sae.label}]`. Live text below still works."
        )
        return None
    try:
        return _open_feature_store(str(path), _stamp(path))
    except (SaelabError, OSError) as error:
        st.error(f"The feature store of `{sae.label}` cannot be read: {error}")
        return None


def summary_table(store: FeatureStore) -> list[SummaryRow] | None:
    try:
        return _summary_table(str(store.path), _stamp(store.path))
    except (SaelabError, OSError) as error:
        st.error(f"The feature store `{store.path}` cannot be read: {error}")
        return None


@st.cache_data(show_spinner=False, max_entries=16)
def _explanations(path: str, stamp: tuple[int, int]) -> dict[int, Explanation]:
    return read_explanations(path)


def explanations(sae: SAEInfo, file: str = EXPLANATIONS_FILE) -> dict[int, Explanation]:
    """The SAE's latent explanations (`saelab explain`), read again whenever the file grows; {} when none.
    `file`: the LLM's (`explanations.jsonl`) or the token summaries' (`token_summaries.jsonl`)."""
    path = sae.folder / file
    return _explanations(str(path), _stamp(path)) if path.is_file() else {}


@st.cache_resource(show_spinner=False, max_entries=8)
def _peak_tokens(path: str, stamp: tuple[int, int]) -> PeakTokens:
    return _open_feature_store(path, stamp).peak_tokens(SUMMARY_CONTEXTS)


def peak_tokens(store: FeatureStore) -> PeakTokens | None:
    """Every latent's peak and promoted tokens (for token summaries), read once per file; None after a message."""
    try:
        return _peak_tokens(str(store.path), _stamp(store.path))
    except (SaelabError, OSError) as error:
        st.error(f"The feature store `{store.path}` cannot be read: {error}")
        return None


def page_peak_tokens(page: FeaturePage) -> PeakTokens:
    """One page's peak and promoted tokens, as `peak_tokens` gives every latent's."""
    fired = [w.tokens[w.highlight] for w in page.top_contexts[:SUMMARY_CONTEXTS]]
    return {page.index: (fired, [effect.token for effect in page.positive_logits])}


def label_book(sae: SAEInfo, tokens: PeakTokens | None = None) -> LabelBook:
    """The latents' labels (`saelab.browse.labels`): the explanation files' and token summaries from `tokens`."""
    llm = explanations(sae)
    name = next((entry.explainer for entry in llm.values() if entry.explainer), "explainer")
    return LabelBook({name: llm, TOKEN_SUMMARY: explanations(sae, TOKEN_SUMMARIES_FILE)}, tokens)


def show_labels(labels: list[Label]) -> None:
    """A latent's labels: the headline (a label that beats shuffled) in full, the rest greyed out (captions)."""
    if not labels:
        return
    headline = labels[0] if labels[0].trusted else None
    if headline is not None:
        st.markdown(f"**Label** ({headline.explainer}): {markdown_text(headline.text)}")
        st.caption(f"{headline.scores()}")
    else:
        st.caption(
            "No label of this latent beats the shuffled labels (a one-sided binomial test of its detection "
            "calls, α 0.05), so none is its headline; shown greyed out:"
        )
    for label in labels[1:] if headline is not None else labels:
        st.caption(f"{label.explainer}: {markdown_text(label.text)} · {label.scores()}")


def markdown_text(text: str) -> str:
    """`text` shown literally in Streamlit markdown: its markup characters (and `$`, LaTeX there) escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~<>$:])", r"\\\1", text)


@st.cache_resource(show_spinner=False, max_entries=1)
def _model(spec: str) -> Any:
    from saelab.models import load_model

    return load_model(spec)


def model_lock() -> threading.Lock:
    """One model serves every browser tab, each in its own thread; a pass adds hooks to the model for
    its duration, so passes take turns (`saelab.browse.model_lock`: the steering playground holds it too)."""
    return MODEL_LOCK


def cached_model(spec: str) -> Any:
    """The model `spec`, loaded once per dashboard process (the pages share it; passes hold `model_lock`)."""
    return _model(spec)


@st.cache_resource(show_spinner=False, max_entries=4)
def _circuit_dictionaries(run: str, labels: tuple[str, ...], stamp: tuple) -> Any:
    from saelab.circuits.sources import run_dictionaries

    return run_dictionaries(run, labels=list(labels))


def circuit_dictionaries(run: RunInfo, labels: list[str]) -> Any | None:
    """The run's SAEs `labels` as a circuit's dictionaries (`saelab.circuits.sources.Dictionaries`), loaded once
    until their weights change; None after a message saying why they cannot be used."""
    try:
        stamp = tuple(_stamp(sae.folder / WEIGHTS_FILE) for sae in run.saes if sae.label in labels)
        return _circuit_dictionaries(str(run.path), tuple(labels), stamp)
    except (SaelabError, OSError) as error:
        st.error(f"cannot use these SAEs as a circuit's dictionaries: {error}")
        return None


@st.cache_resource(show_spinner=False, max_entries=32)
def _unit_decoder(folder: str, stamp: tuple[int, int]) -> Any:
    from saelab.browse.nearest import unit_decoder

    return unit_decoder(folder)


def nearest_in_run(run: RunInfo, sae: SAEInfo, latent: int, count: int = 3) -> list[Any]:
    """The latents of the run's other SAEs (same hook) nearest to `latent` of `sae` by decoder cosine
    (`saelab.browse.nearest.NearbyLatent`s); [] after a message when the weights cannot be read."""
    from saelab.browse.nearest import nearest_latents

    try:
        decoders = {
            s.label: _unit_decoder(str(s.folder), _stamp(s.folder / WEIGHTS_FILE)) for s in run.saes if s.has_weights
        }
    except (SaelabError, OSError) as error:
        st.warning(f"cannot read the run's SAE weights to find nearby latents: {error}")
        return []
    own = decoders.pop(sae.label, None)
    if own is None or not 0 <= latent < len(own.rows):
        return []
    return nearest_latents(own, latent, decoders, count)


@st.cache_resource(show_spinner=False, max_entries=4)
def _sae(folder: str, stamp: tuple[int, int]) -> Any:
    from saelab.models import resolve_device
    from saelab.sae import load_sae

    return load_sae(folder, resolve_device("auto"))


def model_and_sae(sae: SAEInfo, meta: dict[str, Any]) -> tuple[Any, Any, str] | None:
    """(model, SAE, hook) for live text, loaded once per process; None after a message saying what is missing."""
    spec, hook = sae.model or meta.get("model"), sae.hook or meta.get("hook")
    if not sae.has_weights:
        st.warning(f"`{sae.folder}` holds no SAE weights, so no text can be run through it.")
        return None
    if not spec or not hook:
        st.warning(f"`{sae.label}` does not say which model and hook it reads, so no text can be run through it.")
        return None
    try:
        with st.spinner(f"loading {spec} and {sae.label} (once per dashboard process)…"):
            model = _model(spec)
            return model, _sae(str(sae.folder), _stamp(sae.folder / WEIGHTS_FILE)), hook
    except (SaelabError, OSError) as error:
        st.error(f"cannot load the model or the SAE: {error}")
        return None


def run_text(sae: SAEInfo, meta: dict[str, Any], text: str) -> Any:
    """`text` through the model and the SAE (a `saelab.browse.live.TextActivations`), or None after a
    message (empty text, nothing to load). The model stack is imported here, on first use."""
    from saelab.browse.live import encode_text

    if not text.strip():
        st.info("Type some text first: it is run through the model and the SAE, and each token's latents are shown.")
        return None
    loaded = model_and_sae(sae, meta)
    if loaded is None:
        return None
    model, sae_module, hook = loaded
    try:
        with model_lock():
            result = encode_text(model, sae_module, hook, text, first_position=int(meta.get("first_position", 1)))
    except SaelabError as error:
        st.error(str(error))
        return None
    if result.truncated:
        st.caption(f"the text was cut to its first {len(result.tokens)} tokens")
    return result


# ---- rendering ------------------------------------------------------------------------------------


def show_tokens(tokens: list[str], activations: list[float | None], scale: float, focus: int | None = None) -> None:
    st.html(tokens_html(tokens, activations, scale, focus))


def token_label(token: str) -> str:
    """A token as a chart or table label: quoted, so leading spaces and newlines show."""
    return repr(token)


def text_to_run(form: str, text_key: str, placeholder: str) -> str | None:
    """A text box and a run button in form `form`; the text to run when the button was pressed, and
    again on later reruns (other widgets changing) while the text stays as it was run."""
    shown_key = f"{form}_shown"
    with st.form(form):
        text = st.text_area("text", key=text_key, placeholder=placeholder)
        submitted = st.form_submit_button("run")
    if submitted or st.session_state.get(shown_key) == text and text:
        st.session_state[shown_key] = text
        return text
    return None


def signed_token_bars(
    tokens: list[str], token_ids: list[int], values: list[float], title: str, **bar: Any
) -> go.Figure:
    """Horizontal bars of signed values per token, listed bottom to top; green up, red down.

    Two ids can decode to the same text, so a repeated label gets its id to keep the bars apart.
    `bar` goes to `go.Bar` (e.g. `hovertemplate`, `customdata`)."""
    labels, seen = [], set()
    for token, token_id in zip(tokens, token_ids, strict=True):
        label = token_label(token)
        labels.append(label if label not in seen else f"{label} #{token_id}")
        seen.add(label)
    colours = ["#d62728" if value < 0 else "#2ca02c" for value in values]
    figure = go.Figure(go.Bar(x=values, y=labels, orientation="h", marker_color=colours, **bar))
    figure.update_layout(title=title, height=max(320, 18 * len(values) + 80), **CHART_LAYOUT)
    return figure


def percent(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}%}"


def strength_kl_figure(sweep: Any) -> go.Figure:
    """A `saelab.steer.strength.StrengthSweep` drawn: KL against strength (× the latent's max activation, log
    scales), the budget as a dashed line and the strength chosen as a ring."""
    rows = [row for row in sweep.rows if row["coefficient"] > 0]
    x, kl = [row["coefficient"] for row in rows], [max(row["kl"], 1e-6) for row in rows]
    figure = go.Figure(
        go.Scatter(
            x=x,
            y=kl,
            mode="lines+markers",
            name="KL",
            customdata=[[row["strength"]] for row in rows],
            hovertemplate="%{x:g} × max = %{customdata[0]:.3g}: KL %{y:.3g} nats<extra></extra>",
        )
    )
    figure.add_hline(y=sweep.budget, line_dash="dash", line_color="#d62728", annotation_text=f"budget {sweep.budget:g}")
    if sweep.chosen is not None:
        figure.add_trace(
            go.Scatter(
                x=[sweep.chosen["coefficient"]],
                y=[max(sweep.chosen["kl"], 1e-6)],
                mode="markers",
                name="chosen",
                marker={"size": 16, "symbol": "circle-open", "line": {"width": 3}},
            )
        )
    figure.update_layout(
        title="D_KL(steered ‖ unsteered) against strength",
        xaxis={"type": "log", "title": "strength (× max activation)"},
        yaxis={"type": "log", "title": "KL, nats"},
        height=360,
        showlegend=False,
        **CHART_LAYOUT,
    )
    return figure
