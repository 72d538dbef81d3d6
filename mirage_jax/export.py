"""Exports a params-only checkpoint (EMA by default, bf16 optional) for evaluation.

  python -m mirage_jax.export --workdir=runs/tiny --output=runs/tiny_export [--dtype=bfloat16]

Several processes (``jax.distributed``, the flags of ``mirage_jax.main``): process 0 writes
the export, the same files one process writes, and the others wait for it.

Load it with ``mirage_jax.checkpoint.load_export`` (params + config), a small-family model
with ``mirage_jax.families.small.world_model.load_model``, a denoiser with its autoencoder as
``mirage_jax.rollout.load_world_model`` does.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import app, flags

from mirage_jax import checkpoint, distributed, paths
from mirage_jax.errors import InputError, parse_flags, run_cli

# The command's flags are defined only when it runs as a script (tests import this module),
# so that flags defined on import cannot clash with the importer's own.
_FLAGS: dict[str, Any] = {}
_INIT_DISTRIBUTED = None


def _define_flags() -> None:
  _FLAGS.update(
      workdir=flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/)."),
      output=flags.DEFINE_string("output", None, "Export directory (must not exist)."),
      dtype=flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                              "Cast floating params (default: keep)."),
      raw=flags.DEFINE_bool("raw_params", False, "Export the raw params instead of the EMA."),
      step=flags.DEFINE_integer("step", None, "Checkpoint step (default: latest)."),
      latent_stats=flags.DEFINE_integer(
          "latent_stats_batches", 0, "A Wan VAE run: measure its latents' per-channel mean "
          "and std on this many batches of the run's own training data and store them in the "
          "export (autoencoder.latents_mean/std, which normalise the latents the DiT sees; a "
          "VAE trained from scratch needs its own). 0: keep the config's."))


def _main() -> int:
  workdir, output = _FLAGS["workdir"].value, _FLAGS["output"].value
  if not workdir or not output:
    raise InputError("--workdir/--output", "workdir", "both --workdir and --output are required")
  paths.check_reachable(workdir, "--workdir")
  paths.check_reachable(output, "--output")
  _INIT_DISTRIBUTED()
  batches = _FLAGS["latent_stats"].value
  if batches < 0:
    raise InputError("--latent_stats_batches", "latent_stats_batches", f"must be >= 0, got "
                     f"{batches}")
  update = None
  if batches:
    # pylint: disable=g-import-not-at-top
    from mirage_jax.families.wan import vae as wan_vae
    from mirage_jax.training import inputs
    # pylint: enable=g-import-not-at-top
    update = lambda config, params: wan_vae.calibrated_config(
        config, params, inputs.training_videos(config, batches), "--latent_stats_batches")
  step = distributed.on_process_zero(lambda: checkpoint.export_params(
      workdir, output, use_ema=not _FLAGS["raw"].value, dtype=_FLAGS["dtype"].value,
      step=_FLAGS["step"].value, update_config=update), "export written")
  if jax.process_index() == 0:
    print(f"exported step {step} to {output}")
  return 0


def main(argv) -> None:
  del argv
  run_cli(_main)


if __name__ == "__main__":
  _define_flags()
  _INIT_DISTRIBUTED = distributed.define_flags()
  app.run(main, flags_parser=parse_flags)
