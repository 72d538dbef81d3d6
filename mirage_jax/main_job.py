"""The main job: fresh clone -> dataset -> tiny model -> revisit videos -> benchmark table.

  python -m mirage_jax.main_job --workdir=runs/tiny [--config=experiments/tiny_cpu.py]

Stages, each skipped when its output already exists (a second run reuses them; an
interrupted training run resumes from its last checkpoint):

  1. build the procedural dataset (TFDS ArrayRecord under ``<workdir>/data``);
  2. train the RGB-D autoencoder, export it (``<workdir>/autoencoder_export``);
  3. train the denoiser on the frozen autoencoder, export it (``<workdir>/denoiser_export``);
  4. generate held-out loop trajectories with ``none``, ``mirage`` and ``voxel`` memory and
     score revisits, then measure cache bytes and time per chunk vs trajectory length;
     print the table and the paths of the videos and plots (``<workdir>/eval``).
"""

from __future__ import annotations

import importlib.util
import os
import time

from absl import app, flags, logging

from mirage_jax.errors import InputError, run_cli

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Everything this job writes goes here.")
_CONFIG = flags.DEFINE_string("config", "experiments/tiny_cpu.py",
                              "Experiment config file; its get_config(stage) gives both stages.")
_BACKENDS = flags.DEFINE_list("backends", ["none", "mirage", "voxel"], "Memory backends to compare.")
_NUM_TRAJECTORIES = flags.DEFINE_integer("num_trajectories", 8, "Held-out loop trajectories to score.")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "1024"], "Trajectory lengths for the cost table.")
_AE_STEPS = flags.DEFINE_integer("autoencoder_steps", None, "Override the config's autoencoder steps.")
_DN_STEPS = flags.DEFINE_integer("denoiser_steps", None, "Override the config's denoiser steps.")


def load_configs(path: str, workdir: str):
  """(autoencoder config, denoiser config) from an experiment file, paths under ``workdir``."""
  if not os.path.isfile(path):
    raise InputError("--config", "config", f"{path} does not exist")
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: name it
    raise InputError(path, "get_config", f"failed to load: {e}") from e
  configs = []
  for stage in ("autoencoder", "denoiser"):
    c = module.get_config(stage)
    c.data.data_dir = os.path.join(workdir, "data")
    configs.append(c)
  ae, dn = configs
  dn.denoiser.autoencoder_checkpoint = os.path.abspath(os.path.join(workdir, "autoencoder_export"))
  if _AE_STEPS.value:
    ae.train.steps = _AE_STEPS.value
  if _DN_STEPS.value:
    dn.train.steps = _DN_STEPS.value
  return ae, dn


def _banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def train_and_export(config, workdir: str, name: str) -> str:
  """Trains ``config.stage`` into ``<workdir>/<name>`` (resuming) and exports it once."""
  from mirage_jax import checkpoint, train  # pylint: disable=g-import-not-at-top
  export_dir = os.path.join(workdir, f"{name}_export")
  if os.path.isdir(export_dir):
    print(f"reusing {export_dir}")
    return export_dir
  t0 = time.time()
  metrics = train.train_and_evaluate(config, os.path.join(workdir, name))
  print(f"{name}: {config.train.steps} steps in {time.time() - t0:.0f} s; last metrics "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
  checkpoint.export_params(os.path.join(workdir, name), export_dir)
  print(f"exported {export_dir}")
  return export_dir


def _main() -> int:
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  ae_config, dn_config = load_configs(_CONFIG.value, workdir)

  _banner("1/4 dataset")
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  d = ae_config.data
  builder = builders.make_builder(d.dataset, d.data_dir, d.config_name, **d.build.to_dict())
  reused = builders.prepare(builder)
  print(("reused " if reused else "built ") + builder.data_dir)

  _banner("2/4 autoencoder")
  train_and_export(ae_config, workdir, "autoencoder")
  _banner("3/4 denoiser")
  dn_export = train_and_export(dn_config, workdir, "denoiser")

  _banner("4/4 evaluation")
  from mirage_jax.evaluation import job  # pylint: disable=g-import-not-at-top
  job.run(dn_export, os.path.join(workdir, "eval"), backends=_BACKENDS.value,
          num_trajectories=_NUM_TRAJECTORIES.value, lengths=[int(x) for x in _LENGTHS.value])
  return 0


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  run_cli(_main)


if __name__ == "__main__":
  app.run(main)
