"""Fault-injection campaign: the tiny trainer killed many times in a row, then compared.

  python benchmarks/bench_faults.py [--faults=20] [--steps=40] [--seed=0] [--workdir=DIR]

Runs ``python -m mirage_jax.main`` (tiny config, 16x16, one CPU device) once without
interruption, then again with ``--faults`` interruptions drawn from ``--seed`` (SIGKILL after
a step, SIGKILL inside an async checkpoint save before it is committed, SIGTERM), each 1-3
steps after a (re)start, restarting after each; the trainer interrupts itself at that point
(``MIRAGE_FAULT_AT``). Prints the figures: faults injected (by kind), kills that landed during a save,
restarts that resumed from the latest complete checkpoint, and data lost (losses that differ
from or are missing against the uninterrupted run, corrupt checkpoints, final train state or
input position (the step) that differ) -- all must be 0. Harness: ``tests/test_faults.py``.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import test_faults as harness  # pylint: disable=g-import-not-at-top

_FAULTS = flags.DEFINE_integer("faults", 20, "Interruptions in the campaign.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps (checkpoints every 2).")
_SEED = flags.DEFINE_integer("seed", 0, "Draws the faults' kinds and steps.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs go (default: a temporary folder).")


def main(argv) -> None:
  del argv
  root = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="bench_faults_"))
  root.mkdir(parents=True, exist_ok=True)
  data_dir, env = root / "data", harness.trainer_env(root / "jax_cache")
  harness.build_dataset(data_dir)
  steps = _STEPS.value
  start = time.perf_counter()
  done = subprocess.run(harness.trainer_command(root / "reference", data_dir, steps),
                        cwd=harness.ROOT, env=env, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
  faults = harness.random_faults(_FAULTS.value, _SEED.value)
  outcomes = harness.run_campaign(root / "faulted", data_dir, env, faults, root / "logs", steps)
  problems = harness.check_against(root / "reference", root / "faulted", steps)
  for o in outcomes:
    print(f"{o.fault.kind:12s} {o.fault.after_steps} steps after the start (step {o.at_step}): "
          f"injected={o.injected} during_save={o.during_save} latest complete checkpoint="
          f"{o.latest_before_restart} resumed from={o.resumed_from}")
  injected = [o for o in outcomes if o.injected]
  figures = {
      "faults_planned": len(faults),
      "faults_injected": len(injected),
      "injected_by_kind": dict(collections.Counter(o.fault.kind for o in injected)),
      "kills_during_a_checkpoint_save": sum(o.during_save for o in injected),
      "restarts_resumed_from_latest_complete_checkpoint": sum(
          o.resumed_correctly for o in injected),
      "restarts": len(injected),
      "steps": steps,
      **problems,
      "data_lost": sum(problems.values()),
      "seconds": round(time.perf_counter() - start, 1),
  }
  print(json.dumps(figures, indent=2))
  if figures["data_lost"] or figures["restarts_resumed_from_latest_complete_checkpoint"] != len(
      injected):
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
