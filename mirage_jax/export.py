"""Exports a params-only checkpoint (EMA by default, bf16 optional) for evaluation.

  python -m mirage_jax.export --workdir=runs/tiny --output=runs/tiny_export [--dtype=bfloat16]

A Wan-family DiT run: ``--text_encoder=<convert_text export> --tokenizer=<google/umt5-xxl
folder>`` encodes the empty prompt once and stores it as ``empty_text.npy`` in the export
(``denoiser.empty_text``, with ``denoiser.text_encoder`` / ``denoiser.tokenizer``), which
generation and training then use instead of zeros. Without the flags, a Wan DiT run trained
on latent clips whose captions ``data_pipelines.encode_latents --text_encoder`` encoded stores
that dataset's ``empty_text.npy`` (the embedding its dropped captions became) and names its
text encoder and tokenizer, so ``generate --prompt`` runs from the export with no more flags.

Several processes (``jax.distributed``, the flags of ``mirage_jax.main``): process 0 writes
the export, the same files one process writes, and the others wait for it.

Load it with ``mirage_jax.checkpoint.load_export`` (params + config), a small-family model
with ``mirage_jax.families.small.world_model.load_model``, a denoiser with its autoencoder as
``mirage_jax.rollout.load_world_model`` does.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import flags

from mirage_jax import checkpoint, distributed, families, paths
from mirage_jax.errors import InputError, run_app
from mirage_jax.text import prompts

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
          "VAE trained from scratch needs its own). 0: keep the config's."),
      text_encoder=flags.DEFINE_string(
          "text_encoder", None, "A Wan DiT run: umT5 export (python -m mirage_jax.convert_text) "
          "whose embedding of the empty prompt is stored in the export (needs --tokenizer)."),
      tokenizer=flags.DEFINE_string("tokenizer", None, "A Wan DiT run: the umT5 tokenizer "
                                    "folder of --text_encoder (google/umt5-xxl)."))


def text_files(output: str, text_encoder: str | None, tokenizer: str | None):
  """(update_config, add_files) for ``checkpoint.export_params`` storing umT5's embedding of
  "" as ``<output>/empty_text.npy`` (a Wan-family DiT run only; both paths needed), or
  (None, None) without them. Everything is checked before the export is written."""
  if not prompts.check_pair(text_encoder, tokenizer):
    return None, None
  def update(config: dict, params):
    del params
    c = ml_collections.ConfigDict(config)
    if families.family_name(c) != "wan" or c.get("stage") != "denoiser":
      raise InputError("--text_encoder", "text_encoder", "only a Wan-family DiT run stores "
                       f"an empty-prompt embedding (this run: stage {c.get('stage')!r}, family "
                       f"{families.family_name(c)!r})")
    prompts.check_width(text_encoder, int(c.denoiser.model.text_dim))
    config = dict(config, denoiser=dict(
        config["denoiser"], empty_text=paths.join(_absolute(output), "empty_text.npy"),
        text_encoder=_absolute(text_encoder), tokenizer=_absolute(tokenizer)))
    return config

  def files(config: dict) -> dict:
    del config
    return {"empty_text.npy": prompts.PromptEncoder(text_encoder, tokenizer).empty()}

  return update, files


def dataset_text_files(output: str):
  """(update_config, add_files) for a Wan DiT run without ``--text_encoder``: when its
  config sets no ``denoiser.empty_text`` and its latent dataset holds ``empty_text.npy`` (what
  the stage's dropped captions became), that file goes into the export as
  ``denoiser.empty_text``, and the dataset's text encoder and tokenizer
  (``metadata.json``, written by ``encode_latents --text_encoder``) become
  ``denoiser.text_encoder`` / ``denoiser.tokenizer`` where the config names none. Any other
  run: unchanged."""
  found = {}

  def update(config: dict, params):
    del params
    c = ml_collections.ConfigDict(config)
    d = c.get("denoiser")
    if (families.family_name(c) != "wan" or c.get("stage") != "denoiser" or d is None
        or c.data.get("dataset") != "wan_latents" or d.get("empty_text")):
      return config
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    empty = latent_clips.load_side_array(c.data.data_dir, latent_clips.EMPTY_TEXT)
    if empty is None:
      return config
    found["empty_text.npy"] = empty
    meta = latent_clips.read_metadata(c.data.data_dir)
    denoiser = dict(config["denoiser"], empty_text=paths.join(_absolute(output),
                                                              "empty_text.npy"))
    if meta.get("text_encoder") and not d.get("text_encoder"):
      denoiser.update(text_encoder=meta["text_encoder"], tokenizer=meta["tokenizer"])
    return dict(config, denoiser=denoiser)

  return update, lambda config: dict(found)


def _absolute(path: str) -> str:
  return path if paths.is_remote(path) else os.path.abspath(path)


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
  text_update, text_add = text_files(output, _FLAGS["text_encoder"].value,
                                     _FLAGS["tokenizer"].value)
  if text_update is None:
    text_update, text_add = dataset_text_files(output)
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
      step=_FLAGS["step"].value, update_config=_chain(update, text_update),
      add_files=text_add), "export written")
  if jax.process_index() == 0:
    print(f"exported step {step} to {output}")
  return 0


def _chain(*updates):
  """update_config functions applied in turn (None ones skipped); None when none is given."""
  updates = [u for u in updates if u is not None]
  if not updates:
    return None

  def update(config, params):
    for u in updates:
      config = u(config, params)
    return config
  return update


if __name__ == "__main__":
  _define_flags()
  _INIT_DISTRIBUTED = distributed.define_flags()
  run_app(_main)
