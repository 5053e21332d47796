# flaxlm — the two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install the project (editable, with dev extras) on first use.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# 8 simulated CPU devices so every sharding path runs without accelerators.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: demo test lint format clean gpu-aot-venv gpu-image-venv test-gpu-image

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flaxlm.demo --workdir runs/demo

# Two test processes (pytest-xdist), a file's tests in one of them (module fixtures built once):
# the suite is mostly single-threaded tracing and compiling. TEST_WORKERS=0 runs it in-process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# bench/gpu_aot.py: compile for an H200 on a machine without a GPU. A second venv with this
# jax's CUDA plugin (~5.6 GB of CUDA libraries), kept out of .venv and of `make test`.
AOT_VENV := .venv-gpu-aot
gpu-aot-venv: $(STAMP)
	test -x $(AOT_VENV)/bin/python || python3 -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(AOT_VENV)/bin/python -m pip install -q -e . \
		"jax[cuda12]==$$($(PY) -c 'import jax; print(jax.__version__)')"

# The GPU machine's image pins (../shared/device/README.md: python 3.12, jax 0.11.2, flax 0.12.10,
# optax 0.2.8, orbax-checkpoint 0.12.4), with jax's CUDA plugin: `make test-gpu-image` runs the
# tests under the versions the GPU runs, and `$(GPU_IMAGE_VENV)/bin/python -m flaxlm.bench.gpu_aot`
# compiles for the H200 with the XLA it has. Needs a python3.12 (GPU_IMAGE_PY=/path/to/python3.12).
GPU_IMAGE_PY   ?= python3.12
GPU_IMAGE_VENV := .venv-gpu-image
GPU_IMAGE_PINS := "jax[cuda12]==0.11.2" flax==0.12.10 optax==0.2.8 orbax-checkpoint==0.12.4 \
	sentencepiece==0.2.2
$(GPU_IMAGE_VENV)/.installed-stamp: setup.py pyproject.toml
	test -x $(GPU_IMAGE_VENV)/bin/python || $(GPU_IMAGE_PY) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q -e '.[dev]' $(GPU_IMAGE_PINS)
	touch $@
gpu-image-venv: $(GPU_IMAGE_VENV)/.installed-stamp
# Two processes as `make test`: in one process jaxlib 0.11.2's CPU compiler segfaulted about
# three quarters through the suite (twice, in tests that pass alone); split in two it finishes.
test-gpu-image: $(GPU_IMAGE_VENV)/.installed-stamp
	$(TEST_ENV) $(GPU_IMAGE_VENV)/bin/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile \
		$(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
