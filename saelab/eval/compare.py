"""Did two SAEs learn the same features? Decoder and encoder geometry, and co-activation on a store.

For SAEs of one hook (any widths, any architectures saelab loads, SAELens folders included):

- decoder geometry on unit decoder rows: the mean max cosine both ways (MMCS, A→B and B→A), the
  one-to-one matching with the largest summed cosine and its mean matched cosine (the MCC of Song et
  al. 2025, arXiv 2505.20254), and the **shared fraction**: latents whose decoder matching and encoder
  matching pick the same partner with both cosines ≥ `threshold` (Paulo & Belrose 2025, arXiv
  2501.16615). For a tied SAE (one direction encodes and decodes) the two matchings are one.
- with a store: each latent's firing frequency on a sample of its rows. Dead and ultra-rare latents
  (frequency < `min_frequency`) are reported and left out of the matchings and the fractions, since
  their directions mean nothing. Each matched pair gets the Pearson correlation of its two latents'
  activations over the same tokens (Bricken et al. 2023's activation similarity).
- splits across widths: the latents of the narrower SAE with two or more partners in the wider one
  at decoder cosine ≥ `threshold` (and, with a store, that co-fire with it: P(narrow fires | partner
  fires) ≥ SPLIT_COFIRING).
- for more than two SAEs: the pairwise matrices of shared fractions and MCCs, and for each SAE the
  fraction of its latents shared with every other one.

`compare_saes` returns every pair's comparison and the report (a JSON-able dict; its schema is in
docs/compare.md); `saelab.eval.compare_figure` draws the matched-cosine histograms.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.errors import SaelabError
from saelab.eval.matching import CANDIDATES, Matching, MatchingMethod, Nearest, match, nearest, unit_rows
from saelab.harvest.store import ActivationStore
from saelab.run_layout import SAE_DIR
from saelab.sae.base import SparseAutoencoder
from saelab.sae.saelens_format import CFG_FILE, load_sae

THRESHOLD = 0.7  # Paulo & Belrose's cosine for a shared latent
MIN_FREQUENCY = 1e-5  # below this a latent is ultra-rare: too few firings for its direction to mean anything
SAMPLE_TOKENS = 131_072  # store rows sampled for frequencies and activation correlations
SPLIT_COFIRING = 0.5  # a wide latent is a part of a narrow one when the narrow one fires on ≥ half its tokens
ENCODE_ROWS = 4096  # rows encoded at once: a [4096, d_sae] block per SAE


@dataclass
class ComparedSAE:
    """One SAE of a comparison, with what every measure reads of it."""

    label: str
    path: Path
    sae: SparseAutoencoder
    decoder: torch.Tensor  # [d_sae, d_out] unit rows
    encoder: torch.Tensor  # [d_sae, d_in] unit rows (the same tensor as `decoder` when tied)
    frequency: torch.Tensor | None = None  # [d_sae] firing frequency on the store sample
    min_frequency: float = MIN_FREQUENCY

    @property
    def tied(self) -> bool:
        return self.encoder is self.decoder

    @property
    def width(self) -> int:
        return len(self.decoder)

    @property
    def counted(self) -> torch.Tensor:
        """[d_sae] bool: the latents measures count (all without a store; else those not dead or ultra-rare)."""
        if self.frequency is None:
            return torch.ones(self.width, dtype=torch.bool)
        return self.frequency >= self.min_frequency

    def summary(self) -> dict[str, Any]:
        cfg = self.sae.cfg
        record = {"label": self.label, "path": str(self.path), "architecture": cfg.architecture, "d_sae": self.width}
        record |= {"hook": cfg.hook_name or None, "tied": self.tied, "counted": int(self.counted.sum())}
        if self.frequency is not None:
            dead = int((self.frequency == 0).sum())
            record |= {"dead": dead, "ultra_rare": int((~self.counted).sum()) - dead}
        return record


def read_compared(folder: str | Path, label: str) -> ComparedSAE:
    """An SAE folder (saelab's or SAELens's format) as a `ComparedSAE`; a one-line error if unreadable."""
    path = Path(folder)
    if not (path / CFG_FILE).is_file():
        hint = f" (a run folder? its SAEs are under {path / SAE_DIR})" if (path / SAE_DIR).is_dir() else ""
        raise SaelabError(f"{path}: not an SAE folder, no {CFG_FILE}{hint}")
    try:
        sae = load_sae(path)
    except SaelabError as error:
        raise SaelabError(f"cannot read the SAE in {path}: {error}") from None
    decoder = unit_rows(sae.W_dec)
    tied = sae.W_enc.data_ptr() == sae.W_dec.data_ptr()  # one tensor encodes and decodes (GBA's tied form)
    encoder = decoder if tied else unit_rows(sae.W_enc.T)
    return ComparedSAE(label, path, sae, decoder, encoder)


def expand_runs(paths: Sequence[str | Path]) -> tuple[list[Path], bool]:
    """SAE folders from `paths`: an SAE folder as it is, a run folder as every SAE under its `saes/`; and
    whether any run folder was expanded."""
    folders, expanded = [], False
    for path in map(Path, paths):
        if not (path / CFG_FILE).is_file() and (path / SAE_DIR).is_dir():
            folders += sorted(p for p in (path / SAE_DIR).iterdir() if (p / CFG_FILE).is_file())
            expanded = True
        else:
            folders.append(path)
    return folders, expanded


def space_key(compared: ComparedSAE) -> tuple[str, str, int, int]:
    """What two SAEs must share to be compared: the hooks read and written, and the widths there."""
    cfg = compared.sae.cfg
    return cfg.hook_name, cfg.hook_name_out, cfg.d_in, cfg.output_width


def most_common_space(saes: Sequence[ComparedSAE]) -> tuple[list[ComparedSAE], list[ComparedSAE]]:
    """(the SAEs of the space most of them share, the others): a run folder's SAEs may read several hooks."""
    keys = [space_key(compared) for compared in saes]
    common = max(keys, key=keys.count)
    return [c for c, k in zip(saes, keys, strict=True) if k == common], [
        c for c, k in zip(saes, keys, strict=True) if k != common
    ]


def unique_labels(folders: Sequence[Path]) -> list[str]:
    """Each folder's name, with as many parent folders (skipping `saes`) as it takes to tell them apart."""
    parts = [[p for p in reversed(folder.resolve().parts) if p != SAE_DIR] for folder in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(reversed(p[:depth])) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(folder) for folder in folders]


def check_same_space(saes: Sequence[ComparedSAE]) -> None:
    """SAEs compared must read (and write) the same hook with the same width."""
    first = saes[0]
    for other in saes[1:]:
        for key in ("hook_name", "hook_name_out"):
            a, b = getattr(first.sae.cfg, key), getattr(other.sae.cfg, key)
            if a and b and a != b:
                raise SaelabError(
                    f"{other.label} reads {b}, {first.label} reads {a}: compare SAEs of one hook ({key} differs)"
                )
        for key in ("d_in", "output_width"):
            a, b = getattr(first.sae.cfg, key), getattr(other.sae.cfg, key)
            if a != b:
                raise SaelabError(
                    f"{other.label} has {key} {b}, {first.label} has {a}: their directions cannot be compared"
                )


# ---- the store: frequencies and co-activation ------------------------------------------------------


def sample_store(path: str | Path, saes: Sequence[ComparedSAE], n_tokens: int, seed: int = 0) -> torch.Tensor:
    """`n_tokens` rows of the SAEs' hook drawn at random from the store at `path`: [n, d_in] float32."""
    store = ActivationStore(path, verify=False)
    cfg = saes[0].sae.cfg
    hook = cfg.hook_name or None
    if hook is not None and hook not in store.hooks:
        raise SaelabError(f"the store {path} holds {store.hooks}, not {hook}, the hook the SAEs read")
    hook = store.hook_name(hook)
    if store.d_model != cfg.d_in:
        raise SaelabError(f"the store {path} has d_model {store.d_model}, the SAEs d_in {cfg.d_in}")
    n = min(n_tokens, store.n_rows)
    rows = torch.randperm(store.n_rows, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return store.rows(rows, hook).float()


def _encoded_chunks(saes: Sequence[ComparedSAE], rows: torch.Tensor, what: str, progress: bool):  # noqa: ANN202
    """For each chunk of `rows`, every SAE's latents [chunk, d_sae] (a generator)."""
    with torch.no_grad():
        for chunk in tqdm(rows.split(ENCODE_ROWS), desc=what, unit="chunk", leave=False, disable=not progress):
            yield [compared.sae.encode(chunk) for compared in saes]


def measure_frequencies(saes: Sequence[ComparedSAE], rows: torch.Tensor, progress: bool = False) -> None:
    """Set each SAE's `frequency`: the fraction of `rows` on which each latent is non-zero."""
    counts = [torch.zeros(compared.width) for compared in saes]
    for latents in _encoded_chunks(saes, rows, "latent frequencies", progress):
        for count, z in zip(counts, latents, strict=True):
            count += (z != 0).sum(0)
    for compared, count in zip(saes, counts, strict=True):
        compared.frequency = count / len(rows)


@dataclass
class PairMoments:
    """Running sums over tokens for the latent pairs (a_i, b_i): enough for their correlation and co-firing."""

    a: torch.Tensor  # [n] latents of the first SAE
    b: torch.Tensor  # [n] latents of the second
    sums: torch.Tensor | None = None  # [6, n]: Σa, Σb, Σa², Σb², Σab, Σ 1[a≠0 ∧ b≠0]
    tokens: int = 0

    def add(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        a, b = za[:, self.a].double(), zb[:, self.b].double()
        both = ((a != 0) & (b != 0)).double()
        chunk = torch.stack([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0), both.sum(0)])
        self.sums = chunk if self.sums is None else self.sums + chunk
        self.tokens += len(za)

    def correlation(self) -> torch.Tensor:
        """[n] Pearson correlation of each pair's activations (NaN where one never varies)."""
        n = self.tokens
        sa, sb, saa, sbb, sab, _ = self.sums
        covariance = sab / n - (sa / n) * (sb / n)
        variance = (saa / n - (sa / n) ** 2).clamp_min(0) * (sbb / n - (sb / n) ** 2).clamp_min(0)
        return torch.where(variance > 0, covariance / variance.sqrt(), torch.nan).float()

    def cofiring(self, frequency_b: torch.Tensor) -> torch.Tensor:
        """[n] P(a fires | b fires) for each pair, given b's firing frequency over the same tokens."""
        fires_b = frequency_b[self.b].double() * self.tokens
        return (self.sums[5] / fires_b.clamp_min(1)).float()


# ---- one pair ----------------------------------------------------------------------------------------


@dataclass
class PairComparison:
    """A against B: nearest partners, the two matchings, and what the store adds."""

    a: ComparedSAE
    b: ComparedSAE
    threshold: float
    nearest_a: Nearest  # A's counted latents → B's counted ones (indices into the counted subsets)
    nearest_b: Nearest
    decoder: Matching  # of A's counted latents to B's (global latent indices)
    encoder: Matching
    moments: PairMoments | None = None  # the decoder-matched pairs' activation sums
    split_moments: PairMoments | None = None  # (narrow latent, wide partner) candidates of splits

    @property
    def counted_a(self) -> torch.Tensor:
        return self.a.counted.nonzero().squeeze(1)

    @property
    def shared(self) -> torch.Tensor:
        """[n counted in A] bool: decoder and encoder matchings agree, both cosines ≥ the threshold."""
        agree = (self.decoder.partner == self.encoder.partner) & (self.decoder.partner >= 0)
        return agree & (self.decoder.cosine >= self.threshold) & (self.encoder.cosine >= self.threshold)

    def encoder_cosine_of_decoder_partners(self) -> torch.Tensor:
        """[n counted in A] the encoder cosine of each latent with its decoder partner (NaN: unmatched)."""
        partner = self.decoder.partner
        matched = partner >= 0
        cosine = torch.full((len(partner),), torch.nan)
        a_rows = self.counted_a[matched]
        cosine[matched] = (self.a.encoder[a_rows] * self.b.encoder[partner[matched]]).sum(1)
        return cosine

    def summary(self) -> dict[str, Any]:
        shared = self.shared
        counted_b = int(self.b.counted.sum())
        result = {
            "a": self.a.label,
            "b": self.b.label,
            "mmcs_a_to_b": float(self.nearest_a.best.mean()),
            "mmcs_b_to_a": float(self.nearest_b.best.mean()),
            "hungarian_mean_cosine": self.decoder.mean_cosine,
            "encoder_hungarian_mean_cosine": self.encoder.mean_cosine,
            "shared_fraction": float(shared.float().mean()) if len(shared) else float("nan"),
            "shared_fraction_b": float(shared.sum()) / counted_b if counted_b else float("nan"),
            "shared_latents": int(shared.sum()),
        }
        if self.moments is not None:
            correlation = self.moments.correlation()
            result["mean_activation_correlation"] = float(correlation.nanmean())
        groups = self.a.sae.latent_groups()
        if groups is not None:
            result["shared_fraction_by_group"] = _by_group(shared, groups[self.counted_a])
        return result

    def pairs(self) -> list[list[Any]]:
        """[latent_a, latent_b, decoder_cosine, encoder_cosine, activation_correlation or None] per matched pair."""
        matched = (self.decoder.partner >= 0).nonzero().squeeze(1)
        encoder = self.encoder_cosine_of_decoder_partners()
        correlation = self.moments.correlation() if self.moments is not None else None
        rows = []
        for j, i in enumerate(matched.tolist()):
            value = None if correlation is None else float(correlation[j])
            rows.append(
                [
                    int(self.counted_a[i]),
                    int(self.decoder.partner[i]),
                    round(float(self.decoder.cosine[i]), 5),
                    round(float(encoder[i]), 5),
                    None if value is None or value != value else round(value, 5),
                ]
            )
        return rows

    def narrow_and_wide(self) -> tuple[ComparedSAE, ComparedSAE, Nearest]:
        """(the SAE with fewer latents (A if equal), the other, the narrow one's nearest partners in it)."""
        if self.b.width < self.a.width:
            return self.b, self.a, self.nearest_b
        return self.a, self.b, self.nearest_a

    def split_candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(narrow latent, wide latent, decoder cosine) of every pair at cosine ≥ the threshold whose narrow
        latent has two or more such partners; global indices."""
        narrow, wide, near = self.narrow_and_wide()
        above = near.cosine >= self.threshold
        several = above.sum(1) >= 2
        rows, slots = (above & several[:, None]).nonzero(as_tuple=True)
        narrow_index = narrow.counted.nonzero().squeeze(1)[rows]
        wide_index = wide.counted.nonzero().squeeze(1)[near.index[rows, slots]]
        return narrow_index, wide_index, near.cosine[rows, slots]

    def splits(self) -> list[dict[str, Any]]:
        """Narrow latents with ≥ 2 wide partners above the threshold (co-firing too, with a store)."""
        narrow_index, wide_index, cosine = self.split_candidates()
        narrow, wide, _ = self.narrow_and_wide()
        cofiring = None if self.split_moments is None else self.split_moments.cofiring(wide.frequency)
        parents: dict[int, list[list[float]]] = {}
        for n, (i, j, c) in enumerate(zip(narrow_index.tolist(), wide_index.tolist(), cosine.tolist(), strict=True)):
            if cofiring is not None and not cofiring[n] >= SPLIT_COFIRING:
                continue
            partner = [j, round(c, 5)] + ([] if cofiring is None else [round(float(cofiring[n]), 5)])
            parents.setdefault(i, []).append(partner)
        return [
            {"sae": narrow.label, "latent": i, "partners": partners}
            for i, partners in sorted(parents.items())
            if len(partners) >= 2
        ]


def _by_group(shared: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """The shared fraction within each latent group (GBA's frequency groups), group 0 first."""
    return {str(g): float(shared[groups == g].float().mean()) for g in groups.unique().tolist()}


def compare_pair(
    a: ComparedSAE, b: ComparedSAE, threshold: float, method: MatchingMethod, candidates: int = CANDIDATES
) -> PairComparison:
    """Nearest partners both ways and the decoder and encoder matchings of A's counted latents to B's."""
    counted_a, counted_b = a.counted.nonzero().squeeze(1), b.counted.nonzero().squeeze(1)
    dec_a, dec_b = a.decoder[counted_a], b.decoder[counted_b]
    near_a, near_b = nearest(dec_a, dec_b, candidates), nearest(dec_b, dec_a, candidates)
    decoder = _global(match(dec_a, dec_b, method, near_a), counted_b)
    if a.tied and b.tied:
        encoder = decoder
    else:
        enc_a, enc_b = a.encoder[counted_a], b.encoder[counted_b]
        encoder = _global(match(enc_a, enc_b, method, count=candidates), counted_b)
    return PairComparison(a, b, threshold, near_a, near_b, decoder, encoder)


def _global(matching: Matching, counted_b: torch.Tensor) -> Matching:
    """A matching whose partners index B's counted latents, with partners as B's latent indices instead."""
    partner = torch.where(matching.partner >= 0, counted_b[matching.partner.clamp_min(0)], -1)
    return Matching(partner, matching.cosine, matching.method, matching.peak_bytes)


# ---- the whole comparison --------------------------------------------------------------------------


@dataclass
class Comparison:
    """Every SAE compared, every pair's comparison (by SAE indices, i < j), and the JSON-able report."""

    saes: list[ComparedSAE]
    pairs: dict[tuple[int, int], PairComparison]
    report: dict[str, Any]


def compare_saes(
    folders: Sequence[str | Path],
    store: str | Path | None = None,
    threshold: float = THRESHOLD,
    n_tokens: int = SAMPLE_TOKENS,
    min_frequency: float = MIN_FREQUENCY,
    method: MatchingMethod = "auto",
    candidates: int = CANDIDATES,
    progress: bool = True,
) -> Comparison:
    """Compare the SAEs in `folders` (SAE folders, or run folders for all their SAEs; the first is A, the
    second B). A run folder's SAEs of other hooks than most of them read are left out (the report's `left_out`).

    The report's top-level keys describe A against B; with more than two SAEs, `pairwise` holds every pair."""
    if not 0 < threshold <= 1:
        raise SaelabError(f"threshold: a cosine in (0, 1], got {threshold}")
    folders, from_runs = expand_runs(folders)
    if len(folders) < 2:
        raise SaelabError(f"compare needs at least two SAEs (SAE folders, or a run folder), got {len(folders)}")
    saes = [read_compared(folder, label) for folder, label in zip(folders, unique_labels(folders), strict=True)]
    left_out = []
    if from_runs:
        saes, left_out = most_common_space(saes)
    if len(saes) < 2:
        raise SaelabError(f"compare needs at least two SAEs of one hook, got {len(saes)}: {[str(f) for f in folders]}")
    check_same_space(saes)
    rows = None
    if store is not None:
        rows = sample_store(store, saes, n_tokens)
        for compared in saes:
            compared.min_frequency = min_frequency
        measure_frequencies(saes, rows, progress)
    pairs = {}
    for i, j in tqdm(list(itertools.combinations(range(len(saes)), 2)), desc="matching", disable=not progress):
        pairs[i, j] = compare_pair(saes[i], saes[j], threshold, method, candidates)
    if rows is not None:
        _measure_pairs(saes, pairs, rows, progress)
    report = _report(saes, pairs, threshold, store, rows, min_frequency, candidates)
    report["left_out"] = [compared.label for compared in left_out]
    return Comparison(saes, pairs, _without_nan(report))


def _measure_pairs(
    saes: list[ComparedSAE], pairs: dict[tuple[int, int], PairComparison], rows: torch.Tensor, progress: bool
) -> None:
    """One pass over the sample: each pair's matched latents' activation sums and its split candidates'."""
    for pair in pairs.values():
        matched = pair.decoder.partner >= 0
        pair.moments = PairMoments(pair.counted_a[matched], pair.decoder.partner[matched])
        narrow_index, wide_index, _ = pair.split_candidates()
        pair.split_moments = PairMoments(narrow_index, wide_index)
    for latents in _encoded_chunks(saes, rows, "activation correlations", progress):
        for (i, j), pair in pairs.items():
            pair.moments.add(latents[i], latents[j])
            narrow_first = pair.narrow_and_wide()[0] is pair.a
            pair.split_moments.add(*((latents[i], latents[j]) if narrow_first else (latents[j], latents[i])))


def _report(
    saes: list[ComparedSAE],
    pairs: dict[tuple[int, int], PairComparison],
    threshold: float,
    store: str | Path | None,
    rows: torch.Tensor | None,
    min_frequency: float,
    candidates: int,
) -> dict[str, Any]:
    first = pairs[0, 1]
    matchings = [m for pair in pairs.values() for m in (pair.decoder, pair.encoder)]
    report: dict[str, Any] = {
        "saes": [compared.summary() for compared in saes],
        "threshold": threshold,
        "store": None if store is None else {"path": str(store), "tokens": len(rows), "min_frequency": min_frequency},
        "matching": {
            "method": first.decoder.method,
            "candidates": candidates,
            "peak_bytes": max(m.peak_bytes for m in matchings),
        },
    }
    report |= {key: value for key, value in first.summary().items() if key not in ("a", "b")}
    report["pairs"] = first.pairs()
    report["splits"] = first.splits()
    if len(saes) > 2:
        report["pairwise"] = _pairwise(saes, pairs)
    return report


def _without_nan(value: Any) -> Any:
    """`value` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value


def _pairwise(saes: list[ComparedSAE], pairs: dict[tuple[int, int], PairComparison]) -> dict[str, Any]:
    """Matrices over the SAEs: shared_fraction[i][j] is the fraction of i's counted latents shared with j;
    hungarian_mean_cosine is symmetric; found_in_all_others: each SAE's latents shared with every other."""
    n = len(saes)
    shared_fraction = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    mcc = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    shared_everywhere = [sae.counted[sae.counted].clone() for sae in saes]  # [counted_i] bool, narrowed per pair
    summaries = []
    for (i, j), pair in pairs.items():
        summary = pair.summary()
        summaries.append(summary)
        shared_fraction[i][j], shared_fraction[j][i] = summary["shared_fraction"], summary["shared_fraction_b"]
        mcc[i][j] = mcc[j][i] = summary["hungarian_mean_cosine"]
        shared = pair.shared
        shared_everywhere[i] &= shared
        in_b = torch.zeros(saes[j].width, dtype=torch.bool)
        in_b[pair.decoder.partner[shared]] = True
        shared_everywhere[j] &= in_b[saes[j].counted]
    return {
        "labels": [sae.label for sae in saes],
        "shared_fraction": shared_fraction,
        "hungarian_mean_cosine": mcc,
        "found_in_all_others": {
            sae.label: float(found.float().mean()) if len(found) else float("nan")
            for sae, found in zip(saes, shared_everywhere, strict=True)
        },
        "pairs": summaries,
    }
