"""Does a latent's label beat a shuffled one? A one-sided exact binomial test of its detection calls.

Detection (`saelab.analysis.autointerp`) asks the scorer about n contexts, half where the latent fires
and half where it does not, and calls the top half of its P(yes) positive. With balanced classes the
balanced accuracy is the fraction of the n calls that are right, so a label gets k = accuracy · n right.

The null hypothesis: the label tells the scorer nothing about where this latent fires, so each call is
right with the probability p0 that another latent's label gets (the shuffled control). p0 is pooled over
every shuffled-label detection of the SAE's scored latents (n calls per latent, ~1,200 at the defaults),
because one latent's own shuffled score rests on 12 calls, where 4 or 8 right are common by chance; and
p0 is never below 0.5, what an uninformative ranking gets right on average. A pooled rate above 0.5
means the scorer finds the activating contexts without the label (they look alike, e.g. code), and a
label must beat that too.

A label beats shuffled when P(X ≥ k), X ~ Binomial(n, p0), is below ALPHA = 0.05 (`scipy.stats.binomtest`,
alternative "greater"), and it also got more calls right than the shuffled label did on the same
examples of this latent: where a shuffled label does as well, the contexts give the latent away without
any label (seen on a demo run: "This feature detects and reports the following:" scored 10/12, and so
did another latent's label). At n = 12 and p0 = 0.5 that takes 10 right calls (p = 0.019; 9 give 0.073):
a detection score of at least 83 %. There is no correction for testing many latents: the test says which
labels to show as trusted, and about 1 in 20 uninformative labels still passes, so a run's pass count
means something only well above 5 % of its latents.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scipy.stats import binomtest

from saelab.analysis.explanations import Explanation

ALPHA = 0.05
DEFAULT_CALLS = 12  # 2 × n_score at its default, for explanation files written before n_detection was kept


@dataclass(frozen=True)
class LabelTest:
    correct: int  # right detection calls with the latent's own label
    n: int  # detection calls
    chance: float  # p0: the pooled shuffled-label rate, at least 0.5
    p_value: float
    shuffled_correct: int | None = None  # right calls with a shuffled label on the same examples (None: unscored)

    @property
    def passed(self) -> bool:
        beats_own_shuffle = self.shuffled_correct is None or self.correct > self.shuffled_correct
        return self.p_value < ALPHA and beats_own_shuffle


def chance_rate(explanations: Iterable[Explanation]) -> float:
    """p0: the fraction of right calls over every scored shuffled-label detection, at least 0.5."""
    right = calls = 0.0
    for entry in explanations:
        shuffled = entry.scores.get("detection_shuffled")
        if shuffled is not None:
            n = entry.n_detection or DEFAULT_CALLS
            right, calls = right + shuffled * n, calls + n
    return max(0.5, right / calls) if calls else 0.5


def label_test(entry: Explanation, chance: float) -> LabelTest | None:
    """The test of `entry`'s label against `chance`; None when its detection was not scored."""
    detection = entry.scores.get("detection")
    if detection is None:
        return None
    n = entry.n_detection or DEFAULT_CALLS
    correct = round(detection * n)
    shuffled = entry.scores.get("detection_shuffled")
    p_value = float(binomtest(correct, n, chance, alternative="greater").pvalue)
    return LabelTest(correct, n, chance, p_value, None if shuffled is None else round(shuffled * n))


def tested(explanations: dict[int, Explanation]) -> dict[int, LabelTest]:
    """Every scored label of one explainer's file, tested against that file's pooled shuffled rate."""
    chance = chance_rate(explanations.values())
    return {latent: test for latent, entry in explanations.items() if (test := label_test(entry, chance)) is not None}
