"""What a training stage is: the ``Stage`` protocol, the batch and state types, and the
config checks that stages of several families share.

A stage (``config.stage``, built by a family's ``make_stage``) owns the model and its loss;
the rest of ``mirage_jax.training`` only calls the members listed here. Imports no family
and no training loop code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import ml_collections
from flax import nnx

from mirage_jax import diffusion
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError

Batch = dict[str, jax.Array]
State = dict[str, Any]


class Stage(Protocol):
  """What a training stage provides (see ``make_stage``)."""

  fields: tuple[str, ...]  # batch fields the loss reads
  frozen: Any  # non-trained params the loss needs (pytree; {} if none)

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """The trainable model."""

  def loss(self, model: nnx.Module, frozen: Any, batch: Batch, rng: jax.Array
           ) -> tuple[jax.Array, dict]:
    """Scalar loss and a dict of scalar metrics for one global batch."""

  def step_flops(self, batch_size: int) -> float:
    """Analytic FLOPs of one training step (forward + backward + frozen parts) for a batch."""

  # Optional (see ``split_trainable``, ``merge_model``, ``frozen_shardings``; WanStage):
  #   trainable: an nnx filter of the built model's trainable params (default: every
  #     nnx.Param); the rest of the model then comes in through ``frozen`` (``merge``).
  #   merge(graphdef, params, frozen) -> model; frozen_shardings(mesh, rules) -> pytree;
  #   initial_params: nested dict of trainable params that override the random init;
  #   batch_shapes() -> {field: (global shape, dtype)}; input(source, data, where) -> dataset.


def noise_levels(config: ml_collections.ConfigDict) -> tuple[str, float]:
  """``config.train.noise_levels`` (default 'per_frame') and ``noise_levels_mixed_prob``
  (default 0.5), checked."""
  tr = config.train
  scheme, prob = tr.get("noise_levels", "per_frame"), tr.get("noise_levels_mixed_prob", 0.5)
  if scheme not in diffusion.NOISE_LEVELS:
    raise InputError("config.train", "noise_levels", f"expected one of "
                     f"{diffusion.NOISE_LEVELS}, got {scheme!r}")
  if not 0.0 <= prob <= 1.0:
    raise InputError("config.train", "noise_levels_mixed_prob", f"must be in [0, 1], got {prob!r}")
  return scheme, float(prob)


def train_memory_config(config: ml_collections.ConfigDict, cfg: memory_lib.MemoryConfig,
                        num_frames: int) -> memory_lib.MemoryConfig:
  """The rollout's memory settings ``cfg`` with a capacity for one training window.

  A window writes ``num_frames`` frames, so it never needs more slots than their points
  (latent pixels; image pixels for ``rgb_points``); the rollout's capacity (131,072 on the
  pods) would only make every read splat empty slots. ``config.memory.train_capacity`` > 0
  sets it; either way it is at most the rollout's, so training never holds more than the
  rollout can.
  """
  from mirage_jax.evaluation import scaling  # pylint: disable=g-import-not-at-top
  n = int(config.memory.get("train_capacity", 0))
  if n < 0:
    raise InputError("config.memory", "train_capacity", f"must be >= 0, got {n}")
  if not n:
    n = scaling.capacity_for(config.memory.backend, num_frames, cfg).get(
        "capacity", num_frames * cfg.latent_height * cfg.latent_width)
  return dataclasses.replace(cfg, capacity=min(n, cfg.capacity))
