# The two commands at the top of README.md. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: main test venv debian-packages

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The main job's install: the package and Apache Beam (every dataset build runs on it).
$(VENV)/.installed-main: setup.py $(BIN)/python
	$(BIN)/pip install -q -e ".[beam]"
	touch $@

# The test install adds the test tools, the numerical oracles (torch, diffusers), the
# Memory Maze extra and libtpu (AOT tests), so that no test has a reason to skip.
$(VENV)/.installed-test: setup.py $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,oracle,memory_maze,tpu]"
	# The LPIPS oracle without its torchvision requirement (setup.py, "oracle").
	$(BIN)/pip install -q --no-deps lpips==0.1.4
	touch $@

venv: $(VENV)/.installed-main

# Fresh clone -> dataset -> trained tiny model -> revisit videos -> benchmark table.
main: venv
	$(BIN)/python -m mirage_jax.main_job --workdir=runs/tiny

# Debian's packages the tests need, installed when missing (needs root or sudo): Chromium
# for the index.html report test, libosmesa6 for Memory Maze's headless MuJoCo rendering.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
debian-packages:
	@{ command -v chromium >/dev/null 2>&1 && dpkg -s libosmesa6 >/dev/null 2>&1; } || { \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium libosmesa6; }

# CPU tests with 8 fake devices (set in tests/conftest.py). MIRAGE_NO_SKIPS=1: a missing
# test dependency is an error at start-up and any skipped test fails the run
# (tests/conftest.py). Every test has a time limit (pytest-timeout; pytest.ini). The suite
# shares one JAX compilation cache, .jax_cache/tests, among the workers and the CLI
# subprocesses (empty in a fresh clone, so CI gains within one run; `rm -rf .jax_cache`
# clears it). --dist loadfile: each test file runs on one worker, so its module fixtures (a
# trained export, a compiled model) are built once; files start longest first
# (tests/durations.json, tests/conftest.py; --no-loadscope-reorder keeps that order, where
# pytest-xdist would start the files with the most tests first).
test: $(VENV)/.installed-test debian-packages
	MIRAGE_NO_SKIPS=1 MUJOCO_GL=osmesa $(BIN)/python -m pytest -q -x -n 2 --dist loadfile --no-loadscope-reorder tests
