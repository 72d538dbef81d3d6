# The two commands at the top of README.md. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: main test venv chromium

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

# Debian's Chromium for the index.html report test (installed when missing; needs root or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# CPU tests with 8 fake devices (set in tests/conftest.py); the diffusers/torch oracles and
# Chromium must be installed (their tests would otherwise skip). tests/conftest.py shares
# one JAX compilation cache, .jax_cache/tests, among the workers and the CLI subprocesses
# (empty in a fresh clone, so CI gains within one run; `rm -rf .jax_cache` clears it).
test: venv chromium
	MIRAGE_REQUIRE_ORACLES=1 MIRAGE_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q -x -n 2 tests
