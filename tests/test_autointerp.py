"""Automated explanations: prompts and scores against hand-computed cases, the explanations file's resume
rules, the non-firing contexts against the SAE itself, an OpenAI-compatible endpoint served locally, and
`saelab explain` end to end on the real SmolLM2 (explainer and scorer) on a tiny real run."""

from __future__ import annotations

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from dashboard_runs import TOPK, make_dashboard_runs

from saelab.analysis import autointerp
from saelab.analysis.autointerp import (
    NonFiringPool,
    bootstrap_interval,
    derangement,
    explain_prompt,
    first_line,
    ranked_balanced_accuracy,
    scoring_examples,
    window_text,
)
from saelab.analysis.chat_models import EndpointChatModel
from saelab.analysis.config import ExplainConfig
from saelab.analysis.explain_job import explain
from saelab.analysis.explanations import Explanation, append_record, read_explanations, search
from saelab.analysis.feature_store import ContextWindow, FeaturePage, FeatureStore, LogitEffect
from saelab.analysis.label_test import chance_rate, label_test
from saelab.analysis.token_summary import summary_text, token_summary
from saelab.harvest.store import ActivationStore
from saelab.run_layout import AUTOINTERP_FILE, EXPLANATIONS_FILE, TOKEN_SUMMARIES_FILE
from saelab.sae import load_sae


def window(tokens: list[str], activations: list[float | None]) -> ContextWindow:
    return ContextWindow(0, 1, 0, list(range(len(tokens))), tokens, activations)


def test_windows_mark_the_firing_tokens_and_leave_out_the_bos():
    w = window(["<s>", "def", " f", "(", "x", "):"], [None, 0.0, 2.0, 0.0, 1.5, 0.0])
    assert window_text(w) == "def f(x):"
    assert window_text(w, autointerp.firing(w)) == "def<< f>>(<<x>>):"
    prompt = explain_prompt([w, w])
    assert "1. def<< f>>(<<x>>):\n2. def<< f>>(<<x>>):" in prompt and "one short phrase" in prompt


@pytest.mark.parametrize(
    "answer, explanation",
    [("The word 'def'.\nMore text", "The word 'def'"), ('\n  "closing brackets"  ', "closing brackets"), ("", "")],
)
def test_an_answer_becomes_one_line(answer, explanation):
    assert first_line(answer) == explanation


def test_ranked_balanced_accuracy_by_hand():
    truth = [True, True, False, False]
    assert ranked_balanced_accuracy([0.9, 0.8, 0.2, 0.1], truth) == 1.0
    assert ranked_balanced_accuracy([0.1, 0.2, 0.8, 0.9], truth) == 0.0
    assert ranked_balanced_accuracy([0.9, 0.1, 0.8, 0.2], truth) == 0.5  # one of each in the top half
    assert ranked_balanced_accuracy([0.5, 0.5, 0.5, 0.5], truth) == 1.0  # ties: first come, first called
    assert ranked_balanced_accuracy([0.5, 0.5, 0.5, 0.5], truth[::-1]) == 0.0


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_agreement():
    values = [0.4, 0.9, 0.6, 0.7, 0.5, 0.8, 0.3, 1.0]
    low, high = bootstrap_interval(values, n=2000)
    assert low < sum(values) / len(values) < high and high - low < 0.35
    assert bootstrap_interval([0.7] * 8) == pytest.approx((0.7, 0.7))


def test_derangement_gives_every_latent_another_ones_explanation():
    latents = [3, 8, 11, 20, 42]
    shuffled = derangement(latents, seed=1)
    assert sorted(shuffled) == latents and sorted(shuffled.values()) == latents
    assert all(shuffled[latent] != latent for latent in latents)


def test_the_explanations_file_merges_records_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / EXPLANATIONS_FILE
    append_record(path, {"latent": 4, "explanation": "Exceptions being raised", "explainer": "m"})
    append_record(path, {"latent": 9, "explanation": "closing brackets", "explainer": "m"})
    append_record(path, {"latent": 4, "scores": {"detection": 0.75}, "scorer": "s"})
    with open(path, "a") as file:
        file.write('{"latent": 9, "scores": {"dete')  # killed mid-line
    found = read_explanations(path)
    assert found[4].text == "Exceptions being raised" and found[4].scores == {"detection": 0.75}
    assert found[9].text == "closing brackets" and found[9].scores == {}
    assert [e.latent for e in search(found, "raised EXCEPTIONS")] == [4] and search(found, "nothing") == []
    assert read_explanations(tmp_path / "absent.jsonl") == {}


class Server(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: answers every question Yes, with log-probabilities."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Server.requests.append(body)
        top = [{"token": "Yes", "logprob": -0.2}, {"token": "No", "logprob": -1.8}, {"token": "Maybe", "logprob": -3}]
        first = {"token": "Yes", "logprob": -0.2, "top_logprobs": top}
        logprobs = {"content": [first]} if body.get("logprobs") else None
        answer = {"choices": [{"message": {"content": "Yes, the brackets."}, "logprobs": logprobs}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_an_openai_compatible_endpoint_explains_and_scores():
    server = HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = EndpointChatModel(f"http://127.0.0.1:{server.server_port}/v1", "judge")
        assert model.complete("what?") == "Yes, the brackets."
        (p,) = model.yes_probabilities(["fires?"])
    finally:
        server.shutdown()
    yes, no = torch.tensor(-0.2).exp(), torch.tensor(-1.8).exp()
    assert p == pytest.approx(float(yes / (yes + no)))
    assert Server.requests[-1]["model"] == "judge" and Server.requests[-1]["temperature"] == 0
    assert EndpointChatModel._yes_probability({"message": {"content": "no."}, "logprobs": None}) == 0.0


@pytest.fixture(scope="module")
def tiny_run(smollm2, tmp_path_factory) -> Path:
    return make_dashboard_runs(tmp_path_factory.mktemp("autointerp") / "runs", smollm2) / "tiny" / "train"


def test_non_firing_contexts_are_silent_and_activating_ones_fire(tiny_run):
    folder = tiny_run / "saes" / TOPK
    sae, activations = load_sae(folder), ActivationStore(tiny_run.parent / "activations")
    with FeatureStore(folder / "features.sqlite") as store:
        latent = max((row for row in store.summary_table() if 0 < row[1] < 0.2), key=lambda row: row[1])[0]
        page = store.feature(latent)
        pool = NonFiringPool(store, activations, sae, seed=0)
        examples = scoring_examples(page, pool, n_explain=2, n_score=3, seed=0)
    truth = [t for _, t in examples.detection]
    assert truth.count(True) == truth.count(False) >= 1
    first = activations.manifest.first_position
    for w, fires in examples.detection:  # against the SAE on the store's rows, directly
        positions = [p for p in range(w.start, w.start + len(w.tokens)) if p >= first]
        rows = activations.context_rows(w.context)[[p - first for p in positions]]
        assert activations.token_ids(rows).tolist() == w.token_ids[-len(positions) :]
        with torch.no_grad():
            z = sae.encode(activations.rows(rows).float())[:, latent]
        assert bool((z > 0).any()) == fires
    for w, marks, true in examples.fuzzing:
        assert (marks == autointerp.firing(w)) == true and marks


class CountingModel:
    """A stand-in chat model: counts calls; 'fires' when the text holds the explanation's word."""

    name = "counting"

    def __init__(self, fail_after: int | None = None) -> None:
        self.explained, self.scored, self.fail_after = 0, 0, fail_after

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        self.explained += 1
        return "the letter e"

    def yes_probabilities(self, prompts: list[str]) -> list[float]:
        self.scored += 1
        if self.fail_after is not None and self.scored > self.fail_after:
            raise KeyboardInterrupt  # as a kill would
        return [float(p.count("e")) / len(p) for p in prompts]


def test_a_killed_scoring_run_resumes_without_redoing_finished_latents(tiny_run, monkeypatch, tmp_path):
    import shutil

    run = tmp_path / "train"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock", EXPLANATIONS_FILE, AUTOINTERP_FILE))
    cfg = ExplainConfig(run=str(run), saes=[TOPK], n_latents=4, n_explain=2, n_score=2, token_summary=False)
    cfg.device = "cpu"
    killed = CountingModel(fail_after=4)  # each latent asks twice (detection, fuzzing) per explanation
    monkeypatch.setattr("saelab.analysis.explain_job.load_chat_model", lambda *a, **k: killed)
    with pytest.raises(KeyboardInterrupt):
        explain(cfg, progress=False)
    done = read_explanations(run / "saes" / TOPK / EXPLANATIONS_FILE)
    assert killed.explained == 4 and sum(bool(e.scores) for e in done.values()) == 1  # 4 explained, 1 scored

    resumed = CountingModel()
    monkeypatch.setattr("saelab.analysis.explain_job.load_chat_model", lambda *a, **k: resumed)
    summary = explain(cfg, progress=False)[TOPK]
    assert resumed.explained == 0 and resumed.scored <= 3 * 4  # 3 latents left, ≤ 4 questions each
    assert summary["n_latents"] == 4 and summary["detection"]["n"] >= 1
    saved = json.loads((run / "saes" / TOPK / AUTOINTERP_FILE).read_text())
    assert saved["latents"] == summary["latents"] and len(saved["latents"]) == 4


@pytest.mark.slow
def test_saelab_explain_on_the_real_smollm2(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "train"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock", EXPLANATIONS_FILE, AUTOINTERP_FILE))
    cfg = ExplainConfig(run=str(run), saes=[TOPK], n_latents=3, n_explain=3, n_score=2, device="cpu")
    summary = explain(cfg, progress=False)[TOPK]
    explanations = read_explanations(run / "saes" / TOPK / EXPLANATIONS_FILE)
    assert sorted(explanations) == summary["latents"] and len(summary["latents"]) == 3
    for entry in explanations.values():
        assert entry.text and entry.explainer == "smollm2-135m" and entry.scorer == "smollm2-135m"
        assert set(entry.scores) == set(autointerp.SCORE_KEYS)
        assert all(value is None or 0 <= value <= 1 for value in entry.scores.values())
    low, high = summary["detection"]["ci95"]
    assert low <= summary["detection"]["mean"] <= high
    # the token-summary explainer, scored by the same real SmolLM2 on the same latents
    assert list(summary["explainers"]) == ["smollm2-135m", "token-summary"]
    summaries = read_explanations(run / "saes" / TOPK / TOKEN_SUMMARIES_FILE)
    assert sorted(summaries) == summary["latents"]
    with FeatureStore(run / "saes" / TOPK / "features.sqlite") as store:
        for latent, entry in summaries.items():
            assert entry.text == token_summary(store.feature(latent), 3) and entry.explainer == "token-summary"
            assert entry.scorer == "smollm2-135m" and set(entry.scores) == set(autointerp.SCORE_KEYS)
            assert entry.n_detection == 4  # n_score 2 activating + 2 silent
    beats = summary["explainers"]["token-summary"]["beats_shuffled"]
    assert beats["scored"] == 3 and 0 <= beats["count"] <= 3 and beats["chance"] >= 0.5


# ---- the token-summary explainer and the test against shuffled labels ---------------------------------


def page_with(top_tokens: list[str], promoted: list[str]) -> FeaturePage:
    """A page whose top contexts peak on `top_tokens` (one context each, strongest first)."""
    windows = [ContextWindow(i, 1, 0, [0, 1], ["<s>", token], [None, 1.0]) for i, token in enumerate(top_tokens)]
    effects = [LogitEffect(i, token, 1.0 - i / 10) for i, token in enumerate(promoted)]
    return FeaturePage(7, len(top_tokens), 0.1, 1.0, 2.0, 0.1, [1], windows, [], effects, [])


def test_a_token_summary_lists_the_commonest_peak_tokens_of_the_shown_contexts_and_the_promoted_ones():
    page = page_with(["def", " f", "def", "\n", " f", "def", "class"], [" self", "(", ")", "z"])
    assert token_summary(page, 6) == 'fires on: "def", " f", "\\n" · promotes: " self", "(", ")"'
    assert "class" not in token_summary(page, 6)  # the 7th context is held out for scoring: never read
    assert summary_text(["b", "a", "a", "b"], []) == 'fires on: "b", "a"'  # ties: the stronger context first
    assert summary_text([], ["x"]) == 'promotes: "x"' and summary_text([], []) == ""


def test_peak_tokens_of_every_latent_equal_their_pages(tiny_run):
    with FeatureStore(tiny_run / "saes" / TOPK / "features.sqlite") as store:
        everything = store.peak_tokens(3)
        assert sorted(everything) == list(range(store.n_latents))
        for latent in range(store.n_latents):
            page = store.feature(latent)
            fired = [w.tokens[w.highlight] for w in page.top_contexts[:3]]
            assert everything[latent] == (fired, [e.token for e in page.positive_logits])
            assert summary_text(*everything[latent]) == token_summary(page, 3)


def test_a_label_beats_shuffled_by_a_one_sided_binomial_test_against_the_pooled_shuffled_rate():
    def scored(detection: float, shuffled: float, n: int | None = 12) -> Explanation:
        return Explanation(0, "x", scores={"detection": detection, "detection_shuffled": shuffled}, n_detection=n)

    ten, nine = label_test(scored(10 / 12, 0.5), 0.5), label_test(scored(9 / 12, 0.5), 0.5)
    assert (ten.correct, ten.n, ten.passed) == (10, 12, True) and ten.p_value == pytest.approx(0.01929, abs=1e-4)
    assert (nine.correct, nine.passed) == (9, False) and nine.p_value == pytest.approx(0.07300, abs=1e-4)
    assert not label_test(scored(10 / 12, 0.5), 0.75).passed  # against a scorer that finds them unaided
    # p < 0.05 against the pooled rate, but another latent's label did as well on these very examples
    same = label_test(scored(10 / 12, 10 / 12), 0.5)
    assert same.p_value < 0.05 and same.shuffled_correct == 10 and not same.passed
    assert label_test(scored(11 / 12, 10 / 12), 0.5).passed
    assert label_test(scored(1.0, 0.5, n=None), 0.5).n == 12  # files written before n_detection was kept
    assert label_test(Explanation(0, "x"), 0.5) is None
    assert chance_rate([scored(0.5, 0.25), scored(0.5, 0.75)]) == 0.5
    assert chance_rate([scored(0.5, 0.75), scored(0.5, 0.75, n=4)]) == pytest.approx(0.75)
    assert chance_rate([scored(0.5, 0.25)]) == 0.5 and chance_rate([]) == 0.5  # never below chance


class TokenMatcher:
    """A stand-in scorer that reads a token summary literally: 'fires' where the text holds one of the tokens
    it names, plus a tie-breaking jitter from the text; an LLM's explanation ('the letter e') names none."""

    name = "matcher"

    def __init__(self) -> None:
        self.explanations: set[str] = set()

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        return "the letter e"

    def yes_probabilities(self, prompts: list[str]) -> list[float]:
        answers = []
        for prompt in prompts:
            head, _, text = prompt.partition("\n\nText: ")
            jitter = zlib.crc32(prompt.encode()) / 2**33
            if not text:  # a fuzzing question: no opinion
                answers.append(0.5 + jitter)
                continue
            explanation = head.split('fires on: "', 1)[1].rsplit('".', 1)[0]
            self.explanations.add(explanation)
            _, _, listed = explanation.partition("fires on: ")
            tokens = [t for t in json.loads(f"[{listed.split(' · promotes')[0]}]") if t.strip()]
            answers.append(float(any(t in text for t in tokens)) + jitter)
        return answers


def test_saelab_explain_tables_both_explainers_and_their_shuffled_controls(tiny_run, monkeypatch, tmp_path, capsys):
    import shutil

    from saelab.cli import main

    run = tmp_path / "train"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock", "*.jsonl", AUTOINTERP_FILE))
    scorer = TokenMatcher()
    monkeypatch.setattr("saelab.analysis.explain_job.load_chat_model", lambda *a, **k: scorer)
    args = [f"run={run}", f"saes=[{TOPK}]", "n_latents=12", "n_explain=2", "n_score=3", "device=cpu"]
    assert main(["explain", "--quiet", *args]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "saes" / TOPK / AUTOINTERP_FILE).read_text())
    llm, summary = saved["explainers"]["matcher"], saved["explainers"]["token-summary"]
    # the default (the top level) is the explainer with the higher mean detection: here the token summary
    assert saved["explainer"] == "token-summary" and saved["detection"] == summary["detection"]
    summaries = read_explanations(run / "saes" / TOPK / TOKEN_SUMMARIES_FILE)
    # every token summary was scored as its own latent's label and as another's (the shuffle)
    assert {e.text for e in summaries.values()} | {"the letter e"} == scorer.explanations
    assert summary["detection"]["mean"] > llm["detection"]["mean"] and summary["detection"]["mean"] > 0.6
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith(f"  {TOPK}")}
    assert f"  {TOPK}" in out and "token-summary *" in rows["token-summary"] and "*" not in rows["matcher"]
    for name, stats in (("matcher", llm), ("token-summary", summary)):
        beats = stats["beats_shuffled"]
        assert f"{stats['detection']['mean']:.1%}" in rows[name] and rows[name].endswith(
            f"{beats['count']}/{beats['scored']}"
        )
    assert "one-sided exact binomial test at α 0.05" in out


def test_explainer_none_scores_the_token_summaries_alone(tiny_run, monkeypatch, tmp_path):
    import shutil

    from saelab.errors import ConfigError

    run = tmp_path / "train"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock", "*.jsonl", AUTOINTERP_FILE))
    asked = []

    def load(spec, *args, **kwargs):
        asked.append(spec)
        return TokenMatcher()

    monkeypatch.setattr("saelab.analysis.explain_job.load_chat_model", load)
    cfg = ExplainConfig(run=str(run), saes=[TOPK], explainer="none", n_latents=4, n_explain=2, n_score=2, device="cpu")
    summary = explain(cfg, progress=False)[TOPK]
    assert asked == ["smollm2-135m"]  # the scorer only: an empty scorer is the offline model
    assert list(summary["explainers"]) == ["token-summary"] and summary["explainer"] == "token-summary"
    assert not (run / "saes" / TOPK / EXPLANATIONS_FILE).exists()
    assert len(read_explanations(run / "saes" / TOPK / TOKEN_SUMMARIES_FILE)) == 4
    with pytest.raises(ConfigError, match="leaves nothing to explain"):
        ExplainConfig(run=str(run), explainer="none", token_summary=False).validate()
