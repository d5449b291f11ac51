"""`saelab doctor`: its real output on this machine, parsed; CUDA and Triton simulated, so that the GPU branch
runs too; and a torch that does not import, which must be a line and not a traceback."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from saelab import doctor
from saelab.kernels import backend, self_check

KERNELS = list(self_check.DEFAULT_KERNELS)


def run_doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saelab", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def lines_by_name(output: str) -> dict[str, str]:
    """`name: value` of every fact line (three columns of marks and padding, then the name, then the value)."""
    found = {}
    for line in output.splitlines():
        if line.startswith(" ") and len(line) > 3:
            name, _, value = line[3:].partition("  ")
            found[name.strip()] = value.strip()
    return found


def test_doctor_on_this_machine(tmp_path):
    result = run_doctor("--runs", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    facts = lines_by_name(result.stdout)
    assert facts["torch"].startswith(torch.__version__)
    assert facts["python"].startswith(".".join(map(str, sys.version_info[:3])))
    assert set(KERNELS) <= set(facts) and {"backend", "encoder product", "selection", "encoder_tile set"} <= set(facts)
    if torch.cuda.is_available():  # benchmarks/gpu_check.sh: the self-checks run on the real GPU
        assert facts["jobs run on"].startswith("cuda:") and "gpu memory" in facts
        assert all(facts[kernel].startswith("Triton, self-check passed") for kernel in KERNELS), facts
    else:
        assert facts["jobs run on"].startswith("cpu (device: auto)")
        assert facts["backend"] == "torch: the cpu device runs torch (Triton kernels run on CUDA)"
        assert facts["numba"] == importlib.metadata.version("numba")
        for kernel in KERNELS:  # numba is a dependency: the kernels it compiles say so
            route = "compiled with numba (" if kernel in doctor.COMPILED_ON_CPU else "torch ("
            assert facts[kernel].startswith(route), (kernel, facts[kernel])
        assert facts["selection"].startswith("top-k by group maxima (row_topk, compiled)")
        assert facts["encoder product"] == "dense addmm in float32 (dtype: auto on cpu)"
    assert facts["offline model"].startswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # the real offline model's file
    assert facts["runs folder"].startswith(f"{tmp_path / 'runs'} (not made yet): ")
    assert result.stdout.strip().splitlines()[-1].startswith("saelab doctor: usable")
    assert len(result.stdout.splitlines()) <= 40, "one screen"


def test_doctor_imports_no_model_stack():
    stack = "{'transformer_lens', 'transformers'}"
    code = f"import sys; from saelab.doctor import gather; gather(); print(sorted({stack} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def simulated_gpu(monkeypatch):
    """torch sees one H100; Triton counts as installed; each self-check returns what `verdicts` says."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70 * gib, 80 * gib))
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    checked = []

    def check(kernel, device, dtype=torch.float32):
        checked.append((kernel, str(device)))
        if kernel == "rows_transpose_matmul":
            return self_check.CheckResult(kernel, str(device), dtype, False, "CompilationError: out of resources")
        return self_check.CheckResult(kernel, str(device), dtype, True, "max relative difference 3e-08")

    monkeypatch.setattr(self_check, "check", check)
    return checked


def test_doctor_on_a_simulated_gpu_runs_the_self_checks_and_reports_each_kernel(simulated_gpu, tmp_path):
    facts = doctor.gather(tmp_path)
    shown = lines_by_name(doctor.render(facts))
    assert shown["jobs run on"] == "cuda:0 (device: auto), 1 GPU(s) visible"
    assert shown["gpu"] == "NVIDIA H100 80GB HBM3, compute capability 9.0"
    assert shown["gpu memory"] == "70.0 GiB free of 80.0 GiB"
    assert shown["backend"] == "Triton: CUDA with Triton installed"
    assert shown["encoder product"] == "dense addmm in bfloat16 (dtype: auto on cuda)"
    assert shown["selection"].startswith("torch.topk; not fused: no encoder_tile")
    assert shown["encoder_tile set"].startswith("fused Triton top-k: ")
    assert sorted(simulated_gpu) == sorted((kernel, "cuda") for kernel in KERNELS)
    for kernel in KERNELS:
        if kernel == "rows_transpose_matmul":
            assert shown[kernel] == "torch: Triton failed its self-check: CompilationError: out of resources"
        else:
            assert shown[kernel].startswith("Triton, self-check passed: max relative difference 3e-08")
    assert [f.name for f in facts if f.level == "warn"] == ["rows_transpose_matmul"] and doctor.usable(facts)


def test_doctor_on_a_simulated_gpu_with_triton_switched_off(simulated_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "0")
    shown = lines_by_name(doctor.render(doctor.gather(tmp_path)))
    assert shown["backend"] == "torch: SAELAB_TRITON=0 forces torch"
    assert all(shown[kernel].startswith("torch (") for kernel in KERNELS) and not simulated_gpu


def test_a_torch_that_does_not_import_is_a_line_and_exit_2_not_a_traceback(tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("libcudart.so.12: cannot open shared object file")\n')
    path = os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).resolve().parents[1])])
    result = run_doctor("--runs", str(tmp_path), env={"PYTHONPATH": path})
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2
    facts = lines_by_name(result.stdout)
    missing = "ImportError: libcudart.so.12: cannot open shared object file"
    assert facts["torch"] == f"cannot be imported ({missing}); reinstall it (docs/gpu.md)"
    assert "NOT usable" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "saelab doctor: error: saelab cannot run here until this is fixed: torch: cannot be imported"
    )
