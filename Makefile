# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and (re)install the project when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.anytopo-installed

.PHONY: install demo test test-fast bench bench-ckpt bench-train gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest

clean:
	rm -rf demo-output .pytest_cache bench/results
