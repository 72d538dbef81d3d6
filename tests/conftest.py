"""Test setup: 8 fake CPU devices, deterministic, quiet."""

import json
import os

import pytest


# The suite compiles hundreds of tiny programs and runs each a few times, so compiling is most
# of its time: XLA's cheapest CPU backend settings cut it by about a quarter, and XLA's older
# (LLVM IR) fusion emitters instead of its MLIR ones compile about a quarter faster again
# (BENCHMARKS.md, "Test suite"). Every JAX process the tests start uses them, CLI subprocesses
# included.
# The TPU compiler (libtpu, the AOT tests) reads XLA_FLAGS too and aborts the process on a flag
# it does not know: the flags only XLA's CPU compiler knows are kept apart (``tpu_compiler``).
CPU_ONLY_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
FAST_COMPILE_FLAGS = " ".join(("--xla_backend_optimization_level=0",
                               "--xla_llvm_disable_expensive_passes=true", *CPU_ONLY_FLAGS))


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test's JAX process: the fast-compile settings, and ``devices`` fake CPU
  devices when given."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
  return FAST_COMPILE_FLAGS + count


# XLA's own settings (its defaults), for the few tests that pin what a production compile
# computes to the bit: ``jax.jit(f).lower(*args).compile(PRODUCTION_COMPILER_OPTIONS)``.
PRODUCTION_COMPILER_OPTIONS = {"xla_backend_optimization_level": 3,
                               "xla_llvm_disable_expensive_passes": False,
                               "xla_cpu_use_fusion_emitters": True}


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole suite: pytest-xdist workers and the CLI
# subprocesses the tests start (they inherit the environment) compile the same steps, and a
# second run of the suite starts warm. A fresh clone (CI) starts empty. Every executable is
# cached, however short its compile (JAX's default threshold is 1 s): the CLI processes the
# tests start compile the same small programs over and over (a tiny generate, warm: 6.5 ->
# 6.1 s with the threshold at 0 instead of 0.2 s).
# Switches (environment, inherited by the subprocesses): JAX_COMPILATION_CACHE_DIR=DIR uses
# another cache (a fresh DIR: a cold run), JAX_ENABLE_COMPILATION_CACHE=false turns it off in
# every process, config-set caches included (BENCHMARKS.md, "Compilation cache").
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache", "tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# What the tests that need an optional dependency import, checked by importing it (a package
# that is present but broken counts as missing), with the install step that provides it.
TEST_DEPENDENCIES = {
    "torch": "pip install -e '.[oracle]'",
    "safetensors.torch": "pip install -e '.[oracle]'",
    "diffusers.models.autoencoders.autoencoder_kl_wan": "pip install -e '.[oracle]'",
    "diffusers.models.transformers.transformer_wan": "pip install -e '.[oracle]'",
    "diffusers.schedulers": "pip install -e '.[oracle]'",
    "transformers.models.depth_anything.modeling_depth_anything": "pip install -e '.[oracle]'",
    "transformers.models.umt5.modeling_umt5": "pip install -e '.[oracle]'",
    "tests.lpips_oracle": "pip install --no-deps lpips==0.1.4",  # not torchvision: see the module
    "sentencepiece": "pip install -e '.[dev]'",
    "libtpu": "pip install -e '.[tpu]'",
    "scipy.ndimage": "pip install scipy",
}

# Tests allowed to skip under MIRAGE_NO_SKIPS=1: node id -> the reason, written beside it.
ALLOWED_SKIPS: dict[str, str] = {}


def pytest_configure(config):
  """The CPU compiler reads XLA_FLAGS once, at its first compile: done here, so that it has
  its flags before a test takes the CPU-only ones away (``tpu_compiler``)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.jit(lambda x: x + 1)(0)


@pytest.fixture
def tpu_compiler():
  """For a test that compiles for a TPU topology in this process: XLA_FLAGS without the
  CPU-only flags while it runs, so that libtpu, which reads them once at its first compile,
  starts. The CPU compiler keeps the flags it read at start-up (``pytest_configure``)."""
  before = os.environ["XLA_FLAGS"]
  os.environ["XLA_FLAGS"] = " ".join(f for f in before.split() if f not in CPU_ONLY_FLAGS)
  try:
    yield
  finally:
    os.environ["XLA_FLAGS"] = before


def _no_skips() -> bool:
  return os.environ.get("MIRAGE_NO_SKIPS") == "1"


def missing_test_dependencies() -> list[str]:
  """'<module>: <install step>' for each test dependency that does not import, Chromium and
  the Memory Maze renderer included."""
  import importlib  # pylint: disable=g-import-not-at-top
  missing = []
  for module, step in TEST_DEPENDENCIES.items():
    try:
      importlib.import_module(module)
    except Exception as e:  # pylint: disable=broad-except
      missing.append(f"{module} ({type(e).__name__}: {e}): {step}")
  from data_pipelines import memory_maze  # pylint: disable=g-import-not-at-top
  if not memory_maze.is_available():
    missing.append("memory_maze: pip install -e '.[memory_maze]', apt-get install libosmesa6, "
                   "MUJOCO_GL=osmesa")
  from tests.chromium import find_chromium  # pylint: disable=g-import-not-at-top
  if find_chromium() is None:
    missing.append("chromium: apt-get install chromium")
  return missing


def pytest_sessionstart(session):
  """``make test`` (and so CI) sets MIRAGE_NO_SKIPS=1: every test dependency must import
  (a missing one would make its tests skip quietly), checked once before any test runs."""
  if _no_skips() and not hasattr(session.config, "workerinput"):
    missing = missing_test_dependencies()
    if missing:
      raise RuntimeError("MIRAGE_NO_SKIPS=1 but test dependencies are missing:\n  " +
                         "\n  ".join(missing))


def pytest_sessionfinish(session, exitstatus):
  """Under MIRAGE_NO_SKIPS=1 a skipped test (not in ALLOWED_SKIPS) fails the run."""
  if not _no_skips() or hasattr(session.config, "workerinput"):
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = [r.nodeid for r in (reporter.stats.get("skipped", []) if reporter else [])
             if r.nodeid not in ALLOWED_SKIPS]
  if skipped:
    print(f"\nMIRAGE_NO_SKIPS=1: {len(skipped)} tests skipped:\n  " + "\n  ".join(skipped))
    if exitstatus == 0:
      session.exitstatus = 1


# Measured seconds per test file (tests/durations.json, written by `python -m
# tests.record_durations REPORT.xml` from a `pytest --junitxml` run). ``make test`` runs with
# ``--dist loadfile``: each file on one worker, so a module fixture (a trained export, a
# compiled model) is built once, not once per worker. Files go out longest first, so the two
# workers do not end with one long file running alone (longest-processing-time-first
# scheduling); a file not in the record counts as the median file. ``--no-loadscope-reorder``
# keeps this order: without it pytest-xdist hands out the files with the most tests first.
DURATIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def pytest_collection_modifyitems(session, config, items):
  try:
    with open(DURATIONS_FILE) as f:
      seconds = json.load(f)
  except (OSError, ValueError):
    return
  if not seconds:
    return
  typical = sorted(seconds.values())[len(seconds) // 2]
  order = {}
  for i, item in enumerate(items):
    order.setdefault(item.nodeid.split("::")[0], i)
  # Stable: tests keep their order within a file; files sort by cost, then collection order.
  items.sort(key=lambda it: (-seconds.get(it.nodeid.split("::")[0], typical),
                             order[it.nodeid.split("::")[0]]))
