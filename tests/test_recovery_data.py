"""The synthetic feature-recovery data (known features, known codes) and the recovery metric."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from saelab.errors import ConfigError, SaelabError
from saelab.eval.recovery import (
    SyntheticConfig,
    SyntheticFeatures,
    _bernoulli_process,
    feature_recovery,
    max_cosine,
)

N_ROWS = 2**17


@pytest.fixture(scope="module")
def source() -> SyntheticFeatures:
    return SyntheticFeatures(SyntheticConfig(seed=3))


@pytest.fixture(scope="module")
def sample(source: SyntheticFeatures):
    return source.activations_with_truth(N_ROWS, seed=11)


def _co_firing(sample, n_features: int, first: torch.Tensor, second: torch.Tensor) -> int:
    """Rows in which both first[j] and second[j] fire, summed over j (no feature twice in `first`)."""
    partner = torch.full((n_features,), -1)
    partner[first] = second
    has_partner = partner[sample.features] >= 0
    wanted = sample.rows[has_partner] * n_features + partner[sample.features[has_partner]]
    return torch.isin(wanted, sample.rows * n_features + sample.features).sum().item()


def _within_and_across(source: SyntheticFeatures, sample) -> tuple[int, float, int, float]:
    """Co-firing counts of all within-cluster pairs and of as many cross-cluster pairs, each with its
    expectation under independence."""
    n_features, p = source.cfg.n_features, source.probabilities.double()
    members = torch.argsort(source.cluster, stable=True).view(-1, source.cfg.cluster_size)
    neighbours = members.roll(1, dims=0)  # the next cluster's members
    within = across = 0
    within_independent = across_independent = 0.0
    for a, b in torch.triu_indices(source.cfg.cluster_size, source.cfg.cluster_size, offset=1).T.tolist():
        within += _co_firing(sample, n_features, members[:, a], members[:, b])
        across += _co_firing(sample, n_features, members[:, a], neighbours[:, b])
        within_independent += len(sample.x) * (p[members[:, a]] * p[members[:, b]]).sum().item()
        across_independent += len(sample.x) * (p[members[:, a]] * p[neighbours[:, b]]).sum().item()
    return within, within_independent, across, across_independent


# ---- the features -----------------------------------------------------------------------------


def test_directions_are_unit_rows_fixed_by_the_config_seed(source: SyntheticFeatures) -> None:
    cfg = source.cfg
    assert source.directions.shape == (cfg.n_features, cfg.d_in) and source.d_in == cfg.d_in
    torch.testing.assert_close(source.directions.norm(dim=1), torch.ones(cfg.n_features))
    assert source.directions.abs().min() > 0  # random, not a basis
    torch.testing.assert_close(SyntheticFeatures(SyntheticConfig(seed=3)).directions, source.directions, rtol=0, atol=0)
    assert not torch.allclose(SyntheticFeatures(SyntheticConfig(seed=4)).directions, source.directions)


def test_probabilities_are_log_uniform_most_frequent_first(source: SyntheticFeatures) -> None:
    p = source.probabilities
    assert p[0].item() == pytest.approx(3e-2) and p[-1].item() == pytest.approx(3e-4)
    ratios = p[1:] / p[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (1e-2) ** (1 / 511)))


def test_clusters_and_importances(source: SyntheticFeatures) -> None:
    sizes = torch.bincount(source.cluster)
    assert sizes.tolist() == [4] * 128
    assert source.cluster[:4].unique().numel() > 1  # clusters mix frequency ranks
    log_c = source.importance.log()
    assert abs(log_c.mean().item()) < 0.2 and log_c.std().item() == pytest.approx(1.0, abs=0.15)


# ---- the data --------------------------------------------------------------------------------


def test_empirical_firing_frequencies_match_the_probabilities(source: SyntheticFeatures, sample) -> None:
    counts = torch.bincount(sample.features, minlength=source.cfg.n_features).double()
    expected = N_ROWS * source.probabilities.double()
    z = (counts - expected) / (expected * (1 - source.probabilities.double())).sqrt()
    assert z.abs().max() < 5  # per feature, 512 features
    assert z.mean().abs() < 5 / math.sqrt(len(z))  # and no overall drift
    l0 = len(sample.rows) / N_ROWS
    assert l0 == pytest.approx(source.probabilities.sum().item(), rel=0.02)


def test_the_sparse_sampler_is_an_exact_bernoulli_process() -> None:
    p = torch.tensor([0.0, 0.05, 0.5, 0.9, 1.0], dtype=torch.float64)
    n, repeats = 40, 4000
    generator = torch.Generator().manual_seed(0)
    hits = torch.zeros(len(p), n)
    for _ in range(repeats):
        rows, js = _bernoulli_process(p, n, generator)
        assert ((rows >= 0) & (rows < n)).all()
        assert (js * n + rows).unique().numel() == len(rows)  # each trial at most once
        hits[js, rows] += 1
    rate = hits / repeats  # every row of every j at rate p_j: no edge effects at either end
    sd = (p * (1 - p) / repeats).sqrt()[:, None].float()
    assert ((rate - p[:, None].float()).abs() <= 5 * sd + 1e-9).all()


def test_a_feature_fires_at_most_once_per_row(source: SyntheticFeatures, sample) -> None:
    keys = sample.rows * source.cfg.n_features + sample.features
    assert keys.unique().numel() == keys.numel()


def test_clusters_raise_co_firing_by_the_documented_factor(source: SyntheticFeatures, sample) -> None:
    q, lift = source.cfg.cluster_rate, source.cfg.cluster_lift
    factor = q * lift**2 + (1 - q * lift) ** 2 / (1 - q)
    assert factor > 5  # the defaults make correlation clearly visible
    within, within_independent, across, across_independent = _within_and_across(source, sample)
    expected = within_independent * factor
    assert within == pytest.approx(expected, rel=5 / math.sqrt(expected))
    # Features in different clusters fire independently.
    assert across == pytest.approx(across_independent, rel=5 / math.sqrt(across_independent))


def test_without_clusters_features_are_independent() -> None:
    source = SyntheticFeatures(SyntheticConfig(cluster_lift=1.0, seed=5))
    within, within_independent, _, _ = _within_and_across(source, source.activations_with_truth(N_ROWS, seed=0))
    assert within == pytest.approx(within_independent, rel=5 / math.sqrt(within_independent))


def test_magnitudes_are_folded_normal(source: SyntheticFeatures, sample) -> None:
    m = sample.magnitudes
    assert (m > 0).all() and m.dtype == torch.float32
    assert m.mean().item() == pytest.approx(1.0, abs=0.005)  # |N(1, 0.25)| is N(1, 0.25) up to 3e-5
    assert m.std().item() == pytest.approx(0.25, abs=0.005)


def test_x_is_the_codes_times_the_directions_plus_small_noise(source: SyntheticFeatures, sample) -> None:
    codes = sample.codes()
    assert codes.shape == (N_ROWS, 512) and (codes > 0).sum().item() == len(sample.rows)
    assert sample.x.dtype == torch.float32 and sample.x.shape == (N_ROWS, 64)
    residual = sample.x - codes @ source.directions
    assert residual.std().item() == pytest.approx(0.01, rel=0.01)
    assert residual.mean().abs().item() < 1e-4
    assert sample.x.norm(dim=1).mean() > 1  # the signal dominates

    quiet = SyntheticFeatures(dataclasses.replace(source.cfg, noise_std=0.0)).activations_with_truth(4096, seed=1)
    torch.testing.assert_close(quiet.x, quiet.codes() @ source.directions, atol=1e-5, rtol=1e-5)


def test_gradients_follow_the_documented_formula(source: SyntheticFeatures, sample) -> None:
    active = (sample.codes() > 0).float()
    residual = sample.gradient - active @ (source.importance[:, None] * source.directions)
    assert residual.std().item() == pytest.approx(source.cfg.gradient_noise_std, rel=0.01)
    assert residual.mean().abs().item() < 1e-4
    # In a row with one active feature f, d_f · g is c_f up to the noise: the importance shows through g.
    counts = torch.bincount(sample.rows, minlength=N_ROWS)
    alone = counts[sample.rows] == 1
    rows, features = sample.rows[alone], sample.features[alone]
    assert len(rows) > 1000
    projected = (source.directions[features] * sample.gradient[rows]).sum(dim=1)
    torch.testing.assert_close(projected, source.importance[features], atol=0.06, rtol=0)


# ---- the batch source ------------------------------------------------------------------------


def test_batches_form_one_epoch_of_float32_rows() -> None:
    source = SyntheticFeatures(SyntheticConfig(n_rows=10_000, seed=1))
    assert source.n_batches(1024) == 9
    epoch = list(source.batches(1024, seed=0))
    assert len(epoch) == 9
    for x, g in epoch:
        assert x.shape == (1024, 64) and x.dtype == torch.float32 and g is None
        assert x.abs().sum() > 0
    with pytest.raises(SaelabError):
        source.batches(1024, seed=0, start_batch=-1)


def test_same_seed_gives_identical_batches_and_different_seeds_differ() -> None:
    cfg = SyntheticConfig(n_rows=8192, seed=2)
    one = list(SyntheticFeatures(cfg).batches(1024, seed=7))
    two = list(SyntheticFeatures(cfg).batches(1024, seed=7))
    for (x1, _), (x2, _) in zip(one, two, strict=True):
        assert torch.equal(x1, x2)
    other_seed = list(SyntheticFeatures(cfg).batches(1024, seed=8))
    other_config = list(SyntheticFeatures(dataclasses.replace(cfg, seed=3)).batches(1024, seed=7))
    assert not any(torch.allclose(a, b) for (a, _), (b, _) in zip(one, other_seed, strict=True))
    assert not any(torch.allclose(a, b) for (a, _), (b, _) in zip(one, other_config, strict=True))
    assert not torch.allclose(one[0][0], one[1][0])  # and batches within an epoch differ


def test_start_batch_gives_the_tail_of_the_epoch() -> None:
    source = SyntheticFeatures(SyntheticConfig(n_rows=8192, seed=2))
    full = list(source.batches(1024, seed=4, with_gradients=True))
    tail = list(source.batches(1024, seed=4, start_batch=5, with_gradients=True))
    assert len(tail) == 3
    for (x, g), (x_full, g_full) in zip(tail, full[5:], strict=True):
        assert torch.equal(x, x_full) and torch.equal(g, g_full)
    assert list(source.batches(1024, seed=4, start_batch=8)) == []


def test_gradients_only_when_asked_and_x_does_not_change(source: SyntheticFeatures) -> None:
    small = SyntheticFeatures(dataclasses.replace(source.cfg, n_rows=4096))
    plain = list(small.batches(1024, seed=9))
    with_g = list(small.batches(1024, seed=9, with_gradients=True))
    assert all(g is None for _, g in plain)
    for (x, _), (x_g, g) in zip(plain, with_g, strict=True):
        assert torch.equal(x, x_g)
        assert g is not None and g.shape == x.shape and g.dtype == torch.float32
        assert not torch.allclose(g, x)


def test_batch_i_is_activations_with_truth_for_batch_i(source: SyntheticFeatures) -> None:
    small = SyntheticFeatures(dataclasses.replace(source.cfg, n_rows=4096))
    for i, (x, g) in enumerate(small.batches(1024, seed=6, with_gradients=True)):
        truth = small.activations_with_truth(1024, seed=6, batch=i)
        assert torch.equal(x, truth.x) and torch.equal(g, truth.gradient)


@pytest.mark.parametrize(
    "change",
    [
        {"n_features": 0},
        {"freq_min": 0.1, "freq_max": 0.01},
        {"cluster_rate": 0.0},
        {"cluster_lift": 0.5},
        {"cluster_lift": 40.0},  # × freq_max 3e-2 > 1
        {"cluster_rate": 0.1},  # × cluster_lift 20 > 1
        {"noise_std": -1.0},
    ],
)
def test_impossible_configs_are_refused(change: dict) -> None:
    with pytest.raises(ConfigError):
        SyntheticFeatures(SyntheticConfig(**change))


def test_partial_last_cluster_and_generic_sizes() -> None:
    source = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=30, cluster_size=7, seed=8))
    assert torch.bincount(source.cluster).tolist() == [7, 7, 7, 7, 2]
    sample = source.activations_with_truth(4096, seed=0)
    assert sample.features.max() < 30
    torch.testing.assert_close(sample.x, sample.codes() @ source.directions, atol=0.06, rtol=0)


# ---- the recovery metric ---------------------------------------------------------------------


def test_recovery_is_complete_when_the_decoder_holds_the_true_directions() -> None:
    torch.manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(96, 32), dim=1)
    scaled = true[torch.randperm(96)] * torch.rand(96, 1).add(0.1) * 5
    decoder = torch.cat([torch.randn(40, 32), scaled])[torch.randperm(136)]
    result = feature_recovery(true, decoder)
    for band in ("", "_frequent", "_middle", "_rare"):
        assert result[f"recovered{band}"] == 1.0
        assert result[f"mean_max_cos{band}"] == pytest.approx(1.0, abs=1e-5)


def test_random_decoder_recovers_nothing_in_high_dimension() -> None:
    torch.manual_seed(1)
    true = torch.randn(64, 512)
    result = feature_recovery(true, torch.randn(1024, 512))
    assert result["recovered"] == 0.0 and result["mean_max_cos"] < 0.3


def test_bands_split_by_frequency() -> None:
    torch.manual_seed(2)
    true = torch.nn.functional.normalize(torch.randn(30, 256), dim=1)
    # Only the first ten rows (the most frequent, by the default ordering) are in the decoder.
    result = feature_recovery(true, torch.cat([true[:10], torch.randn(50, 256)]))
    assert result["recovered_frequent"] == 1.0 and result["recovered_middle"] == 0.0 and result["recovered_rare"] == 0.0
    assert result["recovered"] == pytest.approx(1 / 3)
    # Explicit frequencies that make rows 20..29 the most frequent move them to the frequent band.
    frequencies = torch.cat([torch.full((10,), 0.001), torch.full((10,), 0.01), torch.full((10,), 0.1)])
    flipped = feature_recovery(true, torch.cat([true[:10], torch.randn(50, 256)]), frequencies=frequencies)
    assert flipped["recovered_rare"] == 1.0 and flipped["recovered_frequent"] == 0.0


def test_recovery_matches_a_brute_force_loop() -> None:
    torch.manual_seed(3)
    true = torch.randn(13, 6)
    decoder = torch.cat([true[:5] + 0.3 * torch.randn(5, 6), torch.randn(7, 6)]) * 3
    frequencies = torch.rand(13)
    threshold = 0.8
    best = []
    for t in true.tolist():
        cosines = []
        for d in decoder.tolist():
            dot = sum(a * b for a, b in zip(t, d, strict=True))
            cosines.append(dot / math.sqrt(sum(a * a for a in t)) / math.sqrt(sum(b * b for b in d)))
        best.append(max(cosines))
    torch.testing.assert_close(max_cosine(true, decoder), torch.tensor(best), atol=1e-5, rtol=0)

    ranked = sorted(range(13), key=lambda f: -frequencies[f].item())
    bands = {"frequent": ranked[:5], "middle": ranked[5:9], "rare": ranked[9:]}  # tensor_split of 13: 5, 4, 4
    result = feature_recovery(true, decoder, threshold=threshold, frequencies=frequencies)
    assert 0 < result["recovered"] < 1  # the case exercises both sides of the threshold
    assert result["recovered"] == pytest.approx(sum(b > threshold for b in best) / 13)
    assert result["mean_max_cos"] == pytest.approx(sum(best) / 13, abs=1e-5)
    for band, members in bands.items():
        assert result[f"recovered_{band}"] == pytest.approx(sum(best[f] > threshold for f in members) / len(members))
        assert result[f"mean_max_cos_{band}"] == pytest.approx(sum(best[f] for f in members) / len(members), abs=1e-5)


def test_recovery_is_signed_and_checks_dimensions() -> None:
    torch.manual_seed(4)
    true = torch.randn(8, 64)
    assert feature_recovery(true, -true)["recovered"] == 0.0  # an anti-parallel row is not the feature
    with pytest.raises(SaelabError):
        feature_recovery(true, torch.randn(8, 32))


# ---- the mixed-sparsity toy of GBA's recovery table ----------------------------------------------


def test_mixed_sparsity_rows_have_one_of_the_sparsities_and_equal_feature_frequencies():
    from saelab.eval.mixed_sparsity import MixedSparsityConfig, MixedSparsityFeatures

    data = MixedSparsityFeatures(MixedSparsityConfig(n_rows=4096))
    x, codes = data.sample(20_000, torch.Generator().manual_seed(1))
    active = (codes > 0).sum(1)
    assert set(active.unique().tolist()) == {3, 20}
    assert abs((active == 3).float().mean().item() - 0.5) < 0.02
    combination = codes @ data.directions
    assert torch.allclose(x, combination / combination.norm(dim=1, keepdim=True), atol=1e-5)  # unit rows
    raw = MixedSparsityFeatures(MixedSparsityConfig(n_rows=4096, unit_rows=False))
    assert torch.allclose(raw.sample(20_000, torch.Generator().manual_seed(1))[0], combination, atol=1e-5)
    frequency = (codes > 0).float().mean(0)
    assert data.frequency == pytest.approx(11.5 / 128)
    assert (frequency - data.frequency).abs().max() < 0.015, "every feature fires equally often"
    assert codes[codes > 0].min() >= 0.5 and codes.max() <= 1.5
    first = [b for b, _ in data.batches(512, seed=3)]
    again = [b for b, _ in data.batches(512, seed=3, start_batch=2)]
    assert len(first) == 8 and torch.equal(first[2], again[0]) and not torch.equal(first[0], first[1])
