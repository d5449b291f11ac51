"""Automated explanations of latents, scored by how well they predict where a latent fires (`saelab explain`).

Per latent, from its feature-store page:

1. **Explain.** The explainer reads the first `n_explain` top-activating contexts, the tokens where
   the latent fires marked `<<like this>>`, and names what they share in one short phrase.
2. **Detection.** The scorer gets the explanation and a context, unmarked, and is asked whether the
   feature fires in it: `n_score` held-out activating contexts (the rest of the top contexts and the
   quantile samples) and `n_score` non-activating ones (other latents' contexts where this latent is
   0 at every token, checked by encoding the activation store's rows with the SAE).
3. **Fuzzing.** The scorer gets `n_score` held-out activating contexts with marks, half of them on
   the tokens where the latent fires and half on as many random other tokens, and is asked whether
   the marks fit the explanation.

The scorer's P(yes) ranks a latent's examples; the top half are called positive, and the balanced
accuracy of those calls is the score (0.5 is chance; a ranking needs no calibration, and weak
scorers that say yes to everything still rank). Each latent is scored with its own explanation and
with another latent's (a random derangement of the explained latents): an explanation counts only
where it beats the shuffle. The run's means come with a bootstrap 95 % interval over latents, and each
latent's label is tested against the shuffled control (`label_test`).

Beside the LLM's explanation, every latent gets a deterministic token summary (`token_summary`: the
tokens it fires on in the same top contexts, and the tokens it promotes), scored by the same scorer on
the same examples against the same shuffle, so a weak offline LLM is measured against a baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saelab.analysis.chat_models import ChatModel
from saelab.analysis.explanations import Explanation, append_record, read_explanations
from saelab.analysis.feature_store import ContextWindow, FeaturePage, FeatureStore
from saelab.analysis.label_test import ALPHA, chance_rate, tested
from saelab.analysis.token_summary import EXPLAINER as TOKEN_SUMMARY
from saelab.analysis.token_summary import token_summary
from saelab.harvest.store import ActivationStore
from saelab.sae.base import SparseAutoencoder

MAX_EXPLANATION_CHARS = 200
SCORE_KEYS = ("detection", "detection_shuffled", "fuzzing", "fuzzing_shuffled")


def window_text(window: ContextWindow, marks: set[int] | None = None) -> str:
    """The window's text (tokens the store holds no row for, e.g. the BOS, left out), tokens at `marks` in << >>."""
    marks = marks or set()
    return "".join(
        f"<<{token}>>" if i in marks else token
        for i, (token, value) in enumerate(zip(window.tokens, window.activations, strict=True))
        if value is not None
    )


def firing(window: ContextWindow) -> set[int]:
    return {i for i, value in enumerate(window.activations) if value}


def explain_prompt(windows: list[ContextWindow]) -> str:
    excerpts = "\n".join(f"{n}. {window_text(w, firing(w))}" for n, w in enumerate(windows, 1))
    return (
        "Here are excerpts of text. In each, the tokens inside << >> are where one feature of a language "
        f"model is active.\n\n{excerpts}\n\nWhat does this feature detect? Reply with one short phrase."
    )


def detection_prompt(explanation: str, window: ContextWindow) -> str:
    return (
        f'A feature of a language model fires on: "{explanation}".\n\nText: {window_text(window)}\n\n'
        "Does the feature fire anywhere in this text? Answer Yes or No."
    )


def fuzzing_prompt(explanation: str, window: ContextWindow, marks: set[int]) -> str:
    return (
        f'A feature of a language model fires on: "{explanation}".\n\nIn this text, the tokens inside << >> '
        f"are marked as the ones it fires on:\n{window_text(window, marks)}\n\nAre the marks correct? Answer Yes or No."
    )


def first_line(answer: str) -> str:
    """An explainer's answer as one explanation: its first non-empty line, unquoted, at most 200 characters."""
    line = next((line.strip() for line in answer.splitlines() if line.strip()), "")
    return line.strip("\"'` ").rstrip(".")[:MAX_EXPLANATION_CHARS]


def ranked_balanced_accuracy(scores: list[float], truth: list[bool]) -> float:
    """Balanced accuracy when the top half of `scores` (ties: first come first) are called positive."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    called = set(order[: len(scores) // 2])
    positives = [i for i, t in enumerate(truth) if t]
    negatives = [i for i, t in enumerate(truth) if not t]
    hit = sum(i in called for i in positives) / len(positives)
    rejected = sum(i not in called for i in negatives) / len(negatives)
    return (hit + rejected) / 2


def bootstrap_interval(values: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the mean of `values` resampled with replacement `n` times."""
    rng = np.random.default_rng(seed)
    means = rng.choice(np.asarray(values), size=(n, len(values)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class Examples:
    """One latent's held-out scoring examples, the same for its own explanation and the shuffled one."""

    detection: list[tuple[ContextWindow, bool]]  # (context, the latent fires in it)
    fuzzing: list[tuple[ContextWindow, set[int], bool]]  # (context, marks, the marks are the true ones)


class NonFiringPool:
    """Other latents' top contexts, to draw contexts from where a given latent never fires."""

    def __init__(self, store: FeatureStore, activations: ActivationStore, sae: SparseAutoencoder, seed: int) -> None:
        rng = random.Random(seed)
        others = rng.sample(range(store.n_latents), min(64, store.n_latents))
        self.windows = [w for j in others for w in store.feature(j).top_contexts[:8]]
        rng.shuffle(self.windows)
        self.activations, self.sae = activations, sae
        self.first = activations.manifest.first_position

    def draw(self, latent: int, n: int, rng: random.Random) -> list[ContextWindow]:
        """Up to `n` pool contexts where `latent` is 0 at every token the store holds."""
        found = []
        for window in rng.sample(self.windows, len(self.windows)):
            if len(found) == n:
                break
            if self._silent(latent, window):
                found.append(window)
        return found

    def _silent(self, latent: int, window: ContextWindow) -> bool:
        rows = self.activations.context_rows(window.context)
        held = [p - self.first for p in range(window.start, window.start + len(window.tokens)) if p >= self.first]
        z = self.sae.encode_rows(self.activations.rows(rows[held]))[:, latent]
        return bool((z <= 0).all())


def scoring_examples(page: FeaturePage, pool: NonFiringPool, n_explain: int, n_score: int, seed: int) -> Examples:
    rng = random.Random(seed * 1_000_003 + page.index)
    held_out = page.top_contexts[n_explain:] + [w for band in page.quantile_bands for w in band.contexts]
    active = rng.sample(held_out, min(n_score, len(held_out)))
    silent = pool.draw(page.index, len(active), rng)
    detection = [(w, True) for w in active[: len(silent)]] + [(w, False) for w in silent]
    fuzzing = []
    for n, window in enumerate(active):
        true_marks = firing(window)
        if n % 2 == 0:
            fuzzing.append((window, true_marks, True))
        else:
            others = [i for i, v in enumerate(window.activations) if v is not None and i not in true_marks]
            fuzzing.append((window, set(rng.sample(others, min(len(true_marks), len(others)))), False))
    return Examples(detection, fuzzing)


def score(scorer: ChatModel, explanation: str, examples: Examples) -> tuple[float | None, float | None]:
    """Detection and fuzzing balanced accuracy of `explanation` on `examples` (None: too few examples)."""
    detection = [(detection_prompt(explanation, w), fires) for w, fires in examples.detection]
    fuzzing = [(fuzzing_prompt(explanation, w, marks), right) for w, marks, right in examples.fuzzing]
    return _judged(scorer, detection), _judged(scorer, fuzzing)


def _judged(scorer: ChatModel, questions: list[tuple[str, bool]]) -> float | None:
    """The ranked balanced accuracy of the scorer's P(yes) on (prompt, truth) pairs; None without both classes."""
    truth = [t for _, t in questions]
    if all(truth) or not any(truth):
        return None
    return ranked_balanced_accuracy(scorer.yes_probabilities([prompt for prompt, _ in questions]), truth)


def derangement(latents: list[int], seed: int) -> dict[int, int]:
    """Each latent → another latent of the list (a random cycle, so none keeps its own)."""
    order = random.Random(seed).sample(latents, len(latents))
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


def explain_latents(
    path: Path, store: FeatureStore, latents: list[int], explainer: ChatModel, n_explain: int, progress: bool
) -> dict[int, Explanation]:
    """Explain the latents `path` has no explanation for yet, appending each; returns the file's contents."""
    done = read_explanations(path)
    todo = [latent for latent in latents if not (latent in done and done[latent].text)]
    for latent in tqdm(todo, desc="explain", unit="latent", disable=not progress):
        page = store.feature(latent)
        answer = explainer.complete(explain_prompt(page.top_contexts[:n_explain]))
        record = {"latent": latent, "explanation": first_line(answer) or "(none)", "explainer": explainer.name}
        append_record(path, record)
    return read_explanations(path)


def score_latents(
    path: Path,
    store: FeatureStore,
    latents: list[int],
    scorer: ChatModel,
    pool: NonFiringPool,
    settings: dict[str, Any],
    progress: bool,
) -> dict[int, Explanation]:
    """Score the explained `latents` not yet scored, against their own and a shuffled explanation."""
    explained = read_explanations(path)
    shuffled = derangement(latents, settings["seed"])
    todo = [latent for latent in latents if not explained[latent].scores]
    for latent in tqdm(todo, desc="score", unit="latent", disable=not progress):
        page = store.feature(latent)
        examples = scoring_examples(page, pool, settings["n_explain"], settings["n_score"], settings["seed"])
        own = score(scorer, explained[latent].text, examples)
        other = score(scorer, explained[shuffled[latent]].text, examples)
        scores = dict(zip(SCORE_KEYS, (own[0], other[0], own[1], other[1]), strict=True))
        record = {"latent": latent, "scores": scores, "n_detection": len(examples.detection), "scorer": scorer.name}
        append_record(path, record)
    return read_explanations(path)


def summarize_latents(path: Path, store: FeatureStore, latents: list[int], n_explain: int) -> dict[int, Explanation]:
    """The token-summary explainer's labels (`token_summary`) of the latents `path` has none for yet, from the
    same `n_explain` top contexts an LLM explainer reads; returns the file's contents."""
    done = read_explanations(path)
    for latent in latents:
        if not (latent in done and done[latent].text):
            text = token_summary(store.feature(latent), n_explain) or "(none)"
            append_record(path, {"latent": latent, "explanation": text, "explainer": TOKEN_SUMMARY})
    return read_explanations(path)


def autointerp_summary(explanations: dict[int, Explanation], latents: list[int], seed: int = 0) -> dict[str, Any]:
    """Mean scores over the latents, each with a bootstrap 95 % interval, how many were scored, and how many
    labels beat the shuffled control (`label_test`: a one-sided binomial test at α 0.05)."""
    summary: dict[str, Any] = {"n_latents": len(latents)}
    for key in SCORE_KEYS:
        values = [explanations[i].scores[key] for i in latents if explanations[i].scores.get(key) is not None]
        if values:
            interval = bootstrap_interval(values, seed=seed)
            summary[key] = {"mean": float(np.mean(values)), "ci95": interval, "n": len(values)}
    chosen = {i: explanations[i] for i in latents if i in explanations}
    tests = tested(chosen)
    summary["beats_shuffled"] = {
        "count": sum(test.passed for test in tests.values()),
        "scored": len(tests),
        "chance": chance_rate(chosen.values()),
        "alpha": ALPHA,
    }
    return summary
