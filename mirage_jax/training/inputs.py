"""Training input: the record sources of ``config.data``, this process's Grain iterator of
global-batch rows, the start-up check that processes feed the rows their devices hold, and
the abstract (sharded) global batch a stage's step takes."""

from __future__ import annotations

import json
import math
import zlib
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from data_pipelines import builders
from data_pipelines import pipeline
from mirage_jax import distributed
from mirage_jax.errors import InputError
from mirage_jax.training.mesh import batch_axes, logical_rules
from mirage_jax.training.stage import Stage


def make_sources(config: ml_collections.ConfigDict) -> dict[str, Sequence[Any]]:
  """Train and validation record sources of ``config.data``, a dataset built beforehand.

  Training never builds data (a pod must not wait on one host rendering clips): a missing
  dataset is an InputError that gives its ``data_pipelines.build`` command.
  """
  d = config.data
  if d.dataset == "wan_latents":  # pre-encoded by data_pipelines.encode_latents
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    return {split: latent_clips.LatentClips(d.data_dir, split) for split in ("train", "validation")}
  builder = builders.make_builder(d.dataset, d.data_dir, d.config_name, **d.build.to_dict())
  if not builders.check_same_params(builder):
    raise InputError(builder.data_path, "config.data", "no dataset built there; build it "
                     f"first: {builders.build_command(builder)}")
  return {split: builder.as_data_source(split) for split in ("train", "validation")}


def make_input(config: ml_collections.ConfigDict, source: Sequence[Any], *, split: str,
               start_step: int = 0, mesh: Mesh | None = None):
  """A Grain iterator of this process's rows of global batches ``start_step, ...``.

  The rows are those this process's devices hold on ``mesh`` (``distributed.process_shard``;
  the same on processes that a model axis spans), unless ``config.data.shard_index`` /
  ``shard_count`` are set; without a mesh, one equal share per process.
  """
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    if split != "train":
      data.shuffle = False
      data.seed = config.data.seed + 1
    if mesh is not None and data.shard_index is None and data.shard_count is None:
      data.shard_index, data.shard_count = distributed.process_shard(
          mesh, batch_axes(mesh, logical_rules(config)), data.batch_size)
  where = f"config.data ({split})"
  if data.dataset == "wan_latents":
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    return iter(latent_clips.from_config(source, data, where=where, start_step=start_step))
  return iter(pipeline.from_config(source, data, where=where, start_step=start_step))


def training_videos(config: dict | ml_collections.ConfigDict, batches: int):
  """``batches`` batches of the run's training frames: (B, T, H, W, 3) float32 in [-1, 1]
  each, read as training reads them (from step 0, this process's share)."""
  config = ml_collections.ConfigDict(config)
  it = make_input(config, make_sources(config)["train"], split="train")
  for _ in range(batches):
    yield pipeline.frames_to_float(next(it)["frames"])


def check_input_rows(config: ml_collections.ConfigDict, mesh: Mesh, num_records: int) -> None:
  """Start-up check on all processes: each feeds the batch rows its devices hold (disjoint,
  or identical across a model axis spanning hosts) from the same data stream."""
  d = config.data
  axes = batch_axes(mesh, logical_rules(config))
  shard = ((d.shard_index, d.shard_count) if d.shard_index is not None
           and d.shard_count is not None else distributed.process_shard(mesh, axes, d.batch_size))
  stream = {k: v for k, v in json.loads(d.to_json_best_effort()).items()
            if k not in ("shard_index", "shard_count", "worker_count", "read_threads",
                         "read_buffer_size", "worker_buffer_size")}
  fingerprint = zlib.crc32(json.dumps([stream, num_records], sort_keys=True).encode())
  distributed.check_process_rows(mesh, axes, d.batch_size, shard, fingerprint)


def abstract_batch(config: ml_collections.ConfigDict, stage: Stage, mesh: Mesh,
                   rules) -> dict[str, jax.ShapeDtypeStruct]:
  """Global batch shapes of the stage's fields (``stage.batch_shapes()``, as the pipeline
  yields them), with shardings."""
  b = config.data.batch_size
  shapes = stage.batch_shapes()
  axes = batch_axes(mesh, rules)
  split = math.prod(mesh.shape[a] for a in jax.tree.leaves(axes))
  if b % split:
    raise InputError("config.data.batch_size", "batch_size", f"global batch {b} does not split "
                     f"over the {split} devices of the batch mesh axes {axes}")
  return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=distributed.batch_sharding(
      mesh, axes, len(shapes[k][0]))) for k in stage.fields}
