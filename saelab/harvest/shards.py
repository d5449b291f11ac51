"""Shard files: plain safetensors, written atomically with a sha256, read back memory-mapped.

Any safetensors reader can open a shard; saelab maps the tensors straight from the file so a
reader touches only the rows it asks for.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as encode_safetensors

from saelab.atomic import atomic_write_bytes, sha256_file
from saelab.errors import SaelabError
from saelab.harvest.manifest import ShardRecord

SHARD_DIR = "shards"
_NUMPY_VIEW = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "I32": np.int32, "I64": np.int64}
_TORCH_DTYPE = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def shard_file(index: int) -> str:
    """The store-relative file name of shard `index`."""
    return f"{SHARD_DIR}/shard-{index:06d}.safetensors"


def write_shard(
    store: Path, index: int, first_context: int, n_contexts: int, tensors: dict[str, torch.Tensor]
) -> ShardRecord:
    """Write one shard atomically and return its manifest record (row count from `token_ids`)."""
    data = encode_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()})
    relative = shard_file(index)
    atomic_write_bytes(store / relative, data)
    return ShardRecord(
        file=relative,
        first_context=first_context,
        n_contexts=n_contexts,
        n_rows=int(tensors["token_ids"].shape[0]),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def verify_shard(store: Path, record: ShardRecord, checksum: bool = True) -> None:
    """Raise a SaelabError naming the shard if it is missing, truncated or altered."""
    path = store / record.file
    if not path.is_file():
        raise SaelabError(f"shard {path} is listed in the manifest but missing; re-harvest or restore it")
    size = path.stat().st_size
    if size != record.bytes:
        raise SaelabError(
            f"shard {path} has {size} bytes, the manifest says {record.bytes}: it is truncated or altered"
        )
    if checksum and sha256_file(path) != record.sha256:
        raise SaelabError(f"shard {path} fails its sha256 check: it is corrupted; re-harvest it (delete it and rerun)")


def map_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of a safetensors file (copy-on-write: the file is never modified)."""
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    try:
        (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
        header = json.loads(raw[8 : 8 + header_len].tobytes())
    except (struct.error, ValueError) as error:
        raise SaelabError(f"{path} is not a readable safetensors file ({error}): it is damaged") from error
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        flat = raw[start + begin : start + end].view(_NUMPY_VIEW[info["dtype"]])
        tensor = torch.from_numpy(flat).view(_TORCH_DTYPE[info["dtype"]])
        tensors[name] = tensor.reshape(info["shape"])
    return tensors
