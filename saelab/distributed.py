"""The process group of a `torchrun` job: who this process is, and the few collectives saelab needs.

`torchrun --nproc_per_node=N -m saelab …` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in their environment; `init_from_environment()` joins them into one
group (`nccl` when CUDA is there, else `gloo`). Without those variables, or with WORLD_SIZE=1,
nothing is initialised and every helper here is a no-op, so single-process code paths stay as
they were.

Barriers and small Python objects go over a separate gloo group even under nccl: gloo's
`monitored_barrier` names the ranks that did not arrive, and a rank that died closes its sockets,
so a survivor gets an error at once instead of hanging. Every collective failure is raised as a
`SaelabError` that says which rank saw it, during what, and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from saelab.errors import SaelabError

T = TypeVar("T")

# How long a barrier waits for the slowest rank: ranks may be a whole shard (minutes) apart at the end.
TIMEOUT_ENV = "SAELAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800

_control_group: Any = None


def launched() -> bool:
    """Whether this process was started as one of several ranks (torchrun with WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment() -> None:
    """Join the torchrun job's process group once; a no-op in a single process or when already joined."""
    global _control_group
    if not launched() or dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        _control_group = None  # the default group is gloo already


def shutdown(together: bool = False) -> None:
    """Leave the process group (if this process joined one). `together` (a clean end): first wait for every
    rank, so that no rank tears down its sockets while another still reads them; a gloo rank whose peer
    left mid-teardown can abort ("terminate called without an active exception")."""
    global _control_group
    if dist.is_initialized():
        if together:
            barrier("the end of the job")
        dist.destroy_process_group()
    _control_group = None


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs and writes shared files."""
    return rank() == 0


def device_for(device: str) -> str:
    """`auto` → this rank's GPU (`cuda:LOCAL_RANK`) when there is one, else the CPU; others unchanged."""
    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if is_distributed() else "cuda"
        return "cpu"
    return device


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, was killed, or hung past the timeout) into a clear SaelabError."""
    try:
        yield
    except SaelabError:
        raise
    except (RuntimeError, dist.DistError) as error:  # gloo/nccl report a lost peer as a RuntimeError
        raise SaelabError(
            f"rank {rank()} of {world_size()}: {what} failed because another rank stopped or stopped answering "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}). The launcher's output names "
            "the rank that failed; fix its cause and rerun the same torchrun command: the job resumes from "
            "what was finished"
        ) from error


def barrier(what: str) -> None:
    """Wait for every rank; a rank that died or does not arrive within the timeout is an error naming it."""
    if not is_distributed():
        return
    with collective(what):
        dist.monitored_barrier(group=_control_group, timeout=timedelta(seconds=timeout_s()), wait_all_ranks=True)


def broadcast_object(value: T, what: str, source: int = 0) -> T:
    """`value` as rank `source` has it, on every rank (small picklable objects)."""
    if not is_distributed():
        return value
    box = [value]
    with collective(what):
        dist.broadcast_object_list(box, src=source, group=_control_group)
    return box[0]


def gather_objects(value: T, what: str) -> list[T]:
    """Every rank's `value`, in rank order, on every rank (small picklable objects)."""
    if not is_distributed():
        return [value]
    found: list[Any] = [None] * world_size()
    with collective(what):
        dist.all_gather_object(found, value, group=_control_group)
    return found


def gather_to_main(value: T, what: str) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere); picklable objects, CPU tensors."""
    if not is_distributed():
        return [value]
    found: list[Any] | None = [None] * world_size() if is_main() else None
    with collective(what):
        dist.gather_object(value, found, dst=0, group=_control_group)
    return found


def run_on_main(function: Callable[[], T], what: str) -> T:
    """Run `function` on rank 0 only; every rank gets its result, or raises the SaelabError it raised.

    So a refusal on rank 0 (a locked folder, a changed config) stops the whole job with the same
    one-line message on every rank, instead of leaving the other ranks waiting.
    """
    result, error = None, None
    if is_main():
        try:
            result = function()
        except SaelabError as raised:
            error = str(raised)
            if not is_distributed():
                raise
    result, error = broadcast_object((result, error), what)
    if error is not None:
        raise SaelabError(error)
    return result  # type: ignore[return-value]


def agree_on_error(error: SaelabError | None, what: str) -> None:
    """Raise on every rank if any rank met a SaelabError (the lowest rank's message), else return."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    messages = gather_objects(None if error is None else str(error), what)
    for source, message in enumerate(messages):
        if message is not None:
            raise SaelabError(message if source == rank() else f"rank {source}: {message}")


class DataParallel:
    """All-reduces for data-parallel training over the default process group (each a no-op on one rank).

    Tensors are reduced in place and returned. Gradients and statistics go through the default
    group (nccl on GPUs), so they stay on the device.
    """

    def __init__(self) -> None:
        self.rank = rank()
        self.world_size = world_size()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        with collective("an all-reduce (sum)"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        with collective("an all-reduce (max)"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor` (a new, detached tensor; `tensor` is left alone)."""
        return self.sum_(tensor.detach().clone())

    def sum_gradients_(self, module: torch.nn.Module) -> None:
        """Replace every parameter's gradient with its sum over ranks, in one coalesced all-reduce."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        for grad, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(reduced.view_as(grad))

    def slice_of(self, batch_size: int) -> slice:
        """This rank's contiguous rows of a global batch of `batch_size` (a multiple of the world size)."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)
