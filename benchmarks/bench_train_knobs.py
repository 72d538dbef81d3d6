"""Training-step knobs on the tiny denoiser: CPU step time and loss after N steps.

  python benchmarks/bench_train_knobs.py --steps=30

Cases (``experiments/tiny_cpu.py:denoiser`` with overrides, one synthetic batch repeated,
random frozen autoencoder, this host's default devices): the step as it was before these
knobs (the rollout's 8192 memory slots, no EMA warm-up), the new defaults (memory sized to
the window), the DiT residual stream in f32 with bf16 matmuls, everything in bf16, and two
microbatches. Prints one JSON line per case (``bench_train.bench_cpu``'s fields).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.FLAGS.set_default("steps", 30)  # bench_train's --steps: timed steps per case

CASES = [
    ("before", {"memory.train_capacity": 8192, "optimizer.ema_warmup": False}),
    ("after (defaults, f32)", {}),
    ("f32_residual", {"denoiser.model.precision": "f32_residual"}),
    ("bf16", {"denoiser.model.precision": "bf16"}),
    ("microbatches=2", {"step_lib.microbatches": 2}),
]


def main(argv) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mirage_jax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  peak = max(flops_lib.measure_matmul_tflops(1024) for _ in range(2))
  for label, overrides in CASES:
    out = bench_train.bench_cpu("tiny_cpu", "denoiser", overrides, flags.FLAGS.steps, peak)
    print(json.dumps({"label": label, **out}), flush=True)


if __name__ == "__main__":
  app.run(main)
