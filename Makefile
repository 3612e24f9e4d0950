# Two commands a newcomer needs: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# `make test-oldest`: the same suite in its own venv, at the oldest versions that
# pyproject.toml allows (pinned in .ci/oldest-constraints.txt).
OLDEST_VENV   ?= .venv-oldest
OLDEST_PY     := $(OLDEST_VENV)/bin/python
OLDEST_STAMP  := $(OLDEST_VENV)/.installed
OLDEST_PINS   := .ci/oldest-constraints.txt

.PHONY: demo demo-lm test test-oldest lint docs dist bench bench-quick bench-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One install of the package (editable) with its test, docs and example extras;
# redone whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,docs,examples]'
	touch $@

demo: $(STAMP)
	$(PY) examples/train_digits.py

# The language-model example: fused linear cross-entropy in a training loop (examples/README.md).
demo-lm: $(STAMP)
	$(PY) examples/train_tiny_lm.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# The HTML site in docs/_build/html, offline, warnings as errors.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

# The release artefacts: sdist and wheel in dist/, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist
	$(PY) -m twine check --strict dist/*

$(OLDEST_PY):
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install --quiet --upgrade pip

$(OLDEST_STAMP): pyproject.toml $(OLDEST_PINS) | $(OLDEST_PY)
	$(OLDEST_PY) -m pip install --quiet -c $(OLDEST_PINS) -e '.[dev,docs,examples]'
	touch $@

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -c "import jax, jaxlib, optax, numpy; print('oldest:', 'jax', jax.__version__, \
	  'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__)"
	$(OLDEST_PY) -m pytest -n 2 -q

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The full sweep, then issue 11's speed targets with their ratios and ok / MISS.
# A report, not a test: `make test` does not run it.
bench-check: $(STAMP)
	$(PY) benchmarks/check.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis runs \
	  docs/_build build dist
