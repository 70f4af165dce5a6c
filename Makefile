# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Pinned only here (dev / CI); pyproject keeps wide ranges. torch 2.14.1 + torchvision 0.29.1
# are what this machine's pip serves from local disk (CUDA build, runs on the CPU too).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The GPU machine runs triton 3.6.0; the dev / CI venv has the newest. The AOT suite compiles every
# kernel config with both (tests/test_aot.py), so a config that spills under one fails here.
TRITON_ALT ?= 3.6.0
TRITON_ALT_DIR := build/triton-$(TRITON_ALT)
# The CUDA extension is not built by `pip install` here: tests/test_cuda_backend.py builds it once
# (sm_80 + sm_90, ptxas report) and the cuda backend JIT-builds it on first GPU use. Set 1 to
# prebuild fastvit._C during the install instead.
FASTVIT_BUILD_CUDA ?= 0
# fastvit._signature (fastvit/_signature.cpp: the op-call plan key in C++, the host fast path of
# fastvit.ops) is built by the install, ~1 min here; 1 = a failed build fails the install, and
# `make test` checks that the ops run it (FASTVIT_REQUIRE_SIGNATURE=1).
FASTVIT_BUILD_EXT ?= 1

.PHONY: all install demo test test-fast bench clean

all: test

$(STAMP): pyproject.toml setup.py fastvit/_signature.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q setuptools wheel
	FASTVIT_BUILD_CUDA=$(FASTVIT_BUILD_CUDA) FASTVIT_BUILD_EXT=$(FASTVIT_BUILD_EXT) $(PIP) install -q -e ".[test,hf,viz,bench,fast,ray,data,serve]" --no-build-isolation
	touch $(STAMP)

$(TRITON_ALT_DIR)/.installed: $(STAMP)
	rm -rf $(TRITON_ALT_DIR)
	$(PIP) install -q --no-deps --target $(TRITON_ALT_DIR) triton==$(TRITON_ALT)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastvit demo --out demo_out

test: $(STAMP) $(TRITON_ALT_DIR)/.installed
	FASTVIT_REQUIRE_SIGNATURE=$(FASTVIT_BUILD_EXT) FASTVIT_AOT_TRITON=$(TRITON_ALT_DIR) $(PY) -m pytest -q --timeout=1800 tests benchmarks -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info demo_out .pytest_cache fastvit/_signature*.so
