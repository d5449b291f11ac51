"""Sparse probing and feature absorption: labels against hand-read source, probes on planted and random
concepts, absorption against a hand-computed case, and `saelab probe` end to end on the real SmolLM2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval import tiny_run  # noqa: F401 (the module-scoped run fixture)

from saelab.eval.absorption import COS_THRESHOLD, absorbed, single_token_words
from saelab.eval.concepts import CODE_CONCEPTS, char_labels, label_tokens, labelled_contexts
from saelab.eval.config import ProbeConfig
from saelab.eval.probe_job import probe
from saelab.eval.probing import ConceptTokens, balanced_split, sparse_probing, top_latents
from saelab.run_layout import PROBING_FILE

SOURCE = '''"""Module docstring."""
import os  # a comment


def area(r):
    """Doc."""
    x = "text"
    return 3.14 * r
'''


def labels_at(source: str, fragment: str, nth: int = 0) -> set[str]:
    """The code concepts true at the first character of the `nth` occurrence of `fragment`."""
    index = -1
    for _ in range(nth + 1):
        index = source.index(fragment, index + 1)
    chars = char_labels(source)
    return {concept for concept in CODE_CONCEPTS if chars[concept][index]}


def test_python_tokens_get_their_concepts():
    assert labels_at(SOURCE, '"""Module') == {"string", "docstring"}
    assert labels_at(SOURCE, "import") == {"keyword"}
    assert labels_at(SOURCE, "os") == {"name"}
    assert labels_at(SOURCE, "# a comment") == {"comment"}
    assert labels_at(SOURCE, "def") == {"keyword"}
    assert labels_at(SOURCE, "area") == {"name"}
    assert labels_at(SOURCE, "(") == {"operator"}
    assert labels_at(SOURCE, '"""Doc') == {"string", "docstring"}
    assert labels_at(SOURCE, '"text"') == {"string"}  # assigned, not a statement of its own
    assert labels_at(SOURCE, "3.14") == {"number"}
    assert labels_at(SOURCE, "*") == {"operator"}
    assert labels_at(SOURCE, "    return") == set()  # indentation is nothing


def test_model_tokens_take_the_label_of_their_first_visible_character(smollm2):
    tokenizer = smollm2.tokenizer
    context = label_tokens(SOURCE, True, tokenizer, 200, tokenizer.bos_token_id)
    pieces = [tokenizer.decode([token]) for token in context.token_ids[1:]]
    assert context.token_ids[0] == tokenizer.bos_token_id and all(v[0] is None for v in context.labels.values())
    got = {piece: {c for c in CODE_CONCEPTS if context.labels[c][i + 1]} for i, piece in enumerate(pieces)}
    assert got[" return"] == {"keyword"} and got[" area"] == {"name"} and got[" *"] == {"operator"}
    assert all(label is False for label in context.labels["prose"][1:])
    prose = label_tokens("The assert statement.", False, tokenizer, 200, tokenizer.bos_token_id)
    assert all(prose.labels["prose"][1:]) and all(label is None for label in prose.labels["keyword"])


def test_labelled_contexts_come_from_the_corpus_end_with_every_concept(smollm2):
    contexts = labelled_contexts(smollm2.tokenizer, n_code=24, n_prose=8)
    assert sum(c.source.startswith("file:") for c in contexts) == 24 and len(contexts) == 32
    for concept in (*CODE_CONCEPTS, "prose"):
        values = [v for c in contexts for v in c.labels[concept] if v is not None]
        assert 0 < sum(values) < len(values), concept


def planted(n: int = 2000, seed: int = 0) -> tuple[ConceptTokens, torch.Tensor]:
    """Random activations and latents; concept `planted` is carried by latent 7 and x's first dimension,
    concept `random` by nothing."""
    generator = torch.Generator().manual_seed(seed)
    planted_labels = torch.randint(0, 2, (n,), generator=generator)
    random_labels = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 16, generator=generator)
    x[:, 0] += 4 * planted_labels
    latents = torch.rand(n, 32, generator=generator)
    latents[:, 7] = 3 * planted_labels + 0.1 * torch.rand(n, generator=generator)
    labels = {"planted": planted_labels.to(torch.int8), "random": random_labels.to(torch.int8)}
    return ConceptTokens(x, labels, torch.arange(n) // 20), latents


def test_probes_find_a_planted_concept_and_not_a_random_one():
    data, latents = planted()
    results = sparse_probing(data, latents, ks=(1, 5), max_per_class=500)
    assert results["planted"]["k1"] > 0.99 and results["planted"]["dense"] > 0.95
    for key in ("dense", "k1", "k5"):
        assert 0.35 < results["random"][key] < 0.65, (key, results["random"][key])
    assert results["planted"]["n_train"] + results["planted"]["n_test"] <= 2 * 2 * 500


def test_balanced_split_is_balanced_and_keeps_contexts_apart():
    labels = torch.tensor([1, 0, 0, 0, -1] * 40, dtype=torch.int8)
    contexts = torch.arange(200) // 10
    train, test = balanced_split(labels, contexts, max_per_class=1000)
    for side in (train, test):
        assert (labels[side] == 1).sum() == (labels[side] == 0).sum() > 0 and (labels[side] >= 0).all()
    assert not set(contexts[train].tolist()) & set(contexts[test].tolist())
    assert balanced_split(torch.zeros(200, dtype=torch.int8), contexts, 1000) is None  # no positives


def test_top_latents_rank_by_the_absolute_mean_difference():
    z = np.array([[1.0, 0.0, 5.0], [1.0, 2.0, 5.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = np.array([1, 1, 0, 0])
    # mean differences: 1.0, 1.0, 4.5 → latent 2, then 0 (stable), then 1
    assert top_latents(z, y, 2).tolist() == [2, 0]


def test_absorption_equals_a_hand_computed_case():
    direction = torch.tensor([1.0, 0.0, 0.0])
    decoder = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # 0: the main latent
            [0.6, 0.8, 0.0],  # 1: cos 0.6 with the probe
            [0.0, 1.0, 0.0],  # 2: orthogonal
            [0.01, 1.0, 0.0],  # 3: cos 0.01 < COS_THRESHOLD, but a large reading when it fires hard
        ]
    )
    latents = torch.tensor(
        [
            [2.0, 0.0, 0.0, 0.0],  # the main latent fires: no miss
            [0.0, 1.0, 3.0, 0.0],  # miss; latent 1 reads 0.6 of a total 0.6: absorbed
            [0.0, 0.0, 3.0, 0.0],  # miss; nothing reads along the probe (total 0): not absorbed
            [0.0, 0.0, 0.0, 90.0],  # miss; latent 3 reads 0.9, all of it, but its cosine is too small
            [0.0, 1.0, 0.0, 60.0],  # miss; latent 1 reads 0.6 of a total 1.2 (3 reads 0.6, unaligned): absorbed
            [0.0, 0.5, 0.0, 90.0],  # miss; the one aligned reader, latent 1, reads 0.3 of 1.2: too little
        ]
    )
    assert COS_THRESHOLD > 0.01
    misses, found = absorbed(latents, decoder, direction, main=0)
    assert misses.tolist() == [False, True, True, True, True, True]
    assert found.tolist() == [False, True, False, False, True, False]


def test_single_token_words_are_a_space_and_letters(smollm2):
    words = single_token_words(smollm2.tokenizer)
    assert len(words) > 5000
    sample = single_token_words(smollm2.tokenizer, max_words=100, seed=1)
    assert len(sample) == 100 and set(sample) < set(words) and sample == sorted(sample)
    for token_id, word in words[:: len(words) // 50]:
        assert smollm2.tokenizer.decode([token_id]) == " " + word and word.isascii() and word.isalpha()


@pytest.mark.slow
def test_saelab_probe_on_a_real_run_writes_probing_json(smollm2, tiny_run):  # noqa: F811
    small = {"n_code": 12, "n_prose": 4, "ks": [1, 5], "max_per_class": 300, "max_words": 2048}
    cfg = ProbeConfig(run=str(tiny_run), device="cpu", **small)
    results = probe(cfg, model=smollm2, progress=False)
    assert set(results) == {"topk-576-k8", "batchtopk-576-k8"}
    for label, result in results.items():
        assert json.loads((tiny_run / "saes" / label / PROBING_FILE).read_text()) == result
        concepts = result["sparse_probing"]["concepts"]
        assert {"keyword", "string", "prose"} <= set(concepts)
        assert concepts["prose"]["dense"] > 0.75  # prose against code: easy for the residual stream (chance 0.5)
        mean = result["sparse_probing"]["mean"]
        assert 0.5 < mean["k1"] <= 1 and mean["k1"] <= mean["k5"] + 0.05
        absorption = result["absorption"]
        assert len(absorption["letters"]) >= 20 and absorption["n_words"] == 2048
        for row in absorption["letters"]:
            assert 0 <= row["absorbed"] <= row["main_misses"] <= row["n_true_positives"]


def test_saelab_probe_names_a_bad_task_in_one_line(saelab_error):
    line = saelab_error("probe", "tasks=[sparse_probing, autointerp]")
    assert "tasks: ['autointerp']" in line and "sparse_probing, absorption" in line
