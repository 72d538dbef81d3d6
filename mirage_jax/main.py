"""Training entry point.

  python -m mirage_jax.main --config=experiments/tiny_cpu.py --workdir=runs/tiny
  python -m mirage_jax.main --config=experiments/tiny_cpu.py:denoiser --workdir=runs/tiny_dit \\
      --config.denoiser.autoencoder_checkpoint=runs/tiny_ae_export

Every config field is overridable as ``--config.a.b=value``. Multi-host: see
``mirage_jax.distributed`` and ``launch/README.md``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mirage_jax import distributed, paths
from mirage_jax.errors import InputError, parse_flags, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:stage]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here.")
_INIT_DISTRIBUTED = distributed.define_flags()


def _main(argv: list[str]) -> int:
  if len(argv) > 1:  # absl leaves unknown positional words here; training would ignore them
    raise InputError("command line", "arguments", f"unexpected {argv[1:]} (all options are --flags)")
  if _CONFIG.value is None:
    raise InputError("--config", "config", "required (e.g. experiments/tiny_cpu.py)")
  try:  # config_flags defers a file that failed to load to the first read of a field
    _CONFIG.value.get("stage")
  except OSError as e:
    raise InputError("--config", "config", " ".join(str(e).split())) from None
  if not _WORKDIR.value:
    raise InputError("--workdir", "workdir", "required")
  paths.check_reachable(_WORKDIR.value, "--workdir")
  _INIT_DISTRIBUTED()
  from mirage_jax.training import loop  # after jax.distributed: importing may touch backends
  logging.info("config:\n%s", _CONFIG.value)
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  return 0


def main(argv) -> None:
  run_cli(lambda: _main(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
