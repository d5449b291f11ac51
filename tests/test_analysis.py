"""Feature analysis: bounded trackers against brute force, logit effects, the feature store, a real run end to end."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from saelab.analysis import analyze as analyze_module
from saelab.analysis import logit_effects as logit_effects_module
from saelab.analysis.analyze import FeatureAnalyzer, analyze, sample_bands
from saelab.analysis.config import AnalyzeConfig
from saelab.analysis.feature_store import (
    ContextWindow,
    FeatureIndexError,
    FeaturePage,
    FeatureStore,
    LogitEffect,
    QuantileBand,
    checksum_path,
    write_feature_store,
)
from saelab.analysis.latent_statistics import LatentStatistics
from saelab.analysis.logit_effects import decoder_directions, final_norm_weight, logit_effects
from saelab.analysis.top_k_tracker import PerLatentTopK
from saelab.errors import SaelabError


def sparse_latents(rows: int, d_sae: int, density: float, seed: int = 0) -> torch.Tensor:
    """Non-negative latents `[rows, d_sae]`, nonzero with probability `density`, values continuous (no ties)
    and spread over several orders of magnitude, growing along the rows so histograms must rescale."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.exp(2 * torch.randn(rows, d_sae, generator=generator)) * torch.linspace(0.01, 100, rows)[:, None]
    return values * (torch.rand(rows, d_sae, generator=generator) < density)


def feed(z: torch.Tensor, batch_rows: int, *trackers_and_stats: object) -> None:
    for first in range(0, len(z), batch_rows):
        batch = z[first : first + batch_rows]
        local, latent = torch.nonzero(batch > 0, as_tuple=True)
        value = batch[local, latent]
        for target in trackers_and_stats:
            if isinstance(target, LatentStatistics):
                target.update(len(batch), latent, value)
            else:
                target.update(latent, value, value, local + first)


# ---- the bounded per-latent trackers --------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_rows"), [(1, 97), (5, 100), (20, 333), (60, 50)])
def test_top_n_tracker_equals_brute_force(n, batch_rows):
    z = sparse_latents(1000, 40, density=0.03, seed=n)  # about 30 firings per latent: n = 60 exceeds them
    tracker = PerLatentTopK(40, n)
    feed(z, batch_rows, tracker)
    for f in range(40):
        rows = torch.nonzero(z[:, f]).squeeze(1)
        order = rows[torch.argsort(z[rows, f], descending=True)][:n]  # brute force: sort every activation
        k = len(order)
        assert int(tracker.counts()[f]) == k == min(n, len(rows))
        assert torch.equal(tracker.rows[f, :k], order)
        assert torch.equal(tracker.values[f, :k], z[order, f])
        assert torch.all(tracker.rows[f, k:] == -1) and torch.all(tracker.values[f, k:] == 0)
    assert len(torch.unique(z[z > 0])) == int((z > 0).sum())  # the data has no ties, so the order is unique


def test_statistics_equal_brute_force():
    z = sparse_latents(2000, 30, density=0.1, seed=1)
    stats = LatentStatistics(30, bins=16)
    feed(z, 128, stats)
    firing = z > 0
    assert stats.n_tokens == 2000
    assert torch.equal(stats.n_firing, firing.sum(0))
    torch.testing.assert_close(stats.frequency(), firing.double().mean(0))
    torch.testing.assert_close(stats.mean(), (z.double().sum(0) / firing.sum(0)).float())
    assert torch.equal(stats.max, z.max(0).values)
    width = stats.bin_width()
    for f in range(30):
        values = z[firing[:, f], f]
        # the range is the smallest power of two above the max, so the max lies in the upper half of the bins
        assert values.max() < 16 * width[f] <= 2 * values.max()
        assert torch.equal(stats.counts[f], torch.bincount((values / width[f]).floor().long(), minlength=16))


def test_random_keys_give_a_uniform_sample_of_activating_pairs():
    z = sparse_latents(4000, 100, density=0.05, seed=2)  # about 200 firings per latent, 40 sampled
    sampler = PerLatentTopK(100, 40)
    generator = torch.Generator().manual_seed(0)
    for first in range(0, 4000, 500):
        batch = z[first : first + 500]
        local, latent = torch.nonzero(batch > 0, as_tuple=True)
        value = batch[local, latent]
        sampler.update(latent, torch.rand(len(value), generator=generator), value, local + first)
    quantiles = []
    for f in range(100):
        rows = sampler.rows[f]
        assert len(torch.unique(rows)) == 40 and torch.all(rows >= 0)
        assert torch.equal(sampler.values[f], z[rows, f]) and torch.all(sampler.values[f] > 0)
        everything = torch.sort(z[z[:, f] > 0, f]).values
        quantiles.append(torch.searchsorted(everything, sampler.values[f]).float() / len(everything))
    quantiles = torch.cat(quantiles)
    # a uniform sample: its quantiles are uniform on [0, 1] (4000 draws: mean within ±0.02, quarters ±3 %)
    assert abs(float(quantiles.mean()) - 0.5) < 0.02
    quarters = torch.bincount((quantiles * 4).long().clamp(max=3), minlength=4).float() / len(quantiles)
    assert torch.all((quarters - 0.25).abs() < 0.03), quarters


def test_quantile_bands_cut_the_sample_by_rank():
    values = (torch.rand(23, generator=torch.Generator().manual_seed(3)) + 0.1).tolist()
    bands = sample_bands(values, n_bands=4, per_band=3)
    rank = {index: r for r, index in enumerate(sorted(range(23), key=values.__getitem__))}
    # ranks 0..22 in bands [0, 5) [5, 11) [11, 17) [17, 23); 3 evenly spaced from each, rising
    for band, (low, high) in zip(bands, [(0, 5), (5, 11), (11, 17), (17, 23)], strict=True):
        ranks = [rank[i] for i in band]
        assert len(ranks) == 3 and all(low <= r < high for r in ranks) and ranks == sorted(ranks)
    assert [r for band in bands for r in band] == sorted(sum(bands, []), key=values.__getitem__)
    assert sample_bands([0.5, 0.2], n_bands=4, per_band=3) == [[], [1], [], [0]]  # 2 samples: 2 bands filled
    assert sample_bands([], n_bands=4, per_band=3) == [[], [], [], []]


def test_windows_are_the_latents_around_each_top_token():
    rows_per_context, d_sae = 9, 12
    z = sparse_latents(rows_per_context * 30, d_sae, density=0.2, seed=4)
    cfg = AnalyzeConfig(top_n=4, window_before=3, window_after=2, sample_size=20, per_band=2)
    analyzer = FeatureAnalyzer(d_sae, rows_per_context, cfg, device="cpu")
    for first in range(0, len(z), rows_per_context * 4):  # batches of 4 contexts, the last one short
        analyzer.update(z[first : first + rows_per_context * 4], first)
    for tracker in (analyzer.top, analyzer.sample):  # the sample churns more: every batch evicts some
        windows = tracker.ordered_windows()
        for f in range(d_sae):
            assert int(tracker.counts()[f]) == min(tracker.n, int((z[:, f] > 0).sum()))
            for slot in range(int(tracker.counts()[f])):
                row = int(tracker.rows[f, slot])
                assert tracker.values[f, slot] == z[row, f] > 0
                for j, offset in enumerate(range(-3, 3)):
                    inside = 0 <= row % rows_per_context + offset < rows_per_context
                    expected = z[row + offset, f] if inside else torch.tensor(torch.nan)
                    torch.testing.assert_close(windows[f, slot, j], expected, equal_nan=True)
    with pytest.raises(ValueError, match="whole contexts"):
        analyzer.update(z[:10], 0)


# ---- logit effects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_logit_effects_equal_a_direct_computation(center, monkeypatch):
    monkeypatch.setattr(logit_effects_module, "_CHUNK_ELEMENTS", 7 * 300)  # 7 latents per chunk
    generator = torch.Generator().manual_seed(5)
    directions, weight = torch.randn(50, 16, generator=generator), torch.rand(16, generator=generator) + 0.5
    W_U = torch.randn(16, 300, generator=generator)
    effects = logit_effects(directions, weight, W_U, k=10, center=center)
    centred = directions - directions.mean(1, keepdim=True) if center else directions
    direct = torch.stack([(centred[f] * weight) @ W_U for f in range(50)])
    top, bottom = direct.topk(10, dim=1), direct.topk(10, dim=1, largest=False)
    assert torch.equal(effects.top_ids, top.indices) and torch.equal(effects.bottom_ids, bottom.indices)
    torch.testing.assert_close(effects.top_values, top.values)
    torch.testing.assert_close(effects.bottom_values, bottom.values)


# ---- the feature store ------------------------------------------------------------------------------


def example_pages() -> list[FeaturePage]:
    window = ContextWindow(
        context=3,
        position=2,
        start=0,
        token_ids=[1, 500, 7],
        tokens=["<s>", " Paris", "é\n\t"],
        activations=[None, 3.25, 0.0],
    )
    other = ContextWindow(
        context=9, position=5, start=4, token_ids=[500, 8], tokens=[" Paris", "'"], activations=[0.1, 2.0]
    )
    pages = []
    for index in range(3):
        pages.append(
            FeaturePage(
                index=index,
                n_firing=17 * index,
                frequency=0.1234567890123 * index,
                mean_activation=1.5 / 7 * index,
                max_activation=3.25 * index,
                histogram_bin_width=0.0625 * index,
                histogram_counts=[3, 0, 14] if index else [],
                top_contexts=[window, other] if index else [],
                quantile_bands=[QuantileBand(0.0, 0.5, [other]), QuantileBand(0.5, 1.0, [])] if index else [],
                positive_logits=[LogitEffect(500, " Paris", 1 / 3 + index), LogitEffect(7, "é\n\t", -0.0)],
                negative_logits=[LogitEffect(8, "'", -2.0 / 3 - index)],
            )
        )
    return pages


def test_feature_store_round_trips_pages_exactly(tmp_path):
    pages = example_pages()
    path = tmp_path / "features.sqlite"
    size = write_feature_store(path, {"sae": "topk-8", "hook": "blocks.1.hook_resid_post"}, reversed(pages))
    assert size == path.stat().st_size and not list(tmp_path.glob(".*.tmp"))
    with FeatureStore(path) as store:
        assert store.n_latents == 3 and store.meta["sae"] == "topk-8" and store.meta["format"] == "saelab-feature-store"
        assert [store.feature(i) for i in range(3)] == pages
        assert list(store) == pages
        assert store.summary_table() == [(p.index, p.frequency, p.max_activation, p.mean_activation) for p in pages]
        assert store.search_by_logit_token("Paris") == [2, 1, 0]  # strongest first
        assert store.search_by_logit_token(" Paris", sign="negative") == []
        assert store.search_by_logit_token("'", sign="negative") == [2, 1, 0]  # most negative first
        with pytest.raises(FeatureIndexError, match=r"latent 3 is not in .*\[0, 3\)"):
            store.feature(3)


def test_feature_store_refuses_inconsistent_pages(tmp_path):
    pages = example_pages()
    pages[2].top_contexts[1] = ContextWindow(3, 1, 1, [501], [" Paris"], [1.0])  # context 3 has token 500 there
    with pytest.raises(ValueError, match="context 3 has two tokens"):
        write_feature_store(tmp_path / "f.sqlite", {}, pages)
    assert not list(tmp_path.iterdir())  # no half-written file is left behind


def test_a_digit_changed_inside_a_page_is_found_on_opening(tmp_path):
    path = tmp_path / "features.sqlite"
    write_feature_store(path, {}, example_pages())
    with FeatureStore(path) as store:
        page = store.feature(2)
    data = path.read_bytes()
    value = f"{page.top_contexts[0].activations[page.top_contexts[0].position]}".encode()
    assert data.count(value) >= 1
    at = data.index(value)
    changed = data[:at] + (b"9" if data[at : at + 1] != b"9" else b"8") + data[at + 1 :]
    path.write_bytes(changed)
    # SQLite itself still reads the file (its structure is intact), so only the checksum can tell
    sqlite3.connect(path).execute("SELECT count(*) FROM features").fetchone()
    with pytest.raises(SaelabError, match=r"features.sqlite does not match its checksum \(features.sqlite.sha256\)"):
        FeatureStore(path)
    checksum_path(path).unlink()
    with pytest.raises(SaelabError, match=r"features.sqlite has no checksum file features.sqlite.sha256"):
        FeatureStore(path)
    write_feature_store(path, {}, example_pages())  # what `saelab analyze` does: rebuilt, it opens again
    with FeatureStore(path) as store:
        assert store.feature(2) == page


def test_missing_or_corrupt_feature_store_is_a_saelab_error(tmp_path):
    path = tmp_path / "features.sqlite"
    with pytest.raises(SaelabError, match="features.sqlite does not exist"):
        FeatureStore(path)
    path.write_bytes(b"not a database at all " * 100)
    with pytest.raises(SaelabError, match=r"features.sqlite is not a readable feature store"):
        FeatureStore(path)
    write_feature_store(path, {}, example_pages())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SaelabError, match=r"features.sqlite is not a readable feature store"):
        FeatureStore(path)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE meta (key TEXT, value TEXT)").connection.commit()
    with pytest.raises(SaelabError, match="other.sqlite is not a saelab feature store"):
        FeatureStore(other)


# ---- end to end on a real SmolLM2 store -----------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(smollm2, tmp_path_factory) -> Path:
    """A 40-context SmolLM2 store (context 32, three shards) and two tiny SAEs trained on it."""
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest
    from saelab.sae.config import SAEConfig
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import train

    folder = tmp_path_factory.mktemp("analysis")
    store = folder / "store"
    harvest(
        HarvestConfig(out=str(store), n_tokens=31 * 40, context_size=32, device="cpu", shard_contexts=16),
        model=smollm2,
        progress=False,
    )
    saes = [SAEConfig(architecture="topk", d_sae=128, k=8), SAEConfig(architecture="batchtopk", d_sae=96, k=8)]
    cfg = TrainConfig(store=str(store), out=str(folder / "run"), saes=saes, n_tokens=4096, batch_size=512, device="cpu")
    train(cfg, progress=False)
    return folder / "run"


def test_analyze_a_real_run_matches_brute_force(real_run, smollm2):
    from saelab.harvest.store import ActivationStore
    from saelab.sae import load_sae

    cfg = AnalyzeConfig(
        run=str(real_run), top_n=5, window_before=6, window_after=3, sample_size=20, per_band=3, batch_size=200
    )
    summaries = analyze(cfg, model=smollm2, progress=False)
    assert list(summaries) == ["batchtopk-96-k8", "topk-128-k8"]
    store = ActivationStore(real_run.parent / "store")
    summary = summaries["topk-128-k8"]
    assert summary.n_tokens == store.n_rows == 31 * 40 and summary.n_latents == 128
    sae = load_sae(real_run / "saes" / "topk-128-k8")
    with torch.no_grad():
        z = sae.encode(store.rows(torch.arange(store.n_rows)))  # brute force: every row at once
    context, position = store.context_of(torch.arange(store.n_rows))
    row_at = {(c, p): r for r, (c, p) in enumerate(zip(context.tolist(), position.tolist(), strict=True))}

    features = FeatureStore(summary.path)
    assert features.n_latents == 128 and features.meta["n_tokens"] == store.n_rows
    assert features.meta["hook"] == "blocks.15.hook_resid_post" and features.meta["model"] == "smollm2-135m"
    table = features.summary_table()
    firing = (z > 0).sum(0)
    torch.testing.assert_close(torch.tensor([r[1] for r in table], dtype=torch.float64), firing.double() / store.n_rows)
    torch.testing.assert_close(torch.tensor([r[2] for r in table]), z.max(0).values)
    torch.testing.assert_close(torch.tensor([r[3] for r in table]), z.sum(0) / firing.clamp_min(1))

    live = torch.nonzero(firing >= 40).squeeze(1)
    assert len(live) >= 5
    for f in [*live[:4].tolist(), int(firing.argmax())]:
        page = features.feature(f)
        best = torch.argsort(z[:, f], descending=True)[: cfg.top_n]
        assert [row_at[(w.context, w.position)] for w in page.top_contexts] == best.tolist()
        for w in [*page.top_contexts, *(w for band in page.quantile_bands for w in band.contexts)]:
            tokens = store.context_tokens(w.context)
            assert w.token_ids == tokens[w.start : w.start + len(w.token_ids)].tolist()
            assert w.start == max(0, w.position - 6) and w.start + len(w.tokens) == min(32, w.position + 4)
            for q, (token, value) in enumerate(zip(w.tokens, w.activations, strict=True), start=w.start):
                assert token == smollm2.tokenizer.decode([int(tokens[q])])
                if q < 1:  # the BOS: the store holds no row there
                    assert value is None
                else:
                    assert value == pytest.approx(float(z[row_at[(w.context, q)], f]), rel=1e-3, abs=1e-6)
            assert w.value > 0
        # the sampled bands: 3 contexts each, in rising order, below and above the median of all activations
        values = [[w.value for w in band.contexts] for band in page.quantile_bands]
        assert [len(v) for v in values] == [3, 3, 3, 3]
        flat = [v for band in values for v in band]
        assert flat == sorted(flat)
        median = float(z[z[:, f] > 0, f].median())
        assert max(values[0]) < median < min(values[-1])
        # the histogram counts every activation
        assert sum(page.histogram_counts) == int(firing[f]) == page.n_firing
        assert (len(page.histogram_counts) - 1) * page.histogram_bin_width <= page.max_activation

    # logit effects: the decoder direction through the final RMSNorm's weight and W_U
    weight, center = final_norm_weight(smollm2)
    assert not center and torch.equal(weight, smollm2.ln_final.w.detach())
    with torch.no_grad():
        direct = (decoder_directions(sae) * smollm2.ln_final.w) @ smollm2.W_U
    for f in live[:3].tolist():
        page = features.feature(f)
        top, bottom = direct[f].topk(10), direct[f].topk(10, largest=False)
        assert [e.token_id for e in page.positive_logits] == top.indices.tolist()
        assert [e.token_id for e in page.negative_logits] == bottom.indices.tolist()
        torch.testing.assert_close(torch.tensor([e.value for e in page.positive_logits]), top.values)
        assert page.positive_logits[0].token == smollm2.tokenizer.decode([int(top.indices[0])])
        assert f in features.search_by_logit_token(page.positive_logits[0].token)
    assert "latent" in summary.example and "top tokens" in summary.example


def test_analyze_cli(real_run, smollm2, monkeypatch, capsys):
    from saelab import cli

    monkeypatch.setattr(analyze_module, "load_model", lambda spec, device: smollm2)
    code = cli.main(["analyze", "--quiet", f"run={real_run}", "saes=[topk-128-k8]", "n_tokens=500", "top_n=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "topk-128-k8" in out and "batchtopk" not in out and "features.sqlite" in out
    assert "527" in out  # 500 tokens rounded up to whole contexts of 31 rows: 17 contexts
    with FeatureStore(real_run / "saes" / "topk-128-k8" / "features.sqlite") as features:
        assert features.meta["n_tokens"] == 527 and features.meta["n_tokens_budget"] == 500
        assert len(features.feature(0).top_contexts) <= 3

    assert cli.main(["analyze", f"run={real_run}", "saes=[nope]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no SAE 'nope'" in err[0]
    assert cli.main(["analyze", f"run={real_run.parent / 'absent'}"]) == 2
    assert "is not a training run" in capsys.readouterr().err
    assert cli.main(["analyze", "histogram_bins=48"]) == 2
    assert "histogram_bins: must be a power of two" in capsys.readouterr().err
