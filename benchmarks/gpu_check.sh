#!/usr/bin/env bash
# saelab's GPU checks in one go, for a short time on a lent H100 or H200 (4–6 minutes, estimated):
#   1. the kernel, step and trainer tests on CUDA (the Triton kernels native, the trainer's GPU path), the
#      kernels' self-checks and `saelab doctor` (tests/test_kernel_self_check.py, tests/test_doctor.py);
#   2. benchmarks/data_path.py: `saelab train` from a store and from a tensor beside the bare step, and a
#      profile of the store run;
#   3. benchmarks/training_step.py --device cuda: the step against sparsify and the GEMM + Adam floor, four shapes;
#   4. torch.profiler tables of the largest shape, unfused and fused (the tiled mode);
#   5. benchmarks/bf16.py: the bf16 encoder product's FVU effect on a GPU (on a synthetic store).
# Each part has its own time limit, so one that hangs cannot eat the others' time; the limits sum to
# 590 s, under the device tool's 600 s a call.
#
#   bash benchmarks/gpu_wheels.sh          # here, once: sparsify and its imports as wheels in .whl/
#   then on the GPU machine, from the repo root, with .whl/ carried along:
#   bash benchmarks/gpu_check.sh           # logs go to $OUT when set (the device tool's), else /tmp/gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
run() {  # run NAME SECONDS COMMAND...: its output to the screen and to $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
run tests 110 python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_sparse_forward.py tests/test_train_parts.py tests/test_kernel_self_check.py \
  tests/test_doctor.py::test_doctor_on_this_machine \
  "tests/test_trainer.py::test_a_gpu_run_trains_the_sweep_as_a_cpu_run_does"
run data_path 75 python3 benchmarks/data_path.py --device cuda --n-latents 9216 --steps 300 --log-every 50 --profile
run kernels 255 python3 benchmarks/training_step.py --device cuda
run profile 80 python3 benchmarks/training_step.py --device cuda --profile saelab-bf16 saelab-bf16-tiled \
  --shapes 4096,131072,64,4096
run bf16 70 python3 benchmarks/bf16.py --device cuda --synthetic 262144 --tokens 2048000
