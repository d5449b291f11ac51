"""Feature store read latency: open the file and load one random latent's page, against reading the same bytes.

The store is built from synthetic pages shaped like `saelab analyze`'s defaults (20 top contexts and
4 × 5 sampled ones, 33-token windows of a sparse latent, a 64-bin histogram, 10 + 10 logit effects)
over a synthetic corpus of 128-token contexts, for a 16k-latent SAE. Each timed load opens the file
afresh (`FeatureStore(path)`), reads one random page and closes it, as a dashboard process starting
on a page would. The floor, measured in the same run on the same disk: open a plain file, read the
bytes that page's rows occupy (its record, its contexts' token ids, its token texts), close; and the
same plus parsing the record's JSON, which any format that stores JSON must do. The OS page cache is
warm for both (the file was just written), so this is the software cost, not the disk's.

    python benchmarks/feature_store.py [--latents 16384] [--loads 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from saelab.analysis.feature_store import (
    ContextWindow,
    FeaturePage,
    FeatureStore,
    LogitEffect,
    QuantileBand,
    write_feature_store,
)

CONTEXT_SIZE, N_CONTEXTS, VOCAB = 128, 1613, 49152  # the default store's shape
BEFORE, AFTER = 24, 8


def synthetic_pages(n_latents: int, seed: int = 0):
    """Pages like analyze's: windows over shared contexts, a few nonzero activations per window."""
    rng = random.Random(seed)
    contexts = [[rng.randrange(VOCAB) for _ in range(CONTEXT_SIZE)] for _ in range(N_CONTEXTS)]

    def window(peak: float) -> ContextWindow:
        c, p = rng.randrange(N_CONTEXTS), rng.randrange(1, CONTEXT_SIZE)
        start, end = max(0, p - BEFORE), min(CONTEXT_SIZE, p + AFTER + 1)
        activations = [0.0 if rng.random() < 0.85 else round(rng.uniform(0, peak), 3) for _ in range(start, end)]
        activations[p - start] = round(peak, 4)
        if start == 0:
            activations[0] = None  # the BOS: no stored row
        ids = contexts[c][start:end]
        return ContextWindow(c, p, start, ids, [f"tok{i}" for i in ids], activations)

    for index in range(n_latents):
        top = sorted((rng.uniform(1, 10) for _ in range(20)), reverse=True)
        yield FeaturePage(
            index=index,
            n_firing=rng.randrange(1, 20_000),
            frequency=rng.random() / 10,
            mean_activation=rng.uniform(0.5, 2),
            max_activation=top[0],
            histogram_bin_width=top[0] / 40,
            histogram_counts=[rng.randrange(1000) for _ in range(41)],
            top_contexts=[window(v) for v in top],
            quantile_bands=[
                QuantileBand(b / 4, (b + 1) / 4, [window(rng.uniform(0.1, 1)) for _ in range(5)]) for b in range(4)
            ],
            positive_logits=[LogitEffect(i, f"tok{i}", rng.uniform(0, 1)) for i in rng.sample(range(VOCAB), 10)],
            negative_logits=[LogitEffect(i, f"tok{i}", -rng.uniform(0, 1)) for i in rng.sample(range(VOCAB), 10)],
        )


def page_rows(path: Path, index: int) -> tuple[int, str]:
    """Latent `index`'s record, and how many bytes its rows hold: the record, its contexts' token ids
    and its tokens' texts (8 bytes per token id)."""
    db = sqlite3.connect(path)
    (record,) = db.execute("SELECT page FROM features WHERE latent = ?", (index,)).fetchone()
    page = json.loads(record)
    windows = [*page["top"], *(w for band in page["bands"] for w in band["contexts"])]
    contexts = sorted({w["c"] for w in windows})
    marks = ",".join("?" * len(contexts))
    rows = dict(db.execute(f"SELECT context, tokens FROM contexts WHERE context IN ({marks})", contexts))
    ids = sorted({i for w in windows for i in json.loads(rows[w["c"]])[w["s"] : w["s"] + w["n"]]})
    marks = ",".join("?" * len(ids))
    texts = [t for (t,) in db.execute(f"SELECT text FROM tokens WHERE id IN ({marks})", ids)]
    db.close()
    return len(record) + sum(map(len, rows.values())) + sum(len(t.encode()) + 8 for t in texts), record


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:8.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=16_384)
    parser.add_argument("--loads", type=int, default=50, help="random latents to load (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.sqlite"
        start = time.perf_counter()
        size = write_feature_store(path, {"sae": "synthetic"}, synthetic_pages(args.latents))
        write_seconds = time.perf_counter() - start

        latents = random.Random(1).sample(range(args.latents), args.loads)
        plain = Path(folder) / "plain.bin"
        plain.write_bytes(os.urandom(size) if size < 2**31 else b"\0" * size)
        loads, opens, warm, reads, parses = [], [], [], [], []
        for index in latents:
            start = time.perf_counter()
            with FeatureStore(path) as store:
                opened = time.perf_counter()
                page = store.feature(index)
                loads.append(time.perf_counter() - start)
                opens.append(opened - start)
                start = time.perf_counter()
                store.feature(index)
                warm.append(time.perf_counter() - start)
            assert page.index == index and len(page.top_contexts) == 20

            n, record = page_rows(path, index)
            offset = random.Random(index).randrange(max(1, size - n))
            start = time.perf_counter()
            with open(plain, "rb") as handle:
                handle.seek(offset)
                data = handle.read(n)
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            with open(plain, "rb") as handle:
                handle.seek(offset)
                data = handle.read(n)
            json.loads(record)
            parses.append(time.perf_counter() - start)
            assert len(data) == n

        with FeatureStore(path) as store:
            start = time.perf_counter()
            table = store.summary_table()
            table_seconds = time.perf_counter() - start
            start = time.perf_counter()
            found = store.search_by_logit_token(page.positive_logits[0].token)
            search_seconds = time.perf_counter() - start
        assert len(table) == args.latents and page.index in found

    print(f"feature store: {args.latents:,} latents, {size / 2**20:,.1f} MiB, written in {write_seconds:.1f} s")
    print(f"{'operation (median of ' + str(args.loads) + ' random latents)':<58}{'ms':>8}")
    print(f"{'  open + load one page (FeatureStore(path).feature(i))':<58}{median_ms(loads)}")
    print(f"{'    of which opening the file (FeatureStore(path))':<58}{median_ms(opens)}")
    print(f"{'  load one page again from the open store':<58}{median_ms(warm)}")
    print(f"{'  floor: open + read the same bytes from a plain file':<58}{median_ms(reads)}")
    print(f"{'  floor: … + parse the page JSON':<58}{median_ms(parses)}")
    print(f"{'  max over the loads':<58}{max(loads) * 1e3:8.3f}")
    print(f"{'  summary_table() of every latent (once)':<58}{table_seconds * 1e3:8.3f}")
    print(f"{'  search_by_logit_token (once)':<58}{search_seconds * 1e3:8.3f}")


if __name__ == "__main__":
    main()
