"""Feature analysis: one pass over a training run's activation store gives every latent a page.

For each SAE of the run (one pass each, so the time and memory of one SAE are on their own):

1. Read the first `n_tokens` rows of the run's activation store in store order, batch by batch.
   A batch holds whole contexts (`batch_size` rounded down to a multiple of the rows per
   context), so the window around any token lies inside the batch that holds it and its
   per-token activations are taken right there: nothing is run twice and no model forward is needed.
2. Encode each batch with the SAE (eval mode) and feed its activating (row, latent) pairs to
   - `LatentStatistics`: firing count, sum, max and an exact linear histogram;
   - a `PerLatentTopK` keyed by activation: the `top_n` most activating tokens and their windows;
   - a `PerLatentTopK` keyed by a uniform random number: a uniform sample of `sample_size`
     activating tokens per latent (a bottom-k sketch). At the end each latent's sample is sorted,
     cut by rank into `n_bands` equal quantile bands, and `per_band` contexts are taken evenly
     spaced from each band, so a reader sees typical activations, not only the extremes.
   All of it is `[d_sae, n, ...]` tensors, bounded whatever the token budget.
3. Logit effects from the decoder (`saelab.analysis.logit_effects`), with W_U, the final norm and
   the tokenizer of the store's model.
4. Write `run/saes/<label>/features.sqlite` (`saelab.analysis.feature_store`).

Window activations are rounded to 4 significant digits for display; frequency, mean and max are
kept exactly. Positions before the store's `first_position` (the BOS) have no stored row: they are
shown with activation None.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import saelab
from saelab.analysis.config import AnalyzeConfig
from saelab.analysis.feature_store import (
    ContextWindow,
    FeaturePage,
    FeatureStore,
    LogitEffect,
    QuantileBand,
    write_feature_store,
)
from saelab.analysis.latent_statistics import LatentStatistics
from saelab.analysis.logit_effects import LogitEffects, decoder_directions, final_norm_weight, logit_effects
from saelab.analysis.top_k_tracker import PerLatentTopK
from saelab.harvest.store import ActivationStore
from saelab.locking import folder_lock
from saelab.models import load_model, resolve_device
from saelab.run_layout import FEATURES_FILE, SAE_DIR
from saelab.sae import SparseAutoencoder, load_sae
from saelab.sae.config import DENSE_THRESHOLD
from saelab.train.config import TrainConfig
from saelab.train.run_folder import open_run_store, read_run_config, sae_hook, sae_labels

TokenText = Callable[[Iterable[int]], dict[int, str]]


@dataclass
class AnalysisSummary:
    """What `analyze` did for one SAE."""

    label: str
    path: Path
    n_latents: int
    n_tokens: int
    pass_seconds: float  # reading + encoding + tracking
    total_seconds: float  # also logit effects, pages and writing
    bytes: int
    example: str

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.pass_seconds, 1e-9)


class FeatureAnalyzer:
    """The accumulators of one pass over one SAE's latents; `update` per batch, `pages` at the end."""

    def __init__(self, d_sae: int, rows_per_context: int, cfg: AnalyzeConfig, device: str | torch.device) -> None:
        self.cfg = cfg
        self.rows_per_context = rows_per_context
        width = cfg.window_before + cfg.window_after + 1
        self.offsets = torch.arange(-cfg.window_before, cfg.window_after + 1, device=device)
        self.stats = LatentStatistics(d_sae, cfg.histogram_bins, device)
        self.top = PerLatentTopK(d_sae, cfg.top_n, width, device)
        self.sample = PerLatentTopK(d_sae, cfg.sample_size, width, device)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, first_row: int) -> None:
        """`latents: [rows, d_sae]` of global store rows `first_row …`, whole contexts only."""
        if first_row % self.rows_per_context or len(latents) % self.rows_per_context:
            raise ValueError(f"a batch must hold whole contexts of {self.rows_per_context} rows")
        d_sae = latents.shape[1]
        flat_latents = latents.contiguous().view(-1)
        flat = _activating(flat_latents)
        local, latent, value = flat // d_sae, flat % d_sae, flat_latents[flat]
        row = local + first_row

        def window(pairs: torch.Tensor) -> torch.Tensor:
            """The latent's activations at the rows around each pair, NaN outside its context: `[m, width]`."""
            place = (local[pairs] % self.rows_per_context)[:, None] + self.offsets
            inside = (place >= 0) & (place < self.rows_per_context)
            around = (local[pairs][:, None] + self.offsets).clamp_(0, len(latents) - 1)
            return torch.where(inside, flat_latents[around * d_sae + latent[pairs][:, None]], torch.nan)

        self.stats.update(len(latents), latent, value)
        self.top.update(latent, value, value, row, window)
        key = torch.rand(len(value), generator=self.generator, device=latents.device)
        self.sample.update(latent, key, value, row, window)

    def pages(self, store: ActivationStore, effects: LogitEffects, token_text: TokenText) -> Iterator[FeaturePage]:
        """Every latent's page, in index order; `token_text(ids)` gives the strings of token ids."""
        cfg, manifest = self.cfg, store.manifest
        before, first_position = cfg.window_before, manifest.first_position
        stats = _to_cpu(self.stats)
        top_rows, sample_rows = self.top.rows.cpu(), self.sample.rows.cpu()
        where = {}  # global row → (context, position)
        rows = torch.cat([top_rows.flatten(), sample_rows.flatten()])
        rows = torch.unique(rows[rows >= 0])
        if len(rows):
            context, position = store.context_of(rows)
            where = dict(zip(rows.tolist(), zip(context.tolist(), position.tolist(), strict=True), strict=True))
        tokens = {c: store.context_tokens(c).tolist() for c in sorted({c for c, _ in where.values()})}
        ids = {i for context_ids in tokens.values() for i in context_ids}
        ids |= set(effects.top_ids.flatten().tolist()) | set(effects.bottom_ids.flatten().tolist())
        text = token_text(sorted(ids))

        def window(row: int, activations: list[float]) -> ContextWindow:
            c, p = where[row]
            start, end = max(0, p - before), min(manifest.context_size, p + cfg.window_after + 1)
            token_ids = tokens[c][start:end]
            values: list[float | None] = activations[start - p + before : end - p + before]
            if start < first_position:  # no stored row there: unknown, not 0
                values[: first_position - start] = [None] * (first_position - start)
            return ContextWindow(c, p, start, token_ids, [text[i] for i in token_ids], values)

        def logits(values: torch.Tensor, token_ids: torch.Tensor) -> list[LogitEffect]:
            return [LogitEffect(i, text[i], v) for i, v in zip(token_ids.tolist(), values.tolist(), strict=True)]

        frequency, mean, width = stats.frequency().tolist(), stats.mean().tolist(), stats.bin_width().tolist()
        n_firing, maximum = stats.n_firing.tolist(), stats.max.tolist()
        filled = (stats.counts > 0).long()
        n_bins = torch.where(filled.any(1), stats.counts.shape[1] - filled.flip(1).argmax(1), 0).tolist()
        top_windows, sample_windows = _rounded(self.top.ordered_windows()), _rounded(self.sample.ordered_windows())
        top_rows, sample_rows, sample_values = top_rows.tolist(), sample_rows.tolist(), self.sample.values.tolist()
        for f in range(len(n_firing)):
            tops = [(r, w) for r, w in zip(top_rows[f], top_windows[f].tolist(), strict=True) if r >= 0]
            sampled = [j for j, r in enumerate(sample_rows[f]) if r >= 0]
            chosen = sample_bands([sample_values[f][j] for j in sampled], cfg.n_bands, cfg.per_band)
            bands = [
                QuantileBand(
                    b / cfg.n_bands,
                    (b + 1) / cfg.n_bands,
                    [window(sample_rows[f][sampled[i]], sample_windows[f, sampled[i]].tolist()) for i in band],
                )
                for b, band in enumerate(chosen)
            ]
            yield FeaturePage(
                index=f,
                n_firing=n_firing[f],
                frequency=frequency[f],
                mean_activation=mean[f],
                max_activation=maximum[f],
                histogram_bin_width=width[f],
                histogram_counts=stats.counts[f, : n_bins[f]].tolist(),
                top_contexts=[window(r, w) for r, w in tops],
                quantile_bands=bands,
                positive_logits=logits(effects.top_values[f], effects.top_ids[f]),
                negative_logits=logits(effects.bottom_values[f], effects.bottom_ids[f]),
            )


def sample_bands(values: list[float], n_bands: int, per_band: int) -> list[list[int]]:
    """Cut a uniform sample by rank into `n_bands` equal quantile bands; from each, `per_band` entries
    evenly spaced in rank (fewer when the band is smaller). Returns indices into `values`, rising."""
    order = sorted(range(len(values)), key=values.__getitem__)
    bands = []
    for b in range(n_bands):
        low, high = len(order) * b // n_bands, len(order) * (b + 1) // n_bands
        take = min(per_band, high - low)
        bands.append([order[low + (2 * j + 1) * (high - low) // (2 * take)] for j in range(take)])
    return bands


def analyze(cfg: AnalyzeConfig, model: Any | None = None, progress: bool = True) -> dict[str, AnalysisSummary]:
    """Analyse the SAEs `cfg.saes` (all when empty) of the run `cfg.run` into `saes/<label>/features.sqlite`.

    `model` (a TransformerBridge of the store's model) is loaded from the store's manifest when not
    given; only its unembedding, final norm and tokenizer are used.
    """
    cfg.validate()
    run = Path(cfg.run)
    train_cfg = read_run_config(run)
    labels = sae_labels(run, cfg.saes)
    store = open_run_store(run, train_cfg)
    manifest = store.manifest
    rows_per_context = manifest.rows_per_context
    n_rows = min(store.n_rows, math.ceil(cfg.n_tokens / rows_per_context) * rows_per_context)
    batch_rows = max(1, cfg.batch_size // rows_per_context) * rows_per_context
    with folder_lock(run, what="job (training, evaluation or analysis)"):
        device = resolve_device(cfg.device)
        model = model if model is not None else load_model(manifest.model, device)
        norm_weight, center = final_norm_weight(model)
        summaries = {}
        for label in labels:
            begin = time.perf_counter()
            sae = load_sae(run / SAE_DIR / label, device)
            hook = sae_hook(sae, train_cfg, store)
            start = time.perf_counter()
            analyzer = FeatureAnalyzer(sae.cfg.d_sae, rows_per_context, cfg, device)
            bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc=f"analyze {label}", disable=not progress)
            with bar, torch.inference_mode():
                for first in range(0, n_rows, batch_rows):
                    x = store.rows(torch.arange(first, min(first + batch_rows, n_rows)), hook)
                    analyzer.update(sae.encode(x.to(device).float()), first)
                    bar.update(len(x))
            pass_seconds = time.perf_counter() - start
            with torch.inference_mode():
                directions = decoder_directions(sae)
                effects = logit_effects(
                    directions, norm_weight.to(directions.device), model.W_U.to(directions.device), cfg.n_logits, center
                )
                effects = LogitEffects(*(t.cpu() for t in vars(effects).values()))
            path = run / SAE_DIR / label / FEATURES_FILE
            for stale in path.parent.glob(f".{FEATURES_FILE}.*.tmp"):  # left by a killed analysis
                stale.unlink(missing_ok=True)
            meta = _meta(cfg, label, sae, hook, train_cfg, store, n_rows, pass_seconds, center)
            size = write_feature_store(path, meta, analyzer.pages(store, effects, _token_text(model.tokenizer)))
            with FeatureStore(path) as features:
                example = example_feature(features)
            summaries[label] = AnalysisSummary(
                label, path, sae.cfg.d_sae, n_rows, pass_seconds, time.perf_counter() - begin, size, example
            )
    return summaries


EXAMPLE_CANDIDATES = 200  # pages read to pick the example feature: milliseconds each


def example_feature(features: FeatureStore) -> str:
    """One line about a latent a reader can make sense of at a glance: among the non-dense latents
    that fired most often (up to `EXAMPLE_CANDIDATES`), the one whose top contexts agree most on a
    token they are about that is a word, not whitespace or punctuation. Its top tokens and the
    tokens it pushes up."""
    live = [row for row in features.summary_table() if 0 < row[1] <= DENSE_THRESHOLD]
    if not live:
        return "no latent fired on up to 10 % of the tokens analysed"
    candidates = sorted(live, key=lambda row: (-row[1], row[0]))[:EXAMPLE_CANDIDATES]

    def agreement(index: int) -> tuple[float, int]:
        tokens = [w.tokens[w.highlight] for w in features.feature(index).top_contexts]
        words = Counter(t for t in tokens if any(c.isalpha() for c in t)).most_common(1)
        return (words[0][1] / len(tokens) if words else 0.0), -index

    index, frequency, maximum, _ = max(candidates, key=lambda row: agreement(row[0]))
    page = features.feature(index)
    tops = Counter(w.tokens[w.highlight] for w in page.top_contexts).most_common(5)
    pushed = [e.token for e in page.positive_logits[:5]]
    return (
        f"latent {index}: fires on {frequency:.2%} of tokens, max {maximum:.3g}; "
        f"top tokens {', '.join(repr(t) for t, _ in tops)}; pushes up {', '.join(map(repr, pushed))}"
    )


# ---- internals ----------------------------------------------------------------------------------


def _rounded(windows: torch.Tensor) -> np.ndarray:
    """Window activations to 4 significant digits (float64, NaN kept): enough to read and to shade a
    token, and a third of the characters in JSON. n / 10^k is the double nearest the decimal, as
    `float("…e-k")` gives, so the JSON is short."""
    x = windows.detach().cpu().double().numpy()
    rounded = x.copy()
    nonzero = np.isfinite(x) & (x != 0)  # most of a sparse latent's window is 0
    values = x[nonzero]
    digits = 3 - np.floor(np.log10(np.abs(values)))
    scale = 10.0 ** np.abs(digits)
    rounded[nonzero] = np.where(digits >= 0, np.round(values * scale) / scale, np.round(values / scale) * scale)
    return rounded


def _activating(flat_latents: torch.Tensor) -> torch.Tensor:
    """Flat indices `[m]` (int64, ascending) of the entries > 0 of `flat_latents: [n]`. On the CPU
    through NumPy, whose compare and flatnonzero are several times faster than torch's there."""
    if flat_latents.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flat_latents.numpy() > 0))
    return torch.nonzero(flat_latents > 0).squeeze(1)


def _to_cpu(obj: Any) -> Any:
    """A shallow copy of `obj` (e.g. a LatentStatistics) with its tensor attributes on the CPU."""
    copy = object.__new__(type(obj))
    copy.__dict__.update({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in obj.__dict__.items()})
    return copy


def _token_text(tokenizer: Any) -> TokenText:
    def text(ids: Iterable[int]) -> dict[int, str]:
        ids = list(ids)
        strings = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        return dict(zip(ids, strings, strict=True))

    return text


def _meta(
    cfg: AnalyzeConfig,
    label: str,
    sae: SparseAutoencoder,
    hook: str,
    train_cfg: TrainConfig,
    store: ActivationStore,
    n_rows: int,
    pass_seconds: float,
    center: bool,
) -> dict[str, Any]:
    manifest = store.manifest
    return {
        "sae": label,
        "architecture": sae.cfg.architecture,
        "d_sae": sae.cfg.d_sae,
        "d_in": sae.cfg.d_in,
        "input_scale": float(sae.input_scale),
        "model": manifest.model,
        "hook": hook,
        "run": str(cfg.run),
        "store": str(train_cfg.store),
        "n_tokens": n_rows,
        "n_tokens_budget": cfg.n_tokens,
        "n_contexts": n_rows // manifest.rows_per_context,
        "context_size": manifest.context_size,
        "first_position": manifest.first_position,
        "window_before": cfg.window_before,
        "window_after": cfg.window_after,
        "top_n": cfg.top_n,
        "sample_size": cfg.sample_size,
        "n_bands": cfg.n_bands,
        "per_band": cfg.per_band,
        "histogram_bins": cfg.histogram_bins,
        "seed": cfg.seed,
        "logit_effects": "(W_dec[f] / input_scale"
        + (", centred" if center else "")
        + ") ⊙ final norm weight · W_U; the norm's 1/RMS scale ignored",
        "pass_seconds": pass_seconds,
        "tokens_per_second": n_rows / max(pass_seconds, 1e-9),
        "saelab_version": saelab.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
