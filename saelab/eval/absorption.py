"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption").

A latent that reads as "starts with L" may fail to fire on some L-words because a more specific
latent ("the word lion") has absorbed the direction. Measured, per letter L, on the model's
single-token words (vocabulary tokens that are a space and 2+ ASCII letters; a random sample of
them), each run as BOS + word and read at the word:

1. a linear probe for "starts with L" on the residual x (logistic regression, balanced classes),
   fitted on 80 % of the words; its unit direction p (in x's space, before standardising);
2. the main latent: the one whose mean activation rises most on L-words (the 1-sparse probe's pick,
   `saelab.eval.probing.top_latents`) on the same fitting words;
3. on the held-out L-words the probe gets right (true positives), the main latent's misses
   (activation 0), and of those the absorbed: some other firing latent j whose decoder direction is
   aligned with the probe, cos(d_j, p) ≥ `COS_THRESHOLD`, carries at least `FRACTION_THRESHOLD` of
   the probe's reading of the reconstruction, z_j (d_j · p) ≥ 0.4 Σ_i z_i (d_i · p) over the firing
   latents (SAEBench's thresholds; the paper compares with the model's own projection).

    absorption rate(L) = absorbed / true positives

reported per letter and as the mean over letters with at least `MIN_TRUE_POSITIVES` true positives.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm, trange
from transformer_lens.model_bridge import TransformerBridge

from saelab.errors import SaelabError
from saelab.eval.probing import TEST_FRACTION, logistic_probe, top_latents
from saelab.harvest.activations import activations
from saelab.models import parse_hook
from saelab.sae.base import SparseAutoencoder

COS_THRESHOLD = 0.025
FRACTION_THRESHOLD = 0.4
MIN_TRUE_POSITIVES = 10
_WORD = re.compile(r"^ [A-Za-z]{2,}$")


@dataclass
class LetterAbsorption:
    letter: str
    n_true_positives: int
    probe_accuracy: float  # on the held-out words, all letters (balanced classes would hide misses)
    main_latent: int
    main_misses: int  # true positives where the main latent is 0
    absorbed: int

    @property
    def rate(self) -> float | None:
        return self.absorbed / self.n_true_positives if self.n_true_positives else None


def single_token_words(tokenizer, max_words: int | None = None, seed: int = 0) -> list[tuple[int, str]]:  # noqa: ANN001
    """(token id, word) for the vocabulary tokens that decode to a space and 2+ ASCII letters; a random
    `max_words` of them (in id order) when there are more."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if _WORD.match(text):
            words.append((token_id, text[1:]))
    if not words:
        raise SaelabError("the tokenizer has no single-token words (a space and letters); absorption needs them")
    if max_words is not None and len(words) > max_words:
        chosen = np.random.default_rng(seed).choice(len(words), max_words, replace=False)
        words = [words[i] for i in sorted(chosen)]
    return words


def word_activations(
    model: TransformerBridge, hook: str, token_ids: list[int], progress: bool = True, batch_size: int = 512
) -> torch.Tensor:
    """x at `hook` for each word run as BOS + word, read at the word: `[n_words, d_model]`."""
    point = parse_hook(hook, model.cfg.n_layers)
    device = next(model.parameters()).device
    bos = model.tokenizer.bos_token_id
    rows = []
    for start in trange(0, len(token_ids), batch_size, desc=f"words at {hook}", unit="batch", disable=not progress):
        words = torch.tensor(token_ids[start : start + batch_size], device=device)
        batch = torch.stack([torch.full_like(words, bos), words], dim=1)
        rows.append(activations(model, batch, [point])[hook][:, 1].float().cpu())
    return torch.cat(rows)


def absorbed(
    latents: torch.Tensor, decoder: torch.Tensor, direction: torch.Tensor, main: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows `latents: [n, d_sae]` (decoder rows `[d_sae, d]`, unit probe `direction: [d]`): whether the
    main latent misses, and whether another latent absorbs the direction (see the module docstring)."""
    misses = latents[:, main] <= 0
    along = decoder @ direction  # d_i · p
    aligned = along / decoder.norm(dim=1).clamp_min(1e-12) >= COS_THRESHOLD
    readings = latents.clamp_min(0) * along  # z_i (d_i · p); 0 where a latent does not fire
    total = readings.sum(dim=1)
    aligned[main] = False
    best = torch.where(aligned, readings, torch.zeros_like(readings)).max(dim=1).values
    found = misses & (total > 0) & (best > 0) & (best >= FRACTION_THRESHOLD * total)
    return misses, found


def letter_probe(x: np.ndarray, starts: np.ndarray) -> tuple[Pipeline, np.ndarray]:
    """A balanced logistic regression for `starts` on `x` (standardised), and its unit direction in x's space."""
    probe = logistic_probe(balanced=True).fit(x, starts)
    direction = probe[-1].coef_[0] / probe[0].scale_
    return probe, direction / np.linalg.norm(direction)


@dataclass
class LetterProbes:
    """The first-letter probes of one hook's word activations, shared by every SAE that reads it."""

    letters: np.ndarray  # each word's first letter, lower case
    train: np.ndarray  # word indices the probes (and main latents) are fitted on
    test: np.ndarray
    directions: dict[str, np.ndarray]  # letter → the probe's unit direction in x's space
    predicted: dict[str, np.ndarray]  # letter → the probe's verdicts on the test words


def fit_letter_probes(x: torch.Tensor, words: list[str], seed: int = 0) -> LetterProbes:
    """A "starts with L" probe per letter that both sides of an 80/20 split of the words have."""
    rng = np.random.default_rng(seed)
    letters = np.array([word[0].lower() for word in words])
    order = rng.permutation(len(words))
    n_test = round(TEST_FRACTION * len(words))
    test, train = order[:n_test], order[n_test:]
    xn = x.numpy()
    directions, predicted = {}, {}
    for letter in tqdm(string.ascii_lowercase, desc="first-letter probes", unit="letter", leave=False):
        starts = letters == letter
        if starts[train].sum() < 2 or starts[test].sum() == 0:
            continue
        probe, directions[letter] = letter_probe(xn[train], starts[train])
        predicted[letter] = probe.predict(xn[test]).astype(bool)
    return LetterProbes(letters, train, test, directions, predicted)


def absorption(x: torch.Tensor, probes: LetterProbes, sae: SparseAutoencoder) -> list[LetterAbsorption]:
    """Per probed letter, the absorption counts of `sae` on the word activations `x` (see the module docstring)."""
    z = sae.encode_rows(x)
    decoder = sae.W_dec.detach().float().cpu()
    found = []
    for letter, direction in probes.directions.items():
        starts = probes.letters == letter
        predicted = probes.predicted[letter]
        main = int(top_latents(z[probes.train].numpy(), starts[probes.train].astype(int), 1)[0])
        positives = probes.test[predicted & starts[probes.test]]
        misses, taken = absorbed(z[positives], decoder, torch.from_numpy(direction).float(), main)
        accuracy = float((predicted == starts[probes.test]).mean())
        found.append(LetterAbsorption(letter, len(positives), accuracy, main, int(misses.sum()), int(taken.sum())))
    return found


def absorption_summary(letters: list[LetterAbsorption]) -> dict:
    """The per-letter table (with rates) and the mean rate over letters with enough true positives."""
    counted = [row for row in letters if row.n_true_positives >= MIN_TRUE_POSITIVES]
    return {
        "mean_absorption_rate": float(np.mean([row.rate for row in counted])) if counted else None,
        "mean_main_miss_rate": float(np.mean([row.main_misses / row.n_true_positives for row in counted]))
        if counted
        else None,
        "letters": [asdict(row) | {"rate": row.rate} for row in letters],
        "thresholds": {"cos": COS_THRESHOLD, "fraction": FRACTION_THRESHOLD, "min_true_positives": MIN_TRUE_POSITIVES},
    }
