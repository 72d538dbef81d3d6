"""Training entry point.

  python -m mirage_jax.main --config=experiments/tiny_cpu.py --workdir=runs/tiny
  python -m mirage_jax.main --config=experiments/tiny_cpu.py:denoiser --workdir=runs/tiny_dit \\
      --config.denoiser.autoencoder_checkpoint=runs/tiny_ae_export

Every config field is overridable as ``--config.a.b=value``. Multi-host: see
``mirage_jax.distributed`` and ``launch/README.md``.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from mirage_jax import distributed, paths
from mirage_jax.errors import InputError, run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:stage]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here.")
_INIT_DISTRIBUTED = distributed.define_flags()


def _main() -> int:
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


if __name__ == "__main__":
  run_app(_main)
