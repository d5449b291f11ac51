"""The per-rank partial manifests of a harvest run by several processes (`torchrun`).

While ranks harvest, `manifest.json` is rank 0's alone and lists only shards merged earlier; each
rank lists the shards it finished in its own `ranks/rank-<r>.json`, rewritten atomically after every
shard (so a listed shard is whole, its sha256 recorded). Once every rank is done, rank 0 merges the
lists into `manifest.json`, marks it complete and deletes `ranks/`. A rerun reads every rank file
(whatever world size wrote it) to skip the shards already made.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from saelab.atomic import atomic_write_json
from saelab.errors import SaelabError
from saelab.harvest.manifest import ShardRecord

RANK_DIR = "ranks"


def rank_manifest_path(store: Path, rank: int) -> Path:
    return store / RANK_DIR / f"rank-{rank:05d}.json"


def save_rank_shards(store: Path, rank: int, world_size: int, shards: list[ShardRecord]) -> None:
    """List `shards` as finished by `rank` (atomic: the file has its old list or the new one)."""
    payload = {"rank": rank, "world_size": world_size, "shards": [asdict(record) for record in shards]}
    atomic_write_json(rank_manifest_path(store, rank), payload)


def read_rank_shards(path: Path) -> list[ShardRecord]:
    try:
        return [ShardRecord(**record) for record in json.loads(path.read_text())["shards"]]
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as error:
        raise SaelabError(
            f"{path} is damaged ({error}); delete it (its shards will be harvested again) and rerun"
        ) from error


def all_rank_shards(store: Path) -> dict[str, ShardRecord]:
    """Every shard some rank has listed, by file name (store-relative)."""
    folder = store / RANK_DIR
    found: dict[str, ShardRecord] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("rank-*.json")):
            found.update({record.file: record for record in read_rank_shards(path)})
    return found
