"""LPIPS cost per frame pair on this machine (``mirage_jax/evaluation/lpips.py``).

  python -m benchmarks.bench_lpips [--frames=96]

Random He-initialised weights (``tests.fixtures_util.write_random_lpips_weights``: the cost
does not depend on the values), AlexNet and VGG16 at 32x32 and 64x64: the first call
(compile + one batch) and then ``--frames`` pairs in the default batches. One JSON line per
case. Parity with the lpips package is ``tests/test_lpips.py``.
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np
from absl import app, flags

from mirage_jax.evaluation import lpips
from tests.fixtures_util import write_random_lpips_weights

_FRAMES = flags.DEFINE_integer("frames", 96, "Frame pairs timed per case.")


def main(argv) -> None:
  del argv
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as folder:
    for net in lpips.NETS:
      backbone, linear = write_random_lpips_weights(folder, net)
      scorer = lpips.load(backbone, net, linear)
      for side in (32, 64):
        a = rng.integers(0, 256, (_FRAMES.value, side, side, 3), dtype=np.uint8)
        b = a[::-1].copy()
        t = time.perf_counter()
        scorer(a[:16], b[:16], 255.0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        scorer(a, b, 255.0)
        per = (time.perf_counter() - t) / len(a)
        print(json.dumps(dict(net=net, side=side, first_call_s=round(first, 3),
                              ms_per_pair=round(1000 * per, 2))), flush=True)


if __name__ == "__main__":
  app.run(main)
