"""The dashboard: its library (runs, filters, highlighting, live text) against the files and brute force,
every page driven through Streamlit's AppTest on a real tiny SmolLM2 run, and one load in a real browser."""

from __future__ import annotations

import html
import json
import random
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from dashboard_runs import (
    APP,
    BATCHTOPK,
    HOOK,
    TOPK,
    assert_clean,
    fill_steering_form,
    make_dashboard_runs,
    open_page,
    texts,
)
from streamlit.testing.v1 import AppTest

import saelab.models
from saelab.analysis.feature_store import FeatureStore
from saelab.browse.feature_filter import FeatureFilter, random_live_latent
from saelab.browse.frontier import sae_frontier
from saelab.browse.highlight import token_text, tokens_html
from saelab.browse.live import encode_text, encode_tokens
from saelab.browse.runs import SAEInfo, find_runs, group_frequency_curves, read_metrics, training_curves
from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.sae import load_sae

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # tools/screenshots.py: the headless-Chromium driver
SPAN = re.compile(r'<span title="([^"]*)" style="([^"]*)">([^<]*)</span>')


@pytest.fixture(scope="module")
def runs_root(smollm2, tmp_path_factory) -> Path:
    return make_dashboard_runs(tmp_path_factory.mktemp("dashboard") / "runs", smollm2)


@pytest.fixture(scope="module")
def latents(runs_root) -> torch.Tensor:
    """Brute force: topk-128-k8 on every row of the store, `[rows, 128]`."""
    store = ActivationStore(runs_root / "tiny" / "activations")
    with torch.no_grad():
        return load_sae(runs_root / "tiny" / "train" / "saes" / TOPK).encode(store.rows(torch.arange(store.n_rows)))


@pytest.fixture(scope="module")
def latent(runs_root) -> int:
    """A latent worth a page: the most frequent one that fires on under half the tokens."""
    with FeatureStore(runs_root / "tiny" / "train" / "saes" / TOPK / "features.sqlite") as store:
        return max((row for row in store.summary_table() if 0 < row[1] < 0.5), key=lambda row: row[1])[0]


@pytest.fixture
def app(runs_root, smollm2, monkeypatch):
    """`app(page, **query)`: the dashboard at `views/<page>.py` with URL query `query`, after one run."""
    monkeypatch.setenv("SAELAB_RUNS", str(runs_root))
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, device="auto": smollm2)  # the session's model

    return open_page


def charts(at: AppTest) -> list[dict]:
    """The page's plotly figures but the run page's frontier (see `frontier_chart`)."""
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart") if not chart.proto.id.endswith("frontier")]


def frontier_chart(at: AppTest) -> dict | None:
    """The run page's frontier figure (its chart key is `frontier`), None when the page has none."""
    found = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart") if chart.proto.id.endswith("frontier")]
    assert len(found) <= 1
    return found[0] if found else None


def spans(fragment: str) -> list[tuple[str, str, str]]:
    return SPAN.findall(fragment)


# ---- the library --------------------------------------------------------------------------------


def test_runs_are_found_with_numbers_from_the_best_file(runs_root, tmp_path):
    runs = {run.name: run for run in find_runs(runs_root)}
    assert list(runs) == ["broken/train", "tiny/train", "tiny/training"]  # not the activation store

    done = runs["tiny/train"]
    assert done.finished and not done.problems and [s.label for s in done.saes] == [TOPK, BATCHTOPK]
    evaluation = json.loads((done.path / "saes" / TOPK / "eval.json").read_text())
    topk = done.sae(TOPK)
    assert (topk.fvu, topk.l0, topk.dead_fraction) == (evaluation["fvu"], evaluation["l0"], evaluation["dead_fraction"])
    assert topk.ce_loss_recovered == evaluation["ce_loss_recovered"] is not None
    assert topk.metrics_from == "eval (held-out text)" and topk.tokens == 4096
    assert (topk.model, topk.hook, topk.architecture, topk.d_sae) == ("smollm2-135m", HOOK, "topk", 128)
    assert topk.has_features and topk.has_weights and topk.sparsity == "k 8"

    training = runs["tiny/training"]
    assert not training.finished and not training.problems  # the torn last line is skipped, not reported
    lines = [json.loads(line) for line in (done.path / "metrics.jsonl").read_text().splitlines()[:6]]
    last = [r for r in lines if r["sae"] == TOPK][-1]
    early = training.sae(TOPK)
    assert early.tokens == last["tokens"] == 3 * 512 and early.fvu == last["fvu"] and early.l0 == last["l0"]
    assert early.metrics_from == "training (last logged step)" and not early.has_weights
    assert early.hook == HOOK and early.model == "smollm2-135m"  # from the activation store's manifest

    broken = runs["broken/train"]
    assert len(broken.problems) == 1 and f"{TOPK}/eval.json" in broken.problems[0]
    summary = json.loads((broken.path / "summary.json").read_text())[TOPK]
    assert broken.sae(TOPK).fvu == summary["fvu"] and broken.sae(TOPK).metrics_from == "training (last batches)"
    assert not broken.sae(BATCHTOPK).has_features

    assert find_runs(tmp_path / "absent") == [] and find_runs(tmp_path) == []


def test_training_curves_are_the_logged_steps(runs_root):
    records = read_metrics(runs_root / "tiny" / "train")
    assert any("eval/fvu" in r for r in records)  # eval lines are in the log but not on the curves
    curves = training_curves(records, BATCHTOPK)
    assert curves["tokens"] == [512 * step for step in range(1, 9)]
    logged = [r for r in records if r["sae"] == BATCHTOPK and "tokens" in r]
    for name in ("loss", "fvu", "l0", "dead_fraction"):
        assert curves[name] == [r[name] for r in logged]
    assert training_curves(records, "absent")["tokens"] == []


def test_gba_group_curves_follow_each_group_from_its_first_measurement():
    records = [
        {"step": 2, "tokens": 200, "sae": "gba", "group0/freq": 0.2, "group0/target": 0.1},
        {"step": 1, "tokens": 100, "sae": "gba", "fvu": 0.5},
        {
            "step": 3,
            "tokens": 300,
            "sae": "gba",
            "group0/freq": 0.12,
            "group0/target": 0.1,
            "group1/freq": 0.0,
            "group1/target": 0.01,
        },
        {"step": 3, "sae": "gba", "eval/fvu": 0.4},
        {"step": 3, "tokens": 300, "sae": "topk", "fvu": 0.3},
    ]
    curves = group_frequency_curves(records, "gba")
    assert curves == {
        0: {"tokens": [200, 300], "freq": [0.2, 0.12], "target": [0.1, 0.1]},
        1: {"tokens": [300], "freq": [0.0], "target": [0.01]},
    }
    assert group_frequency_curves(records, "topk") == {}


def test_frontier_groups_evaluated_saes_by_architecture_sorted_by_l0_and_names_the_rest():
    def sae(label: str, architecture: str | None, evaluation: dict | None = None) -> SAEInfo:
        return SAEInfo(Path("run"), label, architecture=architecture, evaluation=evaluation or {})

    rows = [
        sae("topk-k32", "topk", {"architecture": "topk", "l0": 32.0, "fvu": 0.2, "ce_loss_recovered": 0.95}),
        sae("gba-l016", "gba"),  # trained, no eval.json
        sae("topk-k8", "topk", {"architecture": "topk", "l0": 8.5, "fvu": 0.4, "ce_loss_recovered": 0.8}),
        sae("tc-k16", None, {"architecture": "skip_transcoder", "l0": 16, "fvu": 0.3, "ce_loss_recovered": None}),
        sae("batchtopk-k16", "batchtopk", {"l0": 17.25, "fvu": 0.35, "ce_loss_recovered": 0.9}),  # no architecture
        sae("broken", "topk", {"architecture": "topk", "fvu": 0.5}),  # an eval.json without L0 cannot be placed
    ]
    frontier = sae_frontier(rows)
    assert frontier.not_evaluated == ["gba-l016", "broken"]
    assert list(frontier.by_architecture) == ["topk", "skip_transcoder", "batchtopk"]
    topk = frontier.by_architecture["topk"]
    assert [(p.label, p.l0, p.fvu, p.ce_loss_recovered) for p in topk] == [
        ("topk-k8", 8.5, 0.4, 0.8),
        ("topk-k32", 32.0, 0.2, 0.95),
    ]
    (transcoder,) = frontier.by_architecture["skip_transcoder"]
    assert transcoder.is_transcoder and transcoder.ce_loss_recovered is None and transcoder.l0 == 16.0
    assert not any(p.is_transcoder for p in topk) and frontier.has_transcoders
    assert frontier.by_architecture["batchtopk"][0].architecture == "batchtopk"
    assert not sae_frontier(rows[:3]).has_transcoders and sae_frontier([rows[1]]).by_architecture == {}


def test_feature_filter_equals_brute_force():
    rng = random.Random(0)
    table = [(i, 0.0 if i % 7 == 0 else rng.random() / 10, rng.uniform(0, 9), rng.uniform(0, 3)) for i in range(300)]
    table[5] = (5, table[9][1], table[9][2], 1.0)  # a tie in both columns
    for low, high, floor, key, order in [
        (0.0, 1.0, 0.0, "frequency", "descending"),
        (0.01, 0.05, 2.0, "max activation", "ascending"),
        (1e-9, 0.1, 8.5, "index", "descending"),
        (0.02, 0.03, 0.0, "mean activation", "ascending"),
    ]:
        got = FeatureFilter(low, high, floor, key, order).apply(table)
        column = {"index": 0, "frequency": 1, "max activation": 2, "mean activation": 3}[key]
        expected = [r for r in table if low <= r[1] <= high and r[2] >= floor]
        expected.sort(key=lambda r: r[0])
        expected.sort(key=lambda r: r[column], reverse=order == "descending")  # stable: ties stay by index
        assert got == expected
    ordered = FeatureFilter(sort_by="frequency").apply(table)
    assert ordered.index(table[5]) + 1 == ordered.index(table[9])  # the tie: by index, in either order
    ordered = FeatureFilter(sort_by="frequency", order="ascending").apply(table)
    assert ordered.index(table[5]) + 1 == ordered.index(table[9])
    with pytest.raises(SaelabError, match="sort_by must be one of"):
        FeatureFilter(sort_by="colour").apply(table)
    picks = {random_live_latent(table, seed) for seed in range(200)}
    assert picks and all(table[i][1] > 0 for i in picks) and len(picks) > 50
    assert random_live_latent([(0, 0.0, 0.0, 0.0)]) is None


def test_tokens_html_escapes_shades_and_titles():
    fragment = tokens_html(["<s>", " a\n", "x\t", ""], [None, 0.0, 2.0, 8.0], scale=4.0, focus=2)
    found = spans(fragment)
    assert [title for title, _, _ in found] == [
        "not encoded (BOS / attention sink)",
        "activation 0",
        "activation 2",
        "activation 8",
    ]
    assert [text for _, _, text in found] == ["&lt;s&gt;", " a↵", "x⇥", "∅"]
    assert "background" not in found[0][1] + found[1][1]
    assert "rgba(255,127,14,0.560)" in found[2][1] and "outline" in found[2][1]  # 0.12 + 0.88 · 2/4
    assert "rgba(255,127,14,1.000)" in found[3][1] and "outline" not in found[3][1]  # capped at 1
    assert token_text("&") == "&amp;"
    with pytest.raises(ValueError, match="2 tokens but 1 activations"):
        tokens_html(["a", "b"], [1.0], 1.0)


def test_live_text_equals_the_stored_activations(smollm2, runs_root, latents):
    store = ActivationStore(runs_root / "tiny" / "activations")
    sae = load_sae(runs_root / "tiny" / "train" / "saes" / TOPK)
    ids = store.context_tokens(3).tolist()
    live = encode_tokens(smollm2, sae, HOOK, ids)
    rows = torch.nonzero(store.context_of(torch.arange(store.n_rows))[0] == 3).squeeze(1)
    torch.testing.assert_close(live.latents[1:], latents[rows], rtol=1e-4, atol=1e-4)  # the same forward pass
    assert torch.all(live.latents[0] == 0) and live.feature(0)[0] is None
    f = int(latents[rows].sum(0).argmax())
    assert live.feature(f)[1:] == pytest.approx(latents[rows, f].tolist(), rel=1e-4, abs=1e-4)
    strongest = live.strongest(3)
    assert strongest[0].max_activation == pytest.approx(float(latents[rows].max()), rel=1e-4)
    assert strongest[0].token == live.tokens[strongest[0].position]

    text = encode_text(smollm2, sae, HOOK, "The capital of France is Paris.")
    assert text.token_ids[0] == smollm2.tokenizer.bos_token_id and text.tokens[1:3] == ["The", " capital"]
    assert not text.truncated and encode_text(smollm2, sae, HOOK, "word " * 50, max_tokens=10).truncated
    with pytest.raises(SaelabError, match="the text is empty"):
        encode_text(smollm2, sae, HOOK, "  \n")
    with pytest.raises(SaelabError, match=r"latent 128 is not in this SAE; it has latents \[0, 128\)"):
        text.feature(128)


# ---- the pages, through AppTest -------------------------------------------------------------------


def test_runs_page_tables_every_sae_and_overlays_the_ticked_curves(app, runs_root):
    at = app()
    assert [t.value for t in at.title] == ["Runs"]
    table = at.dataframe[0].value
    assert list(zip(table["run"], table["SAE"], strict=True)) == [
        ("broken/train", TOPK),
        ("broken/train", BATCHTOPK),
        ("tiny/train", TOPK),
        ("tiny/train", BATCHTOPK),
        ("tiny/training", TOPK),
        ("tiny/training", BATCHTOPK),
    ]
    row = table.iloc[2]
    evaluation = json.loads((runs_root / "tiny" / "train" / "saes" / TOPK / "eval.json").read_text())
    assert row["FVU"] == evaluation["fvu"]
    assert row["CE recovered %"] == pytest.approx(100 * evaluation["ce_loss_recovered"])
    assert (row["model"], row["hook"], row["variant"], row["width"], row["k / target"]) == (
        "smollm2-135m",
        HOOK,
        "topk",
        128,
        "k 8",
    )
    assert row["tokens trained"] == 4096 and row["dead %"] == pytest.approx(100 * evaluation["dead_fraction"])
    assert list(table["status"]) == ["finished"] * 4 + ["training"] * 2
    assert list(table["feature store"]) == ["yes", "no", "yes", "yes", "no", "no"]
    assert "broken/train" in texts(at.warning) and "eval.json" in texts(at.warning)
    assert "showing what it has written so far" in texts(at.caption)

    # by default the curves of the sidebar's run: tiny/train, the first whole one with feature pages
    figures = {f["layout"]["title"]["text"]: f for f in charts(at)}
    assert sorted(figures) == sorted(["loss", "FVU", "L0", "dead fraction"])
    records = read_metrics(runs_root / "tiny" / "train")
    fvu = figures["FVU"]["data"]
    assert [trace["name"] for trace in fvu] == [f"tiny/train / {TOPK}", f"tiny/train / {BATCHTOPK}"]
    assert fvu[0]["y"] == [r["fvu"] for r in records if r["sae"] == TOPK and "tokens" in r]

    at.multiselect[0].set_value([f"tiny/training / {TOPK}"]).run()
    assert_clean(at)
    assert [len(f["data"]) for f in charts(at)] == [1, 1, 1, 1]
    assert charts(at)[0]["data"][0]["x"] == [512, 1024, 1536]
    at.multiselect[0].set_value([]).run()
    assert "Tick one or more SAEs" in texts(at.info) and not charts(at)
    frontier = frontier_chart(at)  # the sidebar run's SAEs, both evaluated, stay on their frontier
    assert sorted(trace["customdata"][0][0] for trace in frontier["data"]) == sorted([TOPK, TOPK, BATCHTOPK, BATCHTOPK])


def test_feature_page_shows_the_latents_contexts_histogram_and_logit_effects(app, runs_root, smollm2, latents, latent):
    at = app("feature", run="tiny/train", sae=TOPK, feature=latent)
    assert f"Latent {latent} of {TOPK}" in texts(at.subheader)
    with FeatureStore(runs_root / "tiny" / "train" / "saes" / TOPK / "features.sqlite") as store:
        page = store.feature(latent)
    firing = latents[:, latent] > 0
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["density"] == f"{float(firing.double().mean()):.3%}"
    assert metrics["max activation"] == f"{float(latents[:, latent].max()):.4g}"
    assert metrics["tokens firing"] == f"{int(firing.sum()):,}"

    # the top context is the brute-force argmax, its token outlined with its activation as the hover title
    store_ = ActivationStore(runs_root / "tiny" / "activations")
    best = int(latents[:, latent].argmax())
    context, position = (int(t[0]) for t in store_.context_of(torch.tensor([best])))
    expected = smollm2.tokenizer.decode([int(store_.context_tokens(context)[position])])
    top = at.html[0].value
    first_row = top.split("</tr>")[0]
    outlined = [(title, text) for title, style, text in spans(first_row) if "outline" in style]
    assert outlined == [(f"activation {float(latents[best, latent]):.4g}", token_text(expected))]
    assert top.count("<tr>") == len(page.top_contexts) == 5
    # the quantile bands, each in an expander
    assert len(at.expander) == sum(1 for band in page.quantile_bands if band.contexts) == 4
    assert texts(at.expander[0].html).count("<tr>") == 3

    histogram, logits = charts(at)
    assert sum(histogram["data"][0]["y"]) == int(firing.sum())
    labels = logits["data"][0]["y"]
    assert labels[-1] == repr(page.positive_logits[0].token) and labels[0] == repr(page.negative_logits[0].token)
    assert logits["data"][0]["x"][-1] == pytest.approx(page.positive_logits[0].value)
    assert at.query_params["feature"] == str(latent)

    next(b for b in at.button if b.label == "random latent").click().run()
    assert_clean(at)
    chosen = int(at.query_params["feature"])
    assert at.number_input[0].value == chosen and f"Latent {chosen} of" in texts(at.subheader)
    assert latents[:, chosen].max() > 0


def test_feature_page_live_box_highlights_the_latent_on_typed_text(app, smollm2, runs_root, latent):
    at = app("feature", run="tiny/train", sae=TOPK, feature=latent)
    text = "The capital of France is Paris. def main():\n    return 0"
    at.text_area(key="live_text").set_value(text)
    at.button[-1].click().run()
    assert_clean(at)
    shown = spans(at.html[-1].value)
    # directly: the model to layer 15, the SAE on every position after the BOS
    ids = [smollm2.tokenizer.bos_token_id, *smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(torch.tensor([ids]), names_filter=[HOOK], return_cache_object=False)
        sae = load_sae(runs_root / "tiny" / "train" / "saes" / TOPK)
        direct = sae.encode(cache[HOOK][0, 1:])[:, latent].tolist()
    assert len(shown) == len(ids) and shown[0][0] == "not encoded (BOS / attention sink)"
    for (title, _, _), value in zip(shown[1:], direct, strict=True):
        assert float(title.removeprefix("activation ")) == pytest.approx(value, rel=1e-3, abs=1e-3)
    assert f"latent {latent} fires on {sum(v > 0 for v in direct)} of {len(direct)} tokens" in texts(at.caption)
    assert html.unescape("".join(t for _, _, t in shown[1:])).replace("↵", "\n") == text

    for other in (latent + 1, latent + 2):  # the text stays; each new latent is highlighted (every edit counts)
        at.number_input[0].set_value(other).run()
        assert_clean(at)
        assert f"latent {other} fires on" in texts(at.caption) and f"Latent {other} of" in texts(at.subheader)

    at.text_area(key="live_text").set_value("   ")
    at.button[-1].click().run()
    assert "Type some text first" in texts(at.info)


def test_feature_page_explains_a_bad_latent(app):
    at = app("feature", run="tiny/train", sae=TOPK, feature=100_000)
    assert "latent 100000 is not in" in texts(at.error) and "[0, 128)" in texts(at.error)
    at = app("feature", run="tiny/train", sae=TOPK, feature="twelve")
    assert "`twelve` is not a latent index; pick one in [0, 128)" in texts(at.error)
    assert "Latent 0 of" in texts(at.subheader)  # and latent 0 is shown instead


def test_feature_browser_finds_latents_by_index_token_text_and_filters(app, runs_root, latents, latent):
    at = app("features", run="tiny/train", sae=TOPK)
    assert [t.value for t in at.title] == ["Feature browser"]
    with FeatureStore(runs_root / "tiny" / "train" / "saes" / TOPK / "features.sqlite") as store:
        token = store.feature(latent).positive_logits[0].token
        pushing = store.search_by_logit_token(token)
        table = store.summary_table()

    at.text_input(key="token").set_value(token.strip()).run()
    links = [link.proto.label for link in at.get("page_link")]
    assert [int(label.split(":")[0].removeprefix("latent ")) for label in links] == pushing[:15]
    assert latent in pushing and repr(token) in links[pushing.index(latent)]
    at.radio(key="direction").set_value("pushed down").run()
    assert_clean(at)
    at.text_input(key="token").set_value("").run()

    # by text: the strongest latent on it, as computed directly
    text = "import os\nprint(os.path.join('a', 'b'))"
    at.text_area(key="search_text_value").set_value(text)
    at.button[-1].click().run()
    assert_clean(at)
    links = [link.proto.label for link in at.get("page_link")]
    first = int(links[0].split(":")[0].removeprefix("latent "))
    highlighted = spans(at.html[0].value)
    values = [float(t.removeprefix("activation ")) for t, _, _ in highlighted[1:]]
    assert max(values) == pytest.approx(float(links[0].split("max ")[1].split(" ")[0]), rel=1e-2)
    assert f"the strongest, latent {first}" in texts(at.caption)

    # all latents: filter by max activation, sort by it
    live = [r for r in table if r[1] > 0]
    floor = sorted(r[2] for r in live)[len(live) // 2]
    at.slider(key="min_max_activation").set_value(floor).run()
    at.selectbox(key="sort_by").set_value("max activation").run()
    assert_clean(at)
    shown = at.dataframe[-1].value
    kept = sorted((r for r in live if r[2] >= floor), key=lambda r: (-r[2], r[0]))
    assert list(shown["latent"]) == [r[0] for r in kept]
    assert f"{len(kept):,} of {len(table):,} latents match" in texts(at.caption)

    # open by index, and a random latent: both land on the feature page
    at.number_input(key="index").set_value(latent).run()
    at.button(key="open_index").click().run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Feature page"] and f"Latent {latent} of" in texts(at.subheader)
    at = app("features", run="tiny/train", sae=TOPK)
    next(b for b in at.button if b.label == "random latent").click().run()
    assert_clean(at)
    chosen = int(at.query_params["feature"])
    assert [t.value for t in at.title] == ["Feature page"] and dict((r[0], r[1]) for r in table)[chosen] > 0


def test_no_runs_yet_every_page_says_how_to_make_one(app, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_RUNS", str(tmp_path / "nothing-here"))
    for page in (None, "features", "feature", "steering"):
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        if page:
            at.switch_page(f"views/{page}.py").run()
        assert_clean(at)
        assert "No training runs under" in texts(at.info) and "make demo" in texts(at.info)
        assert "saelab train" in texts(at.info)


def test_broken_and_missing_feature_stores_are_messages_and_the_rest_works(app):
    at = app("feature", run="broken/train", sae=TOPK, feature=3)
    errors = texts(at.error)
    assert "The feature store of `topk-128-k8` cannot be read" in errors and "saelab analyze" in errors
    at.text_area(key="live_text").set_value("Paris")
    at.button[-1].click().run()
    assert_clean(at)
    assert "latent 3 fires on" in texts(at.caption)  # the SAE itself still runs

    at = app("features", run="broken/train", sae=TOPK)
    assert "cannot be read" in texts(at.error) and [t.value for t in at.title] == ["Feature browser"]

    at = app("feature", run="broken/train", sae=BATCHTOPK)
    assert "No feature store for `batchtopk-96-k8` yet" in texts(at.warning)
    assert f"saelab analyze run={Path(at.session_state['selection'].run.path)}" in texts(at.warning)


def test_a_run_still_training_shows_what_it_has(app):
    at = app("feature", run="tiny/training", sae=TOPK)
    assert "No feature store for `topk-128-k8` yet" in texts(at.warning)
    at.text_area(key="live_text").set_value("Paris")
    at.button[-1].click().run()
    assert_clean(at)
    assert "holds no SAE weights" in texts(at.warning)
    at = app("features", run="tiny/training", sae=TOPK)
    assert [t.value for t in at.title] == ["Feature browser"]


# ---- the steering playground ------------------------------------------------------------------------

STEER_PROMPT = "The os module provides functions for"


def steer_on_page(at: AppTest, prompt: str, rows: list[tuple[int, str, float]], **fields: object) -> AppTest:
    """Fill the playground's form (`fields`: scale, hook, positions, max_new) and press Run."""
    return fill_steering_form(at, prompt, rows, **{"hook": HOOK, "positions": "all", **fields})


def test_steering_page_equals_saelab_steer_and_raises_the_latents_top_token(
    app, runs_root, smollm2, latent, monkeypatch
):
    import saelab.browse.playground
    from saelab.browse.model_lock import MODEL_LOCK
    from saelab.steer import add_feature, generate, steer

    locked = []

    def generate_and_check_the_lock(*args, **kwargs):
        locked.append(MODEL_LOCK.locked())
        return generate(*args, **kwargs)

    monkeypatch.setattr(saelab.browse.playground, "generate", generate_and_check_the_lock)
    at = app("feature", run="tiny/train", sae=TOPK, feature=latent)
    (link,) = [link.proto for link in at.get("page_link") if link.proto.label == "steer with this latent"]
    assert link.page == "steering" and f"feature={latent}" in link.query_string
    at = app("steering", run="tiny/train", sae=TOPK, feature=latent)
    assert at.number_input(key="steer_latent_0").value == latent  # from the feature page's link (?feature=)
    folder = runs_root / "tiny" / "train" / "saes" / TOPK
    with FeatureStore(folder / "features.sqlite") as store:
        page = store.feature(latent)
    # × the latent's max activation: so large that the direction swamps the residual stream, and what
    # the 15 layers after the SAE's hook add barely matters (at 10× they decide; see test_steer.py)
    coefficient = 1000.0
    locked.clear()  # the first look (below) ran too
    steer_on_page(at, STEER_PROMPT, [(latent, "add", coefficient)], scale=True, max_new=3)
    assert locked == [True, True]  # baseline and steered generation, each holding the live text's lock

    # directly, with saelab.steer
    sae = load_sae(folder)
    tokenizer = smollm2.tokenizer
    tokens = torch.tensor([[tokenizer.bos_token_id, *tokenizer(STEER_PROMPT, add_special_tokens=False)["input_ids"]]])
    length = tokens.shape[1]
    with torch.inference_mode():
        before = torch.softmax(smollm2(tokens)[0, -1].float(), -1)
        baseline = generate(smollm2, tokens, 3)[0, length:].tolist()
        with steer(smollm2, [add_feature(sae, latent, coefficient * page.max_activation)], prompt_length=length):
            after = torch.softmax(smollm2(tokens)[0, -1].float(), -1)
            steered = generate(smollm2, tokens, 3)[0, length:].tolist()
    change = after - before
    top, bottom = int(change.argmax()), int(change.argmin())

    table = at.dataframe[0].value
    rose, fell = table[table[""] == "rose"], table[table[""] == "fell"]
    assert len(rose) == len(fell) == 10
    assert rose.iloc[0]["id"] == top and rose.iloc[0]["token"] == repr(tokenizer.decode([top]))
    assert rose.iloc[0]["p after"] == pytest.approx(float(after[top]), rel=1e-4, abs=1e-7)
    assert rose.iloc[0]["p before"] == pytest.approx(float(before[top]), rel=1e-4, abs=1e-7)
    assert fell.iloc[0]["id"] == bottom and fell.iloc[0]["change"] == pytest.approx(float(change[bottom]), rel=1e-4)
    assert list(rose["change"]) == sorted(rose["change"], reverse=True) and (fell["change"] < 0).all()
    assert [c.value for c in at.code] == [tokenizer.decode(baseline), tokenizer.decode(steered)]
    assert baseline != steered
    # a latent's decoder direction, added strongly enough, raises the token its logit effects put first
    assert page.positive_logits[0].token_id in list(rose["id"])
    (chart,) = charts(at)
    assert chart["data"][0]["y"][-1] == repr(tokenizer.decode([top]))
    assert chart["data"][0]["x"][-1] == pytest.approx(float(change[top]), rel=1e-4)


def test_the_playground_opens_on_a_readable_latent_at_the_largest_strength_within_the_kl_budget(
    app, runs_root, tmp_path, monkeypatch
):
    from saelab.analysis.explanations import append_record
    from saelab.browse.labels import SUMMARY_CONTEXTS, LabelBook
    from saelab.steer.strength import COEFFICIENTS, KL_BUDGET

    folder = runs_root / "tiny" / "train" / "saes" / TOPK
    with FeatureStore(folder / "features.sqlite") as store:
        readable = LabelBook({}, store.peak_tokens(SUMMARY_CONTEXTS)).readable_latent()
        page = store.feature(readable)
    fired = [w.tokens[w.highlight] for w in page.top_contexts[:SUMMARY_CONTEXTS]]
    word = max(set(fired), key=fired.count)
    assert re.fullmatch(r"\s?[A-Za-z]{3,}", word) and fired.count(word) >= 2 and page.max_activation > 0

    # no explanations yet: the latent whose top contexts most often peak on one word, run at once (no Run)
    at = app("steering", run="tiny/train", sae=TOPK)
    assert_clean(at)
    assert at.number_input(key="steer_latent_0").value == readable and at.checkbox(key="steer_scale").value
    assert at.selectbox(key="steer_mode_0").value == "add" and at.text_area(key="steer_prompt").value == STEER_PROMPT
    assert len(at.code) == 2  # baseline and steered continuations
    (sweep,) = [frame.value for frame in at.dataframe if "× max" in frame.value.columns]
    assert list(sweep["× max"]) == list(COEFFICIENTS)
    kls = list(sweep["KL (nats)"])
    coefficient = at.number_input(key="steer_value_0").value
    position = list(COEFFICIENTS).index(coefficient)
    if kls[0] <= KL_BUDGET:  # the largest whose KL stays within the budget all the way up
        assert all(kl <= KL_BUDGET for kl in kls[: position + 1])
        assert position == len(kls) - 1 or kls[position + 1] > KL_BUDGET
    else:  # even the smallest breaks it: shown at the smallest, and said
        assert position == 0 and "even the smallest swept strength breaks the budget" in texts(at.caption)
    assert at.code[1].value.startswith(sweep["steered continuation"][position])  # the sweep's, 8 tokens of 16
    (measured,) = re.findall(r"D_KL\(steered ‖ baseline\) = ([0-9.e+-]+) nats", texts(at.caption))
    assert float(measured) == pytest.approx(kls[position], rel=1e-3, abs=1e-6)
    assert f"How hard to steer latent {readable}" in [h.value for h in at.subheader]
    assert "label (token-summary): fires on\\:" in texts(at.caption) and f'"{word}"' in texts(at.caption)
    sweep_chart = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("D_KL"))
    assert sweep_chart["data"][0]["y"] == pytest.approx([max(kl, 1e-6) for kl in kls])
    assert any(shape.get("y0") == KL_BUDGET for shape in sweep_chart["layout"]["shapes"])

    # a label that beats shuffled is the one to open on
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    trusted = 3 if readable != 3 else 4
    path = root / "tiny" / "train" / "saes" / TOPK / "explanations.jsonl"
    append_record(path, {"latent": trusted, "explanation": "closing brackets", "explainer": "smollm2-135m"})
    scores = {"detection": 11 / 12, "detection_shuffled": 0.5}
    append_record(path, {"latent": trusted, "scores": scores, "n_detection": 12, "scorer": "smollm2-135m"})
    monkeypatch.setenv("SAELAB_RUNS", str(root))
    at = app("steering", run="tiny/train", sae=TOPK)
    assert_clean(at)
    assert at.number_input(key="steer_latent_0").value == trusted
    assert "label (smollm2-135m): closing brackets · beats shuffled" in texts(at.caption)


def test_steering_page_turns_bad_input_into_messages(app, monkeypatch):
    import saelab.browse.playground

    at = app("steering", run="tiny/train", sae=TOPK)
    steer_on_page(at, "   ", [(3, "add", 1.0)])
    assert "Type a prompt first" in texts(at.info) and not at.dataframe
    steer_on_page(at, STEER_PROMPT, [(3, "add", 1.0), (100_000, "ablate", 0.0)])
    assert "feature row 2: latent 100000 does not exist" in texts(at.error) and "0..127" in texts(at.error)
    steer_on_page(at, STEER_PROMPT, [(3, "clamp", 1.0)], hook="blocks.10.hook_resid_post")
    assert "clamp edits the SAE's latents, so it needs the SAE's own hook" in texts(at.error)
    steer_on_page(at, STEER_PROMPT, [(3, "add", 1.0)], hook="blocks.99.hook_resid_post")
    assert "is not a hook of this model" in texts(at.error)
    for huge in (1e9, 1e30):  # rendered, with a warning (at 1e30 the next-token distribution goes flat)
        steer_on_page(at, STEER_PROMPT, [(3, "add", huge)], max_new=1)
        assert "far beyond any activation" in texts(at.warning) and len(at.code) == 2
        assert not at.error
    monkeypatch.setattr(saelab.browse.playground, "MAX_PROMPT_TOKENS", 8)
    steer_on_page(at, STEER_PROMPT + " reading and writing files", [(3, "ablate", 0.0)], positions="prompt")
    assert "The prompt was cut to its first 8 tokens" in texts(at.warning) and at.dataframe


# ---- a real browser ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_feature_page_in_headless_chromium(runs_root, latent, tmp_path):
    import screenshots

    chromium = screenshots.find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    with screenshots.dashboard(runs_root) as base, screenshots.Browser(chromium, 1400, 1800) as browser:
        url = screenshots.page_url(base, "feature", run="tiny/train", sae=TOPK, feature=latent)
        capture = browser.capture(url, tmp_path / "feature.png", wait_for="Top-activating contexts", charts=2)
    assert capture.exception is None, capture.exception
    assert f"Latent {latent} of {TOPK}" in capture.text and "activation histogram" in capture.html.read_text()
    assert 'title="activation ' in capture.html.read_text()  # the highlighted contexts are in the DOM
    data = capture.png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    print(f"screenshot: {capture.png}")


# ---- a real server, many users at once -----------------------------------------------------------------

# Loaded into the dashboard's server process (as `sitecustomize`): a line in a file per model load.
COUNT_MODEL_LOADS = """
import saelab.models

_load_model = saelab.models.load_model


def load_model(*args, **kwargs):
    with open({path!r}, "a") as log:
        log.write("loaded\\n")
    return _load_model(*args, **kwargs)


saelab.models.load_model = load_model
"""
LIVE_TEXTS = ("import collections.abc as abcs", "raise ValueError(message)")


def browse_as_a_user(base: str, sae: str, latents: list[int], live_text: str | None, start) -> list:
    """A session of its own: the feature page of latents[0], the others typed into its latent box, then
    (with `live_text`) that text run live, then a plain rerun. Returns every page it was sent."""
    from streamlit_session import Session

    with Session(base) as session:
        start.wait()
        pages = [session.open("feature", run="tiny/train", sae=sae, feature=latents[0])]
        pages += [session.interact({"latent": latent}) for latent in latents[1:]]
        if live_text is not None:
            pages.append(session.interact({"text": live_text}, press="run"))
        pages.append(session.interact())
    return pages


def steer_as_a_user(base: str, latent: int, start) -> list:
    from streamlit_session import Session

    with Session(base) as session:
        start.wait()
        return [session.open("steering", run="tiny/train", sae=TOPK, feature=latent), session.interact(press="Run")]


@pytest.mark.slow
def test_eight_users_browse_while_one_steers_each_in_a_session_of_its_own(runs_root, latent, tmp_path):
    """A real server: 8 sessions browse features (two also run live text) while a 9th runs the steering
    playground. No page raises, each shows its own session's SAE, latent and text, and the model is
    loaded once for the three users who need it."""
    import screenshots

    site = tmp_path / "site"
    site.mkdir()
    loads = tmp_path / "model-loads.txt"
    (site / "sitecustomize.py").write_text(COUNT_MODEL_LOADS.format(path=str(loads)))
    live = {}
    for label in (TOPK, BATCHTOPK):
        with FeatureStore(runs_root / "tiny" / "train" / "saes" / label / "features.sqlite") as store:
            live[label] = [row[0] for row in store.summary_table() if row[1] > 0]
    rng = random.Random(0)
    plans = [(TOPK if i % 2 == 0 else BATCHTOPK, i) for i in range(8)]
    plans = [(sae, rng.sample(live[sae], 3), LIVE_TEXTS[i] if i < 2 else None) for sae, i in plans]
    start = threading.Barrier(len(plans) + 1)
    with screenshots.dashboard(runs_root, python_path=[site]) as base, ThreadPoolExecutor(len(plans) + 1) as pool:
        users = [pool.submit(browse_as_a_user, base, *plan, start) for plan in plans]
        steering = pool.submit(steer_as_a_user, base, latent, start)
        browsed = [user.result(timeout=600) for user in users]
        steered = steering.result(timeout=600)

    for (sae, latents, text), pages in zip(plans, browsed, strict=True):
        shown = [*latents, *([latents[-1]] if text else []), latents[-1]]  # live text and the rerun keep the latent
        for page, latent_shown in zip(pages, shown, strict=True):
            assert not page.exceptions, page.exceptions
            assert f"Latent {latent_shown} of {sae}" in page.texts("heading")
        if text is not None:
            shown_text = html.unescape(re.sub(r"<[^>]*>", "", "".join(pages[-2].texts("html"))))
            other = LIVE_TEXTS[1 - LIVE_TEXTS.index(text)]
            assert text in shown_text and other not in shown_text
    assert not steered[-1].exceptions, steered[-1].exceptions
    assert len(steered[-1].texts("code")) == 2 and steered[-1].of_kind("dataframe")  # both continuations, the table
    assert loads.read_text().splitlines() == ["loaded"]


def test_feature_page_links_the_nearest_latents_of_the_runs_other_saes(app, runs_root, latent):
    from saelab.eval.matching import unit_rows

    at = app("feature", run="tiny/train", sae=TOPK, feature=latent)
    saes = runs_root / "tiny" / "train" / "saes"
    own = unit_rows(load_sae(saes / TOPK).W_dec)[latent]
    best = (unit_rows(load_sae(saes / BATCHTOPK).W_dec) @ own).topk(3)
    links = [link.proto for link in at.get("page_link") if " · cos " in link.proto.label]
    expected = [f"{BATCHTOPK} · latent {i} · cos {c:.2f}" for c, i in zip(best.values, best.indices, strict=True)]
    assert [link.label for link in links] == expected
    assert f"feature={int(best.indices[0])}" in links[0].query_string and f"sae={BATCHTOPK}" in links[0].query_string


def test_runs_page_shows_the_shared_fraction_that_saelab_compare_measured(app, runs_root, tmp_path, monkeypatch):
    import subprocess

    before, after = tmp_path / "before", tmp_path / "after"  # two roots: the dashboard caches each root's runs
    for root in (before, after):
        shutil.copytree(runs_root / "tiny", root / "tiny")
    monkeypatch.setenv("SAELAB_RUNS", str(before))
    at = app(run="tiny/train")
    assert f"saelab compare {before / 'tiny' / 'train'}" in texts(at.caption)
    run = after / "tiny" / "train"
    result = subprocess.run([sys.executable, "-m", "saelab", "compare", str(run), "--quiet"], capture_output=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "compare.json").read_text())
    monkeypatch.setenv("SAELAB_RUNS", str(after))
    at = app(run="tiny/train")
    (heatmap,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart") if c.proto.id.endswith("shared")]
    assert heatmap["data"][0]["y"] == [sae["label"] for sae in report["saes"]] == [BATCHTOPK, TOPK]
    shared = heatmap["data"][0]["z"]
    assert shared[0][1] == pytest.approx(100 * report["shared_fraction"])
    assert shared[1][0] == pytest.approx(100 * report["shared_fraction_b"])


def test_runs_page_tables_probing_absorption_and_explanation_scores(app, runs_root, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    folder = root / "tiny" / "train" / "saes" / TOPK
    probed = {
        "sparse_probing": {"mean": {"dense": 0.95, "k1": 0.7, "k5": 0.8}},
        "absorption": {"mean_absorption_rate": 0.12},
    }
    (folder / "probing.json").write_text(json.dumps(probed))
    scored = {"n_latents": 100, "detection": {"mean": 0.61, "ci95": [0.57, 0.65], "n": 100}}
    (folder / "autointerp.json").write_text(json.dumps(scored | {"detection_shuffled": {"mean": 0.5, "n": 100}}))
    monkeypatch.setenv("SAELAB_RUNS", str(root))
    at = app()
    assert "Judged by use: sparse probing, absorption, explanations" in [header.value for header in at.subheader]
    table = at.dataframe[1].value
    assert list(table["SAE"]) == [TOPK]  # the SAE with neither file has no row
    row = table.iloc[0]
    assert row["dense probe %"] == pytest.approx(95) and row["absorption %"] == pytest.approx(12)
    assert row["1-sparse %"] == pytest.approx(70) and row["5-sparse %"] == pytest.approx(80)
    assert row["detection %"] == pytest.approx(61) and row["shuffled %"] == pytest.approx(50)
    assert row["latents explained"] == 100


def greyed_cells(styles: str) -> set[tuple[int, int]]:
    """(row, column) of every cell a pandas Styler's CSS colours grey (#9e9e9e); the Styler may list many
    cells' selectors before one rule."""
    cells = set()
    for selectors, rule in re.findall(r"([^{}]+)\{([^}]*)\}", styles):
        if "#9e9e9e" in rule:
            cells |= {(int(r), int(c)) for r, c in re.findall(r"_row(\d+)_col(\d+)", selectors)}
    return cells


def test_labels_beating_shuffled_are_headlines_the_rest_greyed_and_the_browser_searches_them(
    app, runs_root, latent, tmp_path, monkeypatch
):
    from saelab.analysis.explanations import append_record
    from saelab.analysis.token_summary import token_summary

    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    folder = root / "tiny" / "train" / "saes" / TOPK
    path = folder / "explanations.jsonl"
    trusted = 3 if latent != 3 else 4
    append_record(path, {"latent": latent, "explanation": "Exceptions being raised", "explainer": "smollm2-135m"})
    append_record(path, {"latent": trusted, "explanation": "closing brackets", "explainer": "smollm2-135m"})
    nine, eleven = ({"detection": n / 12, "detection_shuffled": 0.5, "fuzzing": 0.6} for n in (9, 11))
    append_record(path, {"latent": latent, "scores": nine, "n_detection": 12, "scorer": "smollm2-135m"})
    append_record(path, {"latent": trusted, "scores": eleven, "n_detection": 12, "scorer": "smollm2-135m"})
    monkeypatch.setenv("SAELAB_RUNS", str(root))
    with FeatureStore(folder / "features.sqlite") as store:
        summary = token_summary(store.feature(latent), 10)
        peak = store.feature(latent).top_contexts[0]
        peak_token = json.dumps(peak.tokens[peak.highlight], ensure_ascii=False)[1:-1]  # as the summary shows it

    # 11 of 12 right calls beat the shuffled labels' 50 % (p = 0.003): the headline
    at = app("feature", run="tiny/train", sae=TOPK, feature=trusted)
    assert "**Label** (smollm2-135m): closing brackets" in [m.value for m in at.markdown]
    assert "detection 92%, shuffled labels 50%; beats shuffled (11/12 right, p = 0.0032)" in texts(at.caption)
    # 9 of 12 do not (p = 0.073): no headline, the explanation and the unscored token summary greyed out
    at = app("feature", run="tiny/train", sae=TOPK, feature=latent)
    assert not any(m.value.startswith("**Label**") for m in at.markdown)
    captions = texts(at.caption)
    assert "No label of this latent beats the shuffled labels" in captions
    assert "smollm2-135m: Exceptions being raised · detection 75%, shuffled labels 50%; not above shuffled (9/12" in (
        captions
    )
    assert "token-summary: " in captions and "· not scored" in captions

    at = app("features", run="tiny/train", sae=TOPK)
    table = at.dataframe[-1].value.set_index("latent")
    assert table.loc[trusted, "label"] == "closing brackets" and table.loc[trusted, "label test"].startswith("beats")
    assert table.loc[latent, "label"] == summary and table.loc[latent, "label test"] == "not scored"
    assert table.loc[trusted, "detection %"] == pytest.approx(100 * 11 / 12) and table.loc[trusted, "shuffled %"] == 50
    assert table[["detection %", "shuffled %"]].loc[latent].isna().all()  # its token summary: not scored
    greyed = greyed_cells(at.dataframe[-1].proto.arrow_data.styler.styles)  # the untrusted labels, not the headline
    rows = list(at.dataframe[-1].value["latent"])
    assert (rows.index(latent), 1) in greyed and (rows.index(latent), 2) in greyed
    assert (rows.index(trusted), 1) not in greyed and (rows.index(trusted), 2) not in greyed
    at.text_input(key="label_query").set_value("EXCEPTIONS raised").run()
    assert list(at.dataframe[-1].value["latent"]) == [latent]  # matched by its (greyed) explanation
    at.text_input(key="label_query").set_value(peak_token).run()
    assert_clean(at)
    assert latent in list(at.dataframe[-1].value["latent"])  # matched by its token summary


def test_runs_page_plots_gba_group_frequencies_against_their_targets(runs_root, smollm2, monkeypatch, tmp_path):
    """A run whose log holds GBA's per-group frequencies gets a chart of frequency ÷ target per group."""
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny" / "train", root / "gba" / "train")
    with open(root / "gba" / "train" / "metrics.jsonl", "a") as log:
        for step, freq in ((9, 0.3), (10, 0.25)):
            record = {"step": step, "tokens": 512 * step, "sae": TOPK, "group0/freq": freq, "group0/target": 0.2}
            log.write(json.dumps(record) + "\n")
    monkeypatch.setenv("SAELAB_RUNS", str(root))
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, device="auto": smollm2)
    at = open_page()
    groups = [c for c in charts(at) if "GBA group frequency" in c["layout"]["title"]["text"]]
    assert len(groups) == 1
    trace = groups[0]["data"][0]
    assert trace["x"] == [4608, 5120] and trace["y"] == pytest.approx([1.5, 1.25])


FRONTIER_CONFIG = """store: activations
saes:
- {architecture: topk, d_sae: 64, k: 8}
- {architecture: batchtopk, d_sae: 64, k: 16}
- {architecture: topk, d_sae: 64, k: 32}
- {architecture: batchtopk, d_sae: 64, k: 4}
"""


def test_runs_page_plots_the_frontier_of_l0_against_fvu_and_ce_recovered(tmp_path, monkeypatch):
    """Three evaluated SAEs of two architectures and a transcoder on the frontier, joined per architecture in
    order of L0; the configured SAE with no eval.json is named in the caption instead."""
    run = tmp_path / "runs" / "sweep" / "train"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(FRONTIER_CONFIG)
    evaluations = {
        "topk-64-k32": {"architecture": "topk", "l0": 31.75, "fvu": 0.21, "ce_loss_recovered": 0.962},
        "batchtopk-64-k16": {"architecture": "batchtopk", "l0": 16.5, "fvu": 0.29, "ce_loss_recovered": 0.931},
        "topk-64-k8": {"architecture": "topk", "l0": 8.0, "fvu": 0.37, "ce_loss_recovered": 0.874},
        "skip_transcoder-64-l1c5": {
            "architecture": "skip_transcoder",
            "l0": 12.3,
            "fvu": 0.18,
            "ce_loss_recovered": 0.9,
        },
    }
    for label, evaluation in evaluations.items():
        (run / "saes" / label).mkdir(parents=True)
        (run / "saes" / label / "eval.json").write_text(json.dumps({"sae": label, "dead_fraction": 0.0} | evaluation))
    monkeypatch.setenv("SAELAB_RUNS", str(tmp_path / "runs"))

    at = open_page()
    frontier = frontier_chart(at)
    assert frontier is not None
    traces = {(trace["name"], trace["xaxis"]): trace for trace in frontier["data"]}
    assert sorted(traces) == sorted(
        (name, axis) for name in ("topk", "batchtopk", "skip_transcoder") for axis in ("x", "x2")
    )
    for (architecture, axis), trace in traces.items():
        labels = sorted((e["l0"], label) for label, e in evaluations.items() if e["architecture"] == architecture)
        metric = "fvu" if axis == "x" else "ce_loss_recovered"
        assert [row[0] for row in trace["customdata"]] == [label for _, label in labels]
        assert trace["x"] == [evaluations[label]["l0"] for _, label in labels]
        assert trace["y"] == [evaluations[label][metric] for _, label in labels]
        assert trace["mode"] == "lines+markers" and trace["legendgroup"] == architecture
        assert trace["showlegend"] == (axis == "x")
        assert trace["marker"]["symbol"] == ("diamond" if architecture == "skip_transcoder" else "circle")
    assert traces[("topk", "x")]["x"] == [8.0, 31.75]  # sorted by L0, not by the config's order
    assert traces[("topk", "x")]["line"]["color"] == traces[("topk", "x2")]["line"]["color"]
    assert traces[("topk", "x")]["line"]["color"] != traces[("batchtopk", "x")]["line"]["color"]
    assert frontier["layout"]["xaxis"]["type"] == frontier["layout"]["xaxis2"]["type"] == "log"
    assert traces[("topk", "x")]["customdata"][0] == ["topk-64-k8", "0.3700", "87.4%"]
    assert "%{customdata[0]}" in traces[("topk", "x")]["hovertemplate"]

    caption = texts(at.caption)
    assert "`batchtopk-64-k4`" in caption and "saelab eval" in caption and "no eval.json" in caption
    assert "topk-64-k8`" not in caption and "transcoders" in caption and "another hook's output" in caption
