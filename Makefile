# Two commands: `make demo` and `make test` (each sets up .venv first). See README.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rtdmd-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup system-deps test test-fast demo demo-digits bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the supported CPU/GPU build pinned for these machines
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[pipeline,rewards,dev]'
	touch $(STAMP)

setup: $(STAMP) system-deps

# System packages some tests need (headless Chromium for the MLflow UI test, tesseract as an
# optional OCR backend). Installed with apt-get when missing and we are root.
system-deps:
	@bash scripts/system_deps.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	bash scripts/demo.sh

# the image demo: the whole flow on the digits backbone (models built by DVC, then cached)
demo-digits: setup
	bash scripts/demo_digits.sh

bench: setup
	$(PY) -m bench.run

# GPU check (README "GPU check"): no venv, runs from this checkout with the machine's python3 and
# the wheels of .whl/ (scripts/gpu_wheels.sh) installed into GPU_SITE; report in GPU_CHECK_OUT.
GPU_PY ?= python3
GPU_SITE ?= /tmp/rtdmd-gpu-site
GPU_CHECK_OUT ?= bench/out/gpu_check
GPU_CHECK_ARGS ?= --budget-s 480 --require-gpu
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(CURDIR):$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m bench.gpu_check \
		--out $(GPU_CHECK_OUT) --force $(GPU_CHECK_ARGS)

clean:
	rm -rf data/tiny data/toy2d runs outputs mlruns .metaflow
