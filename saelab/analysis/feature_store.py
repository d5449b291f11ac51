"""The feature store: one SQLite file per SAE holding a page per latent, for the dashboard to browse.

Why SQLite. The dashboard shows one latent at a time and sorts or filters all of them by density
and max; both are queries SQLite answers from an indexed file without reading the rest of it (a
page is one primary-key lookup, milliseconds however many latents there are), it is in the
standard library, a single file is easy to write atomically (built under a temporary name, then
renamed), and any SQLite tool can read it. A JSON or pickle file would have to be parsed whole
to show one page; Parquet/Arrow would add a dependency and suit column scans, not row lookups.

Tables:

    meta          key TEXT PRIMARY KEY, value TEXT (JSON): format, version, SAE label, model, hook,
                  tokens analysed, token budget, window sizes, …
    features      latent INTEGER PRIMARY KEY, n_firing, frequency, mean, max (plain columns for
                  sorting and filtering), page TEXT (JSON: histogram, contexts, logit effects)
    contexts      context INTEGER PRIMARY KEY, tokens TEXT (JSON token ids, null where no window
                  of any page reaches): windows store (context, start, length), not their tokens
    tokens        id INTEGER PRIMARY KEY, text TEXT: each token id used, as a string
    logit_tokens  token TEXT (stripped of surrounding whitespace), latent, sign (+1 pushed up,
                  −1 pushed down), rank, value; indexed by token for `search_by_logit_token`

A window's activations are stored sparsely, as `[offset, value]` for the entries that are not 0
(None, for a position the activation store does not hold, included), so a page of a sparse latent
is a few kilobytes. The file is never modified after it is renamed into place (a rerun replaces
it by another rename), so readers open it read-only and immutable.

Like every other saelab artefact it carries a checksum: `<file>.sha256` beside it holds the sha256 of
its bytes, written after the file is in place, and `FeatureStore` checks it on opening, so a byte
changed inside a page is an error naming the file rather than a wrong page (SQLite checks its own
structure, not the text it stores). A crash between the two writes leaves a mismatch, never a silent
error; `saelab analyze` rebuilds both. Version 2 is the first with the checksum.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saelab.atomic import DiskFullError, atomic_write_bytes, is_disk_full, sha256_file, size_text
from saelab.errors import SaelabError

FEATURE_STORE_FORMAT = "saelab-feature-store"
FEATURE_STORE_VERSION = 2
_MAX_PARAMETERS = 900  # below SQLite's oldest limit on `?` per statement (999)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    latent INTEGER PRIMARY KEY, n_firing INTEGER NOT NULL, frequency REAL NOT NULL,
    mean REAL NOT NULL, max REAL NOT NULL, page TEXT NOT NULL
);
CREATE TABLE contexts (context INTEGER PRIMARY KEY, tokens TEXT NOT NULL);
CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE logit_tokens (
    token TEXT NOT NULL, latent INTEGER NOT NULL, sign INTEGER NOT NULL, rank INTEGER NOT NULL, value REAL NOT NULL
);
"""
_INDEXES = "CREATE INDEX logit_tokens_by_token ON logit_tokens (token, sign);"


def checksum_path(path: str | Path) -> Path:
    """The file beside a feature store that holds its sha256."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


class FeatureIndexError(SaelabError, IndexError):
    """A latent index the feature store does not hold; the message names the valid range."""


@dataclass
class ContextWindow:
    """Tokens `start … start + len(tokens) − 1` of store context `context`, around `position`.

    `activations[i]` is the latent's activation at token i (0.0 where it did not fire), None where
    the activation store holds no row (positions before its `first_position`, e.g. the BOS).
    """

    context: int
    position: int
    start: int
    token_ids: list[int]
    tokens: list[str]
    activations: list[float | None]

    @property
    def highlight(self) -> int:
        """Index in `tokens` of the token this window is about."""
        return self.position - self.start

    @property
    def value(self) -> float | None:
        return self.activations[self.highlight]


@dataclass
class QuantileBand:
    """Contexts sampled uniformly from the activating tokens whose activation lies between the
    `low` and `high` quantiles of the latent's activations (fractions, e.g. 0.25 … 0.5)."""

    low: float
    high: float
    contexts: list[ContextWindow] = field(default_factory=list)


@dataclass
class LogitEffect:
    token_id: int
    token: str
    value: float


@dataclass
class FeaturePage:
    """Everything the dashboard shows for one latent.

    The histogram counts every activating token: bin b covers `[b·w, (b+1)·w)` with
    `w = histogram_bin_width`, up to the bin holding the max.
    """

    index: int
    n_firing: int
    frequency: float
    mean_activation: float
    max_activation: float
    histogram_bin_width: float
    histogram_counts: list[int]
    top_contexts: list[ContextWindow]
    quantile_bands: list[QuantileBand]
    positive_logits: list[LogitEffect]
    negative_logits: list[LogitEffect]


# ---- writing --------------------------------------------------------------------------------


def write_feature_store(path: str | Path, meta: dict[str, Any], pages: Iterable[FeaturePage]) -> int:
    """Write `pages` (any order, each latent once) and `meta` (JSON values) to `path`, all at once:
    the file is built under a temporary name beside it and renamed into place. Returns its size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        connection = sqlite3.connect(tmp)
        try:
            _fill(connection, meta, pages)
        finally:
            connection.close()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        atomic_write_bytes(checksum_path(path), f"{digest}\n".encode())
    except (OSError, sqlite3.Error) as error:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        full = isinstance(error, sqlite3.OperationalError) and "full" in str(error)
        if full or is_disk_full(error):
            # SQLite does not know the final size in advance: what it had written is a lower bound.
            needed = f"more than the {size_text(written)} written when the disk filled up"
            raise DiskFullError(path, needed) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _fill(connection: sqlite3.Connection, meta: dict[str, Any], pages: Iterable[FeaturePage]) -> None:
    # A temporary file renamed into place when complete needs no journal: a crash leaves only the temporary.
    connection.execute("PRAGMA journal_mode = OFF")
    connection.execute("PRAGMA synchronous = OFF")
    connection.executescript(_SCHEMA)
    contexts: dict[int, tuple[list, list]] = {}
    texts: dict[int, str] = {}
    n_latents = 0
    for page in pages:
        record = _page_record(page, contexts, texts)
        connection.execute(
            "INSERT INTO features VALUES (?, ?, ?, ?, ?, ?)",
            (page.index, page.n_firing, page.frequency, page.mean_activation, page.max_activation, record),
        )
        connection.executemany(
            "INSERT INTO logit_tokens VALUES (?, ?, ?, ?, ?)",
            [
                (effect.token.strip(), page.index, sign, rank, effect.value)
                for sign, effects in ((1, page.positive_logits), (-1, page.negative_logits))
                for rank, effect in enumerate(effects)
            ],
        )
        n_latents += 1
    connection.executemany(
        "INSERT INTO contexts VALUES (?, ?)",
        ((c, json.dumps(ids)) for c, (ids, _) in sorted(contexts.items())),
    )
    connection.executemany("INSERT INTO tokens VALUES (?, ?)", sorted(texts.items()))
    header = {"format": FEATURE_STORE_FORMAT, "version": FEATURE_STORE_VERSION, **meta, "n_latents": n_latents}
    connection.executemany("INSERT INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in header.items()))
    connection.executescript(_INDEXES)
    connection.commit()


def _page_record(page: FeaturePage, contexts: dict[int, tuple[list, list]], texts: dict[int, str]) -> str:
    """The page as JSON; its windows' tokens go to `contexts` (context → token ids and texts by position,
    None where unknown) and `texts` (id → text), checked for consistency so that reading is exact."""

    def window(w: ContextWindow) -> dict[str, Any]:
        n = len(w.tokens)
        if not len(w.token_ids) == n == len(w.activations):
            raise ValueError(f"latent {page.index}: a window's token_ids, tokens and activations differ in length")
        ids, strings = contexts.setdefault(w.context, ([], []))
        end = w.start + n
        if len(ids) < end:
            ids.extend([None] * (end - len(ids)))
            strings.extend([None] * (end - len(strings)))
        if ids[w.start : end] != w.token_ids or strings[w.start : end] != w.tokens:  # usually seen before
            for q, token_id, text in zip(range(w.start, end), w.token_ids, w.tokens, strict=True):
                if ids[q] is None:
                    ids[q], strings[q] = token_id, text
                if ids[q] != token_id:
                    raise ValueError(f"latent {page.index}: context {w.context} has two tokens at {q}")
                if texts.setdefault(token_id, text) != text or strings[q] != text:
                    raise ValueError(
                        f"latent {page.index}: token {token_id} has two texts ({texts[token_id]!r}, {text!r})"
                    )
        sparse = [[i, a] for i, a in enumerate(w.activations) if a != 0.0]
        return {"c": w.context, "p": w.position, "s": w.start, "n": n, "a": sparse}

    def effects(items: list[LogitEffect]) -> list[list[Any]]:
        return [[e.token_id, e.token, e.value] for e in items]

    return json.dumps(
        {
            "histogram": {"bin_width": page.histogram_bin_width, "counts": page.histogram_counts},
            "top": [window(w) for w in page.top_contexts],
            "bands": [
                {"low": b.low, "high": b.high, "contexts": [window(w) for w in b.contexts]} for b in page.quantile_bands
            ],
            "positive_logits": effects(page.positive_logits),
            "negative_logits": effects(page.negative_logits),
        },
        separators=(",", ":"),
    )


# ---- reading --------------------------------------------------------------------------------


class FeatureStore:
    """A feature store file, opened read-only. Safe to share between threads (one lock serialises queries)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SaelabError(f"{self.path} does not exist: no feature store there (make one with `saelab analyze`)")
        uri = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1"
        self._lock = threading.Lock()
        try:
            self._connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
            (page_count,) = self._connection.execute("PRAGMA page_count").fetchone()
            (page_size,) = self._connection.execute("PRAGMA page_size").fetchone()
            if page_count * page_size != self.path.stat().st_size:
                raise sqlite3.DatabaseError(f"{self.path.stat().st_size} bytes where SQLite expects {page_count} pages")
            self.meta: dict[str, Any] = {k: json.loads(v) for k, v in self._connection.execute("SELECT * FROM meta")}
        except (sqlite3.Error, ValueError) as error:
            raise self._damaged(error) from error
        if self.meta.get("format") != FEATURE_STORE_FORMAT:
            raise SaelabError(f"{self.path} is not a saelab feature store (format {self.meta.get('format')!r})")
        if self.meta.get("version") != FEATURE_STORE_VERSION:
            raise SaelabError(
                f"{self.path} has feature store version {self.meta.get('version')}; this saelab reads "
                f"{FEATURE_STORE_VERSION} (rerun `saelab analyze`)"
            )
        try:
            self._verify_checksum()
        except SaelabError:
            self._connection.close()
            raise

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n_latents={self.n_latents})"

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def feature(self, index: int) -> FeaturePage:
        """The page of latent `index`."""
        if not 0 <= index < self.n_latents:  # also keeps an index SQLite cannot hold (> 2^63) from the query
            raise FeatureIndexError(f"latent {index} is not in {self.path}; it holds latents [0, {self.n_latents})")
        row = self._query("SELECT n_firing, frequency, mean, max, page FROM features WHERE latent = ?", (index,))
        if not row:
            raise FeatureIndexError(f"latent {index} is not in {self.path}; it holds latents [0, {self.n_latents})")
        n_firing, frequency, mean, maximum, record = row[0]
        try:
            data = json.loads(record)
            windows = [*data["top"], *(w for band in data["bands"] for w in band["contexts"])]
            contexts = self._lookup("contexts", "context", {w["c"] for w in windows})
            ids = {t: json.loads(tokens) for t, tokens in contexts.items()}
            needed = {i for w in windows for i in ids[w["c"]][w["s"] : w["s"] + w["n"]]}
            texts = self._lookup("tokens", "id", needed)

            def window(w: dict[str, Any]) -> ContextWindow:
                token_ids = ids[w["c"]][w["s"] : w["s"] + w["n"]]
                activations: list[float | None] = [0.0] * w["n"]
                for offset, value in w["a"]:
                    activations[offset] = value
                return ContextWindow(w["c"], w["p"], w["s"], token_ids, [texts[i] for i in token_ids], activations)

            def effects(items: list[list[Any]]) -> list[LogitEffect]:
                return [LogitEffect(*item) for item in items]

            return FeaturePage(
                index=index,
                n_firing=n_firing,
                frequency=frequency,
                mean_activation=mean,
                max_activation=maximum,
                histogram_bin_width=data["histogram"]["bin_width"],
                histogram_counts=data["histogram"]["counts"],
                top_contexts=[window(w) for w in data["top"]],
                quantile_bands=[
                    QuantileBand(b["low"], b["high"], [window(w) for w in b["contexts"]]) for b in data["bands"]
                ],
                positive_logits=effects(data["positive_logits"]),
                negative_logits=effects(data["negative_logits"]),
            )
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise self._damaged(error) from error

    def summary_table(self) -> list[tuple[int, float, float, float]]:
        """`(index, frequency, max, mean)` of every latent, by index: for sorting and filtering by density and max."""
        return self._query("SELECT latent, frequency, max, mean FROM features ORDER BY latent")

    def peak_tokens(self, n_contexts: int) -> dict[int, tuple[list[str], list[str]]]:
        """Every latent's tokens at the peaks of its first `n_contexts` top contexts (strongest first) and its
        promoted tokens (its logit effects, largest first), in one pass over the file: what the token
        summaries of all latents need (`saelab.analysis.token_summary`), without building every page."""
        rows = self._query("SELECT latent, page FROM features ORDER BY latent")
        try:
            contexts = {c: json.loads(tokens) for c, tokens in self._query("SELECT context, tokens FROM contexts")}
            texts = dict(self._query("SELECT id, text FROM tokens"))
            found = {}
            for latent, record in rows:
                data = json.loads(record)
                fired = [texts[contexts[w["c"]][w["p"]]] for w in data["top"][:n_contexts]]
                found[latent] = (fired, [token for _, token, _ in data["positive_logits"]])
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise self._damaged(error) from error
        return found

    def search_by_logit_token(self, token: str, sign: Literal["positive", "negative"] = "positive") -> list[int]:
        """Latents whose top (`positive`) or bottom (`negative`) logit effects include `token`, strongest
        first. Matched exactly after stripping surrounding whitespace, so `Paris` finds ` Paris`."""
        if sign not in ("positive", "negative"):
            raise SaelabError(f"sign must be 'positive' or 'negative', not {sign!r}")
        order = "DESC" if sign == "positive" else "ASC"
        rows = self._query(
            f"SELECT latent FROM logit_tokens WHERE token = ? AND sign = ? ORDER BY value {order}, latent",
            (token.strip(), 1 if sign == "positive" else -1),
        )
        return [latent for (latent,) in rows]

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[FeaturePage]:
        for (index,) in self._query("SELECT latent FROM features ORDER BY latent"):
            yield self.feature(index)

    # ---- internals -----------------------------------------------------------------------

    def _query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._connection.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            raise self._damaged(error) from error

    def _lookup(self, table: str, key: str, wanted: set[int]) -> dict[int, Any]:
        """`{key: value}` of the rows of a two-column table whose key is in `wanted`."""
        found: dict[int, Any] = {}
        keys = sorted(wanted)
        for begin in range(0, len(keys), _MAX_PARAMETERS):
            chunk = tuple(keys[begin : begin + _MAX_PARAMETERS])
            marks = ",".join("?" * len(chunk))
            found.update(self._query(f"SELECT * FROM {table} WHERE {key} IN ({marks})", chunk))
        if len(found) != len(wanted):
            raise ValueError(f"{table} lacks entries the page refers to")
        return found

    def _verify_checksum(self) -> None:
        checksum = checksum_path(self.path)
        if not checksum.is_file():
            raise SaelabError(f"{self.path} has no checksum file {checksum.name} beside it; rerun `saelab analyze`")
        if sha256_file(self.path) != checksum.read_text().strip():
            raise SaelabError(
                f"{self.path} does not match its checksum ({checksum.name}): altered or damaged; rerun `saelab analyze`"
            )

    def _damaged(self, error: Exception) -> SaelabError:
        return SaelabError(f"{self.path} is not a readable feature store ({error}); rerun `saelab analyze`")
