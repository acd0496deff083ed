# histofed: two commands for a newcomer.
#   make demo   bootstrap .venv from scratch, then run the federated demo
#   make test   bootstrap .venv from scratch, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real data for the demo: $HISTOFED_DATA, else ../shared/data when it exists, else synthetic tiles.
DATA_ROOT ?= $(or $(HISTOFED_DATA),$(wildcard ../shared/data))
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

.PHONY: venv demo test bench clean

$(BIN)/histofed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel (anything unpinned pulls CUDA builds)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/histofed

venv: $(BIN)/histofed

demo: venv
	$(BIN)/histofed demo $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

test: venv
	# pytest exits 5 when no test is collected: not a failure of the suite.
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: venv
	$(BIN)/python benchmarks/overhead.py $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

clean:
	rm -rf $(VENV) build *.egg-info
