# `make run`: set up (venv, torch, build) and run the main job, `mhgd-fast demo` (a few minutes). `make test`: set up and run the tests.
# CI runs `make test` with FORCE_CUDA=1 so the CUDA kernels are compiled too (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CUDA 13.0 build of torch: runs on the CPU and can also compile the CUDA kernels.
# TORCH=torch==2.13.0 gives the smaller CPU build (CPU kernels only).
TORCH ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: setup install run test bench study clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/deps.stamp: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet "$(TORCH)" -r requirements-dev.txt
	touch $@

setup: $(VENV)/deps.stamp

# Always re-run: ninja rebuilds only what changed under build/.
install: setup
	$(BIN)/pip install --no-build-isolation --no-deps --quiet .
	cd / && $(CURDIR)/$(BIN)/python -c "import mhgd_fast as mf; print('mhgd_fast', mf.__version__, 'backends:', mf.available_backends(), 'compiled:', mf.build_info()['compiled_backends'])"

run: install
	$(BIN)/mhgd-fast demo

test: install
	MHGD_REQUIRE_EXTENSION=1 $(BIN)/pytest tests --durations=15

bench: install
	$(BIN)/pytest benchmarks --benchmark-only

# The README's "Does MHGD help?" study: both built-in settings, recipe + ablations, 5 seeds each
# (about 2 hours on 2 cores when the two settings run side by side with THREADS=1; resumes).
THREADS ?= 2
study: install
	PATH="$(CURDIR)/$(BIN):$$PATH" tools/run_study.sh demo --threads $(THREADS)
	PATH="$(CURDIR)/$(BIN):$$PATH" tools/run_study.sh wide --threads $(THREADS)

# GPU check (tools/gpu_check.py): on a machine with a GPU and a torch that sees it, builds the CUDA
# extension in place, runs the CUDA tests, compute-sanitizer and the GPU benchmarks in under 8
# minutes; report in $(GPU_CHECK_OUT). Uses the venv when there is one, else the system python3 (a
# bare GPU machine has torch but no network): no install step. gpu-check-smoke: the same on the CPU.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_OUT ?= $(or $(OUT),gpu-check-out)
.PHONY: gpu-check gpu-check-smoke
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --out $(GPU_CHECK_OUT)

gpu-check-smoke:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --cpu-smoke --out $(GPU_CHECK_OUT)

# The CPU kernels under ASan + UBSan (MHGD_SANITIZE=1 build, cached in build/sanitize) and the
# simulated CUDA kernels under TSan, on the fuzz's fixed cases (part of `make test` too).
.PHONY: sanitize
sanitize: install
	$(BIN)/pytest tests/test_sanitizers.py

# Many more random op fuzz cases than `make test` runs (minutes).
.PHONY: fuzz
fuzz: install
	MHGD_FUZZ_PROFILE=deep $(BIN)/pytest tests/test_fuzz_ops.py

# nvcc resource report of the CUDA kernel headers (no GPU needed); fails on warnings or spills.
.PHONY: cuda-check
cuda-check: | $(BIN)/python
	$(BIN)/python tools/check_cuda_resources.py

clean:
	rm -rf build dist *.egg-info $(VENV)
