#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.sh needs on a GPU machine that has torch, Triton, pytest,
# numpy, safetensors, tqdm, pyyaml, transformers, accelerate and huggingface-hub but no network: sparsify and
# what it imports beyond those. They land in .whl/ (git-ignored); carry that folder to the GPU machine.
# SAELens is left out: it needs transformer-lens and its dependencies, too much to carry for one column.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  eai-sparsify==1.3.3 natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la .whl
