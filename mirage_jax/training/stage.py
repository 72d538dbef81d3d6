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
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from mirage_jax import diffusion
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError

Batch = dict[str, jax.Array]
State = dict[str, Any]


class Stage(Protocol):
  """What a training stage provides (a family's ``make_stage`` builds it; :class:`StageBase`
  gives the members below their defaults)."""

  config: ml_collections.ConfigDict  # the training config
  fields: tuple[str, ...]  # batch fields the loss reads
  frozen: Any  # non-trained params the loss needs (pytree; {} if none; None until loaded)
  # An nnx filter of the built model's trainable params (None: every nnx.Param); the rest of
  # the model then comes in through ``frozen`` (``merge``).
  trainable: Any
  initial_params: Any  # nested dict of trainable params that override the random init, or None

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """The trainable model."""

  def loss(self, model: nnx.Module, frozen: Any, batch: Batch, rng: jax.Array
           ) -> tuple[jax.Array, dict]:
    """Scalar loss and a dict of scalar metrics for one global batch."""

  def step_flops(self, batch_size: int) -> float:
    """Analytic FLOPs of one training step (forward + backward + frozen parts) for a batch."""

  def merge(self, graphdef: Any, params: Any, frozen: Any) -> nnx.Module:
    """The model of trainable ``params`` (nested dict), plus its frozen part if any."""

  def frozen_shardings(self, mesh: Mesh, rules) -> Any:
    """NamedSharding pytree of ``frozen``, or None: replicated."""

  def load_frozen(self, mesh: Mesh, rules) -> None:
    """Sets ``frozen`` (called when it is None), restored straight into its shardings."""

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{field: (global shape, dtype)} of the batches the input pipeline yields."""

  def check_source(self, source: Any, where: str) -> None:
    """Raises InputError if the training records do not fit the config."""

  def rollout_args(self, graphdef: Any, ema: Any) -> tuple:
    """The arguments of an ``evaluation.training_rollouts.TrainingRollouts`` call for the
    (host-gathered) EMA params ``ema``."""


class StageBase:
  """The defaults of :class:`Stage`'s optional members: every nnx.Param trains, nothing is
  frozen besides ``frozen``, batches are the video pipeline's, any source fits."""

  config: ml_collections.ConfigDict
  trainable: Any = None
  initial_params: Any = None

  def merge(self, graphdef: Any, params: Any, frozen: Any) -> nnx.Module:
    del frozen
    return nnx.merge(graphdef, nnx.State(params))

  def frozen_shardings(self, mesh: Mesh, rules) -> Any:
    del mesh, rules
    return None

  def load_frozen(self, mesh: Mesh, rules) -> None:
    del mesh, rules

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The video pipeline's: frames (B, T, H, W, 3) float32 (uint8 with
    ``config.data.frames_dtype='uint8'``), depths (B, T, H, W) float32, intrinsics
    (B, T, 3, 3), poses_c2w (B, T, 4, 4) float32, dynamic_masks (B, T, H, W) uint8,
    depth_valid (B, T, H, W) uint8 (0 = a depth hole)."""
    d = self.config.data
    b, t, (h, w) = d.batch_size, d.num_frames, d.resolution
    frames_dtype = jnp.uint8 if d.frames_dtype == "uint8" else jnp.float32
    return {"frames": ((b, t, h, w, 3), frames_dtype), "depths": ((b, t, h, w), jnp.float32),
            "intrinsics": ((b, t, 3, 3), jnp.float32), "poses_c2w": ((b, t, 4, 4), jnp.float32),
            "dynamic_masks": ((b, t, h, w), jnp.uint8), "depth_valid": ((b, t, h, w), jnp.uint8)}

  def check_source(self, source: Any, where: str) -> None:
    del source, where

  def rollout_args(self, graphdef: Any, ema: Any) -> tuple:
    raise NotImplementedError(f"{type(self).__name__} has no rollouts")


def noise_levels(config: ml_collections.ConfigDict) -> tuple[str, float]:
  """``config.train.noise_levels`` and ``noise_levels_mixed_prob``, checked."""
  tr = config.train
  scheme, prob = tr.noise_levels, tr.noise_levels_mixed_prob
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
  n = int(config.memory.train_capacity)
  if n < 0:
    raise InputError("config.memory", "train_capacity", f"must be >= 0, got {n}")
  if not n:
    n = memory_lib.capacity_for(config.memory.backend, num_frames, cfg).get(
        "capacity", num_frames * cfg.latent_height * cfg.latent_width)
  return dataclasses.replace(cfg, capacity=min(n, cfg.capacity))
