"""Test setup: 8 fake CPU devices, deterministic, quiet."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole suite: pytest-xdist workers and the CLI
# subprocesses the tests start (they inherit the environment) compile the same steps, and a
# second run of the suite starts warm. A fresh clone (CI) starts empty. Small executables are
# cached too: here most compiles take well under JAX's default threshold of 1 s.
# Switches (environment, inherited by the subprocesses): JAX_COMPILATION_CACHE_DIR=DIR uses
# another cache (a fresh DIR: a cold run), JAX_ENABLE_COMPILATION_CACHE=false turns it off in
# every process, config-set caches included (BENCHMARKS.md, "Compilation cache").
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache", "tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionstart(session):
  """``make test`` (and so CI) sets MIRAGE_REQUIRE_ORACLES=1: the Wan parity tests skip when
  torch/diffusers are absent, which there would hide a broken install, so it is an error."""
  del session
  if os.environ.get("MIRAGE_REQUIRE_ORACLES") == "1":
    import importlib.util  # pylint: disable=g-import-not-at-top
    missing = [m for m in ("torch", "diffusers", "safetensors")
               if importlib.util.find_spec(m) is None]
    if missing:
      raise RuntimeError(f"MIRAGE_REQUIRE_ORACLES=1 but {', '.join(missing)} not installed "
                         "(pip install -e '.[dev,oracle]')")
