"""Each latent's labels as the dashboard shows them: which to trust, which to grey out, which is the headline.

A latent can have an LLM's explanation (`explanations.jsonl`) and a token summary (`token_summaries.jsonl`,
or, for latents `saelab explain` did not reach, made from the feature store on the spot: unscored). A
label is *trusted* when its detection calls beat the shuffled labels' (`saelab.analysis.label_test`: a
one-sided exact binomial test at α 0.05 against the pooled shuffled rate of its own explainer). The
headline is the trusted label with the highest detection score; a latent with none has no headline, and
its labels are shown greyed out. The browser's table shows the headline, else the token summary (greyed),
so every live latent has something to read and to search by.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from saelab.analysis.config import ExplainConfig
from saelab.analysis.explanations import Explanation
from saelab.analysis.label_test import ALPHA, LabelTest, tested
from saelab.analysis.token_summary import EXPLAINER as TOKEN_SUMMARY
from saelab.analysis.token_summary import summary_text

SUMMARY_CONTEXTS = ExplainConfig().n_explain  # the top contexts a token summary reads, as `saelab explain`'s
WORD = re.compile(r"\s?[A-Za-z]{3,}")  # a token that reads as a word: " file", "import"
PeakTokens = dict[int, tuple[list[str], list[str]]]  # latent → (peak tokens, promoted tokens): FeatureStore.peak_tokens


@dataclass(frozen=True)
class Label:
    latent: int
    text: str
    explainer: str
    detection: float | None = None
    shuffled: float | None = None
    test: LabelTest | None = None  # None: not scored

    @property
    def trusted(self) -> bool:
        return self.test is not None and self.test.passed

    def verdict(self) -> str:
        """The label's standing in a few words: what the greyed ones lack."""
        if self.test is None:
            return "not scored"
        p = f"{self.test.correct}/{self.test.n} right, p = {self.test.p_value:.2g}"
        if self.test.passed:
            return f"beats shuffled ({p})"
        shuffled = self.test.shuffled_correct
        if self.test.p_value < ALPHA and shuffled is not None:  # the test passed, its own shuffle did as well
            return f"not above shuffled ({p}, but a shuffled label got {shuffled}/{self.test.n})"
        return f"not above shuffled ({p})"

    def scores(self) -> str:
        """Its detection score beside the shuffled labels' score on the same examples, when scored."""
        if self.detection is None:
            return "not scored (`saelab explain` scores it)"
        shuffled = "—" if self.shuffled is None else f"{self.shuffled:.0%}"
        return f"detection {self.detection:.0%}, shuffled labels {shuffled}; {self.verdict()}"


class LabelBook:
    """Every latent's labels from an SAE's explanation files (explainer name → its latents' entries) and,
    optionally, every latent's peak and promoted tokens for the token summaries `saelab explain` did not make."""

    def __init__(self, explained: dict[str, dict[int, Explanation]], peak_tokens: PeakTokens | None = None) -> None:
        self.explained = {name: entries for name, entries in explained.items() if entries}
        self.tests = {name: tested(entries) for name, entries in self.explained.items()}
        self.peak_tokens = peak_tokens or {}

    def labels(self, latent: int) -> list[Label]:
        """The latent's labels, trusted ones first, then by detection score (unscored last)."""
        found = [self._label(name, latent) for name, entries in self.explained.items() if latent in entries]
        found = [label for label in found if label.text]
        if not any(label.explainer == TOKEN_SUMMARY for label in found) and latent in self.peak_tokens:
            text = summary_text(*self.peak_tokens[latent])
            if text:
                found.append(Label(latent, text, TOKEN_SUMMARY))
        return sorted(found, key=lambda label: (not label.trusted, -(label.detection or -1.0)))

    def headline(self, latent: int) -> Label | None:
        """The trusted label with the highest detection score; None when no label beats shuffled."""
        labels = self.labels(latent)
        return labels[0] if labels and labels[0].trusted else None

    def shown(self, latent: int) -> Label | None:
        """What the browser's table shows: the headline, else the token summary, else any label."""
        labels = self.labels(latent)
        if not labels or labels[0].trusted:
            return labels[0] if labels else None
        return next((label for label in labels if label.explainer == TOKEN_SUMMARY), labels[0])

    def readable_latent(self) -> int | None:
        """A live latent whose label reads well, for a first look (the steering playground opens on it): the one
        whose headline has the highest detection score; without any headline (no `saelab explain` yet, or no
        label beats shuffled), the one whose top contexts most often peak on the same word of 3+ letters (its
        token summary then says `fires on: " file"`), the more frequently peaking and lower index first."""
        headlines = [
            (label.detection or 0.0, -latent) for latent in self._explained() if (label := self.headline(latent))
        ]
        if headlines:
            return -max(headlines)[1]
        best: tuple[float, int, int] | None = None
        for latent, (fired, _) in self.peak_tokens.items():
            if not fired:
                continue
            token, count = Counter(fired).most_common(1)[0]
            if WORD.fullmatch(token) and (best is None or (count / len(fired), count, -latent) > best):
                best = (count / len(fired), count, -latent)
        return None if best is None else -best[2]

    def search(self, query: str) -> list[int]:
        """The latents one of whose labels holds every word of `query` (case-insensitive), by index."""
        words = query.lower().split()
        latents = set(self.peak_tokens) | self._explained()
        return [
            latent
            for latent in sorted(latents)
            if any(all(word in label.text.lower() for word in words) for label in self.labels(latent))
        ]

    def _explained(self) -> set[int]:
        return {latent for entries in self.explained.values() for latent in entries}

    def _label(self, name: str, latent: int) -> Label:
        entry = self.explained[name][latent]
        scores = entry.scores
        explainer = entry.explainer or name
        test = self.tests[name].get(latent)
        return Label(latent, entry.text, explainer, scores.get("detection"), scores.get("detection_shuffled"), test)
