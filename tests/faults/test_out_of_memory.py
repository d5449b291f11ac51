"""Out of memory (a patched allocator failure, as the GPU's or the host's allocator raises it): the job stops
with one line naming what ran out, how much was asked and which settings fix it; what it had written stays
valid, and rerunning the same command ends with what an uninterrupted run makes."""

from __future__ import annotations

import pytest
import torch
from faultlib import differences, in_process_cli, one_line_error, run_digest, store_digest
from pipeline import harvest_args, train_args

from saelab.out_of_memory import out_of_memory_error

GPU_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "1.25 GiB is free. Of the allocated memory 75.3 GiB is allocated by PyTorch"
)
CPU_MESSAGE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
    "you tried to allocate 3221225472 bytes."
)


def fail_on_call(real, n: int, error: BaseException):
    """`real`, except that its n-th call raises `error`."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise error
        return real(*args, **kwargs)

    return wrapper


def test_training_out_of_gpu_memory_is_one_line_and_resumes_bit_for_bit(reference, tmp_path, monkeypatch):
    import saelab.train.trainer as trainer

    run = tmp_path / "train"
    args = ["train", "--quiet", "--resume", *train_args(reference["store"], run)]
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "train_step", fail_on_call(trainer.train_step, 70, torch.OutOfMemoryError(GPU_MESSAGE)))
        code, _, stderr = in_process_cli(*args)
    line = one_line_error((code, stderr))
    assert "out of GPU memory (asked for 2.00 GiB)" in line, line
    assert all(knob in line for knob in ("batch_size", "encoder_tile", "bfloat16", "--resume")), line
    code, _, stderr = in_process_cli(*args)
    assert code == 0, stderr
    assert differences(run_digest(run), run_digest(reference["run"])) == []


def test_harvest_out_of_host_memory_is_one_line_and_resumes(reference, tiny_model_dir, tmp_path, monkeypatch):
    import saelab.harvest.harvester as harvester

    store = tmp_path / "store"
    args = ["harvest", "--quiet", *harvest_args(tiny_model_dir, store)]
    with monkeypatch.context() as patch:
        patch.setattr(harvester, "shard_tensors", fail_on_call(harvester.shard_tensors, 4, RuntimeError(CPU_MESSAGE)))
        code, _, stderr = in_process_cli(*args)
    line = one_line_error((code, stderr))
    assert "out of CPU memory (asked for 3.00 GiB): lower batch_size" in line and "rerun with" in line, line
    code, _, stderr = in_process_cli(*args)
    assert code == 0, stderr
    assert differences(store_digest(store), store_digest(reference["store"])) == []


@pytest.mark.parametrize(
    "error",
    [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("not enough memory"), KeyError("x")],
)
def test_other_errors_are_not_taken_for_out_of_memory(error):
    assert out_of_memory_error("train", error) is None
