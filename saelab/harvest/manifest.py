"""The activation store's manifest: what a store holds, how it was made, and each shard's checksum.

A shard counts as part of the store only once its record is in `manifest.json`; the manifest is
rewritten atomically after every shard, so readers and resumed harvests trust nothing else. (A
harvest on several ranks lists shards in per-rank partial manifests first and merges them here at
the end: `rank_manifests.py`.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saelab.atomic import atomic_write_json
from saelab.errors import SaelabError

STORE_FORMAT = "saelab-activation-store"
STORE_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRADIENT_SUFFIX = ".grad"


def gradient_name(hook: str) -> str:
    """The shard tensor holding ∂L/∂x at `hook` (`blocks.15.hook_resid_post.grad`)."""
    return hook + GRADIENT_SUFFIX


@dataclass
class ShardRecord:
    """One shard: contexts `[first_context, first_context + n_contexts)`, `n_rows` activation rows."""

    file: str
    first_context: int
    n_contexts: int
    n_rows: int
    bytes: int
    sha256: str


@dataclass
class StoreManifest:
    """Everything a reader needs to interpret the shards, and everything a harvest needs to resume.

    Row `r` of a shard belongs to context `first_context + r // rows_per_context`, at position
    `first_position + r % rows_per_context`; positions before `first_position` (the BOS / attention
    sink) are not stored. With `gradients`, each hook's rows have a twin `<hook>.grad`: the gradient
    of the loss `gradient_loss` describes with respect to that row's activation.
    """

    config: dict[str, Any]
    model: str
    hooks: list[str]
    d_model: int
    dtype: str
    context_size: int
    first_position: int
    n_contexts_planned: int
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    versions: dict[str, str]
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    # Added after version 1 shipped; a manifest without them reads as a store without gradients.
    gradients: bool = False
    gradient_loss: str | None = None
    # Only in a store harvested by several ranks (`torchrun`): how the shards were split among them.
    # Left out of the file when None, so a single-process manifest is byte for byte what it was.
    ranks: dict[str, Any] | None = None
    format: str = STORE_FORMAT
    version: int = STORE_VERSION

    @property
    def rows_per_context(self) -> int:
        return self.context_size - self.first_position

    @property
    def n_rows(self) -> int:
        return sum(shard.n_rows for shard in self.shards)

    @property
    def n_contexts(self) -> int:
        return sum(shard.n_contexts for shard in self.shards)

    def save(self, store: str | Path) -> None:
        fields = asdict(self)
        if fields["ranks"] is None:
            del fields["ranks"]
        atomic_write_json(Path(store) / MANIFEST_FILE, fields)


def read_manifest(store: str | Path) -> StoreManifest:
    """Read `store/manifest.json`; a missing or damaged manifest is a SaelabError naming the file."""
    path = Path(store) / MANIFEST_FILE
    if not path.is_file():
        raise SaelabError(f"{path} does not exist: {store} is not an activation store (make one with `saelab harvest`)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != STORE_FORMAT:
            raise SaelabError(f"{path} is not a saelab activation store manifest (format {raw.get('format')!r})")
        if raw.get("version") != STORE_VERSION:
            raise SaelabError(f"{path} has store version {raw.get('version')}; this saelab reads {STORE_VERSION}")
        shards = [ShardRecord(**record) for record in raw.pop("shards")]
        return StoreManifest(**raw, shards=shards)
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as error:
        raise SaelabError(f"{path} is damaged ({error}); re-harvest into a new folder") from error
