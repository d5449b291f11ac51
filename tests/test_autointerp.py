"""Automated explanations: prompts and scores against hand-computed cases, the explanations file's resume
rules, the non-firing contexts against the SAE itself, an OpenAI-compatible endpoint served locally, and
`saelab explain` end to end on the real SmolLM2 (explainer and scorer) on a tiny real run."""

from __future__ import annotations

import json
import threading
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
from saelab.analysis.explanations import append_record, read_explanations, search
from saelab.analysis.feature_store import ContextWindow, FeatureStore
from saelab.harvest.store import ActivationStore
from saelab.run_layout import AUTOINTERP_FILE, EXPLANATIONS_FILE
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
    cfg = ExplainConfig(run=str(run), saes=[TOPK], n_latents=4, n_explain=2, n_score=2, device="cpu")
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
