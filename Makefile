# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

# torch==2.13.0 first: the local CPU wheel, so no CUDA packages are pulled.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

demo: install
	bash examples/demo.sh

lint: install
	$(BIN)/ruff check dcpo_cli tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
