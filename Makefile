# The two commands at the top of README.md. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: main test venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,oracle]"
	touch $@

venv: $(VENV)/.installed

# Fresh clone -> dataset -> trained tiny model -> revisit videos -> benchmark table.
main: venv
	$(BIN)/python -m mirage_jax.main_job --workdir=runs/tiny

# CPU tests with 8 fake devices (set in tests/conftest.py); the diffusers/torch oracles must
# be installed (the parity tests would otherwise skip).
test: venv
	MIRAGE_REQUIRE_ORACLES=1 $(BIN)/python -m pytest -q -x -n 2 tests
