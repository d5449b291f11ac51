"""Which latents are dead: not fired for `dead_tokens` tokens (the AuxK loss revives them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from saelab.kernels.sparse_ops import is_full

if TYPE_CHECKING:
    from saelab.distributed import DataParallel


class DeadLatentTracker:
    """Counts, per latent, the tokens since it last fired; its state is one tensor, so it checkpoints exactly.

    The counters live on the SAE's device and `update` never waits for it: on a GPU the host queues
    step after step. The one question the host must answer each step, whether AuxK's selection is
    needed at all, it answers from `may_have_dead`, an upper bound it keeps without waiting.

    With `data_parallel` a latent fired if it fired on any rank, and the tokens are the global batch's,
    so every rank holds the same counters and AuxK revives the same latents everywhere.
    """

    def __init__(
        self,
        d_sae: int,
        dead_tokens: int,
        data_parallel: DataParallel | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dead_tokens = dead_tokens
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.data_parallel = data_parallel
        self._bound = _LongestSilence(self.tokens_since_fired, exact=data_parallel is not None)

    def update(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """A batch of sparse rows (indices, values: [batch, k]): the latents with a value > 0 fired."""
        n = self.tokens_since_fired.shape[0]
        if is_full(indices, n):  # every latent's slot, in order: a dense [batch, n]
            fired = (values > 0).any(0)
        else:  # no boolean-mask indexing: its output size would make the host wait for the device
            firings = torch.zeros(n, dtype=torch.int32, device=indices.device)
            fired = firings.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.int32)) > 0
        tokens = indices.shape[0]
        if self.data_parallel is not None:  # reduced where the latents are (nccl needs GPU tensors)
            fired = self.data_parallel.max_(fired.to(torch.int32)).bool()
            tokens *= self.data_parallel.world_size  # equal slices
        counters = self.tokens_since_fired
        fired = fired.to(counters.device)
        counters.copy_(torch.where(fired, 0, counters + tokens))
        self._bound.advance(tokens, counters)

    def load_(self, tokens_since_fired: torch.Tensor) -> None:
        """Restore the counters (from a checkpoint, on any device)."""
        self.tokens_since_fired.copy_(tokens_since_fired)
        self._bound = _LongestSilence(self.tokens_since_fired, exact=self.data_parallel is not None)

    def cpu(self) -> DeadLatentTracker:
        """A copy on the CPU, without collectives: what a rank sends rank 0 to save with its SAE."""
        copy = DeadLatentTracker(len(self.tokens_since_fired), self.dead_tokens)
        copy.load_(self.tokens_since_fired.cpu())
        return copy

    def may_have_dead(self) -> bool:
        """False only when no latent can be dead yet; True may still find none (AuxK then adds nothing)."""
        return self._bound.value() >= self.dead_tokens

    @property
    def dead(self) -> torch.Tensor:
        """[d_sae] bool."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())


class _LongestSilence:
    """An upper bound on max(tokens_since_fired) that the host keeps without waiting for the device.

    The largest counter grows by at most a batch's tokens per update. On the CPU, and under data
    parallelism (every rank must make the same choice, so none may go by when its copy arrived), the
    bound is the exact maximum, read each update. Otherwise, on a GPU, a copy of the maximum is queued
    behind an update and read once it has arrived; until then the bound is the last arrived maximum
    plus every token counted since that copy was queued.
    """

    def __init__(self, counters: torch.Tensor, exact: bool) -> None:
        self.asynchronous = counters.is_cuda and not exact
        self._known = int(counters.max()) if counters.numel() else 0  # one wait, when training starts or resumes
        self._since_known = 0
        self._in_flight: tuple[torch.Tensor, Callable[[], bool], int] | None = None  # copy, arrived?, tokens then

    def advance(self, tokens: int, counters: torch.Tensor) -> None:
        self._since_known += tokens
        if not self.asynchronous:
            self._known, self._since_known = int(counters.max()), 0
            return
        self._collect()
        if self._in_flight is None:
            self._in_flight = (*self.queue_maximum(counters), self._since_known)

    def value(self) -> int:
        self._collect()
        return self._known + self._since_known

    def queue_maximum(self, counters: torch.Tensor) -> tuple[torch.Tensor, Callable[[], bool]]:
        """A host copy of max(counters) queued behind the device's work, and a test of whether it has arrived."""
        copy = torch.empty((), dtype=counters.dtype, pin_memory=True)
        copy.copy_(counters.max(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return copy, event.query

    def _collect(self) -> None:
        """Take the queued maximum if it has arrived: the bound is then it plus what was counted after it."""
        if self._in_flight is None or not self._in_flight[1]():
            return
        copy, _, counted_before = self._in_flight
        self._known, self._since_known = int(copy), self._since_known - counted_before
        self._in_flight = None
