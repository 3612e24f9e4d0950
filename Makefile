# Two commands a newcomer needs: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick bench-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One install of the package (editable) with its test and example extras; redone
# whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,examples]'
	touch $@

demo: $(STAMP)
	$(PY) examples/train_digits.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The full sweep, then issue 11's speed targets with their ratios and ok / MISS.
# A report, not a test: `make test` does not run it.
bench-check: $(STAMP)
	$(PY) benchmarks/check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs
