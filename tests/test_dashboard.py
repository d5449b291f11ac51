"""The dashboard's library (runs, filters, highlighting, live text) against the files and brute force,
on a real tiny SmolLM2 run."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from dashboard_runs import BATCHTOPK, HOOK, TOPK, make_dashboard_runs

from saelab.browse import runs as runs_module
from saelab.browse.feature_filter import FeatureFilter, random_live_latent
from saelab.browse.highlight import token_text, tokens_html
from saelab.browse.live import encode_text, encode_tokens
from saelab.browse.runs import find_runs, read_metrics, training_curves
from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.sae import load_sae

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


def spans(fragment: str) -> list[tuple[str, str, str]]:
    return SPAN.findall(fragment)


# ---- the library --------------------------------------------------------------------------------


def test_file_names_are_the_pipelines():
    from saelab.eval import evaluate
    from saelab.train import trainer

    assert runs_module.CONFIG_FILE == trainer.CONFIG_FILE and runs_module.SUMMARY_FILE == trainer.SUMMARY_FILE
    assert runs_module.SAE_DIR == trainer.SAE_DIR and runs_module.EVAL_FILE == evaluate.EVAL_FILE


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
    assert (topk.model, topk.hook, topk.architecture, topk.d_sae, topk.k) == ("smollm2-135m", HOOK, "topk", 128, 8)
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
