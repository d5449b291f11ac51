"""Sparse probing: can a few of an SAE's latents tell a concept apart as well as the whole residual stream?

For each binary concept (`saelab.eval.concepts`: keyword, name, string, comment, number, operator,
docstring, prose), on tokens of held-out text:

    dense probe    logistic regression on the raw activations x (standardised)
    k-sparse probe the k latents with the largest |mean(z | concept) − mean(z | not)| on the training
                   tokens, then logistic regression on those k latents alone (SAEBench; Gao et al. 2024)

Each concept's tokens are balanced (as many positives as negatives, at most `max_per_class` each)
and split by context, 80 % to fit and 20 % to test, so no test token shares a context with a
training one. Accuracy is on the test tokens; 0.5 is chance. Latent choice and fits see only the
training tokens. The logistic regressions are scikit-learn's (L2, C = 1, lbfgs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from saelab.eval.concepts import CONCEPTS, LabelledContext
from saelab.harvest.activations import activations
from saelab.models import parse_hook

TEST_FRACTION = 0.2
DEFAULT_KS = (1, 2, 5, 20)


@dataclass
class ConceptTokens:
    """Activations of labelled tokens: `x: [n, d_model]`; per concept `labels[c]: [n]` (1, 0, −1 = unlabelled);
    `contexts: [n]`, the context each token came from."""

    x: torch.Tensor
    labels: dict[str, torch.Tensor]
    contexts: torch.Tensor


def concept_tokens(
    model: TransformerBridge,
    hook: str,
    contexts: Sequence[LabelledContext],
    first_position: int = 1,
    progress: bool = True,
) -> ConceptTokens:
    """Run each context up to `hook` and keep the activations of its positions ≥ `first_position`."""
    point = parse_hook(hook, model.cfg.n_layers)
    device = next(model.parameters()).device
    rows, labels, owners = [], {c: [] for c in CONCEPTS}, []
    bar = tqdm(contexts, desc=f"concept tokens at {hook}", unit="context", disable=not progress)
    for index, context in enumerate(bar):
        tokens = torch.tensor([context.token_ids], device=device)
        x = activations(model, tokens, [point])[hook][0, first_position:].float().cpu()
        rows.append(x)
        owners.append(torch.full((len(x),), index))
        for concept in CONCEPTS:
            values = context.labels[concept][first_position:]
            labels[concept].append(torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.int8))
    return ConceptTokens(torch.cat(rows), {c: torch.cat(v) for c, v in labels.items()}, torch.cat(owners))


def balanced_split(
    labels: torch.Tensor, contexts: torch.Tensor, max_per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Train and test row indices: labelled rows, as many positive as negative (≤ `max_per_class` each),
    split by context. None when either class is missing from either side."""
    rng = np.random.default_rng(seed)
    owners = np.unique(contexts[labels >= 0].numpy())
    test_contexts = rng.choice(owners, size=max(1, round(TEST_FRACTION * len(owners))), replace=False)
    in_test = np.isin(contexts.numpy(), test_contexts)
    sides = []
    for side in (~in_test, in_test):
        positive = np.flatnonzero(side & (labels.numpy() == 1))
        negative = np.flatnonzero(side & (labels.numpy() == 0))
        n = min(len(positive), len(negative), max_per_class)
        if n == 0:
            return None
        sides.append(np.concatenate([rng.choice(positive, n, replace=False), rng.choice(negative, n, replace=False)]))
    return sides[0], sides[1]


def logistic_probe(balanced: bool = False) -> Pipeline:
    """An unfitted probe: standardise, then an L2 logistic regression (classes reweighted when `balanced`)."""
    weights = "balanced" if balanced else None
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight=weights))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression fitted on `features[train]` (standardised)."""
    probe = logistic_probe().fit(features[train], labels[train])
    return float(probe.score(features[test], labels[test]))


def top_latents(latents: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The `k` latents whose mean activation differs most between the positive and negative rows."""
    difference = latents[labels == 1].mean(axis=0) - latents[labels == 0].mean(axis=0)
    return np.argsort(-np.abs(difference), kind="stable")[:k]


def sparse_probing(
    data: ConceptTokens,
    latents: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    max_per_class: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float | int]]:
    """Per concept: the dense probe's accuracy, each k-sparse probe's (`k1`, `k5`…), and the token counts."""
    x, z = data.x.numpy(), latents.float().numpy()
    results = {}
    for concept, labels in data.labels.items():
        split = balanced_split(labels, data.contexts, max_per_class, seed)
        if split is None:
            continue
        train, test = split
        y = labels.numpy().astype(np.int64)
        found: dict[str, float | int] = {"dense": probe_accuracy(x, y, train, test)}
        for k in ks:
            chosen = top_latents(z[train], y[train], k)
            found[f"k{k}"] = probe_accuracy(z[:, chosen], y, train, test)
        results[concept] = found | {"n_train": len(train), "n_test": len(test)}
    return results


def summary(results: dict[str, dict[str, float | int]], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean accuracy over the concepts: `dense`, `k1`, `k5`…"""
    keys = ["dense", *(f"k{k}" for k in ks)]
    return {key: float(np.mean([found[key] for found in results.values()])) for key in keys if results}
