"""Training-step knobs on the tiny denoiser: CPU step time and loss after N steps.

  python benchmarks/bench_train_knobs.py --steps=30

Cases (``experiments/tiny_cpu.py:denoiser`` with overrides, one synthetic batch repeated,
random frozen autoencoder, this host's default devices): the step as it was before these
knobs (the rollout's 8192 memory slots, no EMA warm-up), the new defaults (memory sized to
the window), the DiT residual stream in f32 with bf16 matmuls, everything in bf16, and two
microbatches. The cases are built and compiled first, then stepped interleaved
(``benchmarks/timing.py``: one step of each case per round, ``--warmup`` rounds discarded,
``--steps`` rounds kept). Prints one JSON line per case (``bench_train``'s fields, ``step_s`` the
median step, and its median per-round ratio to the defaults with the IQR), then the summary.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.FLAGS.set_default("steps", 30)  # bench_train's --steps: kept interleaved rounds
_WARMUP = flags.DEFINE_integer("warmup", 2, timing.WARMUP_HELP)
BASELINE = "after (defaults, f32)"

CASES = [
    ("before", {"memory.train_capacity": 8192, "optimizer.ema_warmup": False}),
    ("after (defaults, f32)", {}),
    ("f32_residual", {"denoiser.model.precision": "f32_residual"}),
    ("bf16", {"denoiser.model.precision": "bf16"}),
    ("microbatches=2", {"train.microbatches": 2}),
]


def main(argv) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mirage_jax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  peak = max(flops_lib.measure_matmul_tflops(1024) for _ in range(2))
  for _, overrides in CASES:  # every override names a config field, before any compiles
    bench_train._config("tiny_cpu", "denoiser", overrides)  # pylint: disable=protected-access
  cases = {label: bench_train.prepare_cpu("tiny_cpu", "denoiser", overrides)
           for label, overrides in CASES}
  result = timing.compare({label: stepper for label, (stepper, _) in cases.items()},
                          pairs=flags.FLAGS.steps, warmup=_WARMUP.value, baseline=BASELINE,
                          label="tiny_cpu denoiser step")
  for label, (_, report) in cases.items():
    row = {"label": label, **report(result.median_s(label), peak)}
    if label != BASELINE:
      r = result.ratio(label)
      row.update(ratio_to_defaults=r.median, iqr=list(r.iqr), verdict=r.verdict)
    print(json.dumps(row), flush=True)
  print(result.format(), flush=True)


if __name__ == "__main__":
  app.run(main)
