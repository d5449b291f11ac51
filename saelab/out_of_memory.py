"""Out of memory, said in one line: what ran out, how much was asked, and which config keys fix it.

torch raises `torch.OutOfMemoryError` when the GPU allocator fails and a RuntimeError naming its
`DefaultCPUAllocator` when the host's does; both arrive as a long traceback. Every job writes its
results atomically and checkpoints as it goes, so what is on disk stays valid and the same command,
rerun with a smaller setting, continues where the job stopped.
"""

from __future__ import annotations

import re

from saelab.errors import SaelabError

# What lowers each command's peak memory, most effective first.
FIXES = {
    "harvest": "lower batch_size (contexts per forward pass)",
    "train": "lower batch_size, or set encoder_tile (e.g. 4096: encode in tiles of latents) or dtype: bfloat16",
    "eval": "lower batch_size (contexts per forward pass)",
    "analyze": "lower batch_size (tokens per SAE pass)",
    "steer": "use fewer or shorter prompts, or a smaller max_new_tokens",
}
_CPU_ALLOCATOR = re.compile(r"DefaultCPUAllocator: (?:not enough memory|can't allocate memory)")
_GPU_ASKED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_CPU_ASKED = re.compile(r"you tried to allocate (\d+) bytes")


def out_of_memory_error(command: str, error: BaseException) -> SaelabError | None:
    """The one-line error for `error` if it is an allocator's failure in `command`, else None."""
    import torch  # the CLI starts without torch; an allocator failure means it was loaded

    message = str(error)
    if isinstance(error, torch.OutOfMemoryError):
        device, asked = "GPU", _GPU_ASKED.search(message)
    elif isinstance(error, RuntimeError) and _CPU_ALLOCATOR.search(message):
        device, asked = "CPU", _CPU_ASKED.search(message)
    else:
        return None
    amount = "" if asked is None else f" (asked for {_readable(asked.group(1))})"
    rerun = "rerun with --resume and the new setting" if command == "train" else "rerun with the new setting"
    return SaelabError(
        f"out of {device} memory{amount}: {FIXES.get(command, 'lower batch_size')}; what is on disk is intact: "
        f"{rerun} to continue"
    )


def _readable(amount: str) -> str:
    """torch's "2.00 GiB" as it is; the CPU allocator's byte count in GiB."""
    return f"{int(amount) / 2**30:.2f} GiB" if amount.isdigit() else amount
