# Two commands on a fresh machine:  `make demo`  and  `make test`.
# torch is installed first and only if missing: `pip install torch==2.13.0` picks the
# right build for the machine (CUDA wheels on GPU hosts from PyPI), and an existing
# torch of any supported version is kept as it is.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= 2.13.0

.PHONY: setup demo example-merge test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,postgres]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/brmerge demo

example-merge: setup
	$(PY) -m examples.make_models examples/models
	$(VENV)/bin/brmerge merge examples/ties.yaml --out out/ties-merge --overwrite

test: setup
	$(VENV)/bin/python -m pytest -q
