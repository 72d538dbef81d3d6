"""The depth training stage (``config.stage == 'depth'``): a Depth Anything V2 network trained
on the clips' RGB frames to their metric depth with the project's trainer.

Family-independent: it reads only the video pipeline's ``frames`` and ``depths`` (the
small family's autoencoder stage reads the same), so ``mirage_jax.families.make_stage``
reaches it by its stage name, whatever ``config.family`` says. The model is
``depth_anything.DepthAnythingV2(config.depth_model)``, used through the agreed interface
only (``model_config``, ``estimate``, ``load_export``): the export of a run
(``python -m mirage_jax.export``) holds the EMA params and the config with ``depth_model``,
which ``depth_anything.load_export`` loads.

Loss: the scale-invariant log loss (SiLog) of Depth Anything V2's metric fine-tuning
(Yang et al., "Depth Anything V2", arXiv 2406.09414; its released ``metric_depth`` training
uses ``SiLogLoss(lambd=0.5)``; the loss is Eigen et al.'s, arXiv 1406.2283), on valid pixels
``0 < d* <= max_depth``::

    g = log d* - log d,    loss = sqrt(mean(g^2) - lambda * mean(g)^2),   lambda = 0.5

with the means over every valid pixel of the batch (as released: pooled, not per image).
``mean(g^2) - lambda mean(g)^2 = var(g) + (1 - lambda) mean(g)^2``: lambda = 1 would be
blind to a global scale; 0.5 keeps half of the scale error, so the network learns metres
while the variance (shape) term dominates. The prediction is ``estimate``'s: the frame
resized to the network's input (``config.depth_model.input_size``, the released rule),
normalised, run, and resized back to the frame's (H, W), so training sees the same
pre/postprocessing as inference, and the target is never interpolated (the released code
resizes the target to the input instead; with depth holes that would blend valid and
invalid pixels).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mirage_jax.depth import depth_anything
from mirage_jax.errors import InputError
from mirage_jax.training.flops import model_flops
from mirage_jax.training.stage import Batch, StageBase


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None) -> "DepthStage":
  """The depth stage of ``config`` (nothing is frozen: ``frozen`` is ignored)."""
  del frozen
  return DepthStage(config)


def checked_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.depth_model`` rebuilt through ``depth_anything.model_config`` (unknown variant,
  kind or field: an InputError naming ``config.depth_model``); the stage trains 'metric'."""
  if "depth_model" not in config:
    raise InputError("config", "depth_model", "the depth stage needs config.depth_model "
                     "(depth_anything.model_config(...))")
  d = config.depth_model
  rest = {k: v for k, v in d.items() if k not in ("variant", "kind")}
  try:
    cfg = depth_anything.model_config(d.get("variant", "small"), d.get("kind", "relative"),
                                      **rest)
  except InputError as e:
    raise InputError("config.depth_model", e.field, e.problem) from None
  if cfg.kind != "metric":
    raise InputError("config.depth_model", "kind", f"the depth stage trains metric depth "
                     f"(SiLog on metres), got {cfg.kind!r}")
  if not cfg.max_depth > 0:
    raise InputError("config.depth_model", "max_depth", f"must be > 0, got {cfg.max_depth!r}")
  return cfg


def silog_loss(pred: jax.Array, target: jax.Array, valid: jax.Array,
               lambd: float = 0.5) -> jax.Array:
  """SiLog (module docstring) over the valid pixels of the whole batch.

  Args:
    pred, target: (...) depths in metres (pred > 0 where valid).
    valid: (...) bool, the pixels that count (at least one).
    lambd: weight of the squared mean log error removed (0.5 released; 1 = scale-blind).
  Returns:
    () float32 loss.
  """
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  # Invalid pixels enter as log 1 - log 1 = 0 (and get no gradient), never as log 0.
  g = (jnp.log(jnp.where(valid, target, 1.0)) - jnp.log(jnp.where(valid, pred, 1.0))) * w
  mean = g.sum() / n
  # mean(g^2) - lambd mean(g)^2 written as var(g) + (1 - lambd) mean(g)^2: the same value
  # without float32's cancellation of two near-equal terms (a pure scale error with
  # lambd = 1 left ~1e-7 of it, 4e-4 after the sqrt). The floor keeps sqrt's gradient
  # finite at a perfect fit.
  var = (jnp.square(g - mean) * w).sum() / n
  return jnp.sqrt(jnp.maximum(var + (1.0 - lambd) * mean * mean, 1e-12))


def valid_pixels(depths: jax.Array, max_depth: float) -> jax.Array:
  """Pixels with a usable target: finite, > 0 (0 = no depth) and <= max_depth (the released
  metric training's mask; a metric network cannot output more)."""
  return jnp.isfinite(depths) & (depths > 0) & (depths <= max_depth)


def abs_rel(pred: jax.Array, target: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean |d - d*| / d* over valid pixels, raw and after per-image median scaling.

  Args:
    pred, target: (N, H, W) depths; valid: (N, H, W) bool.
  Returns:
    (sum over valid pixels of the raw relative error, the same after scaling each image's
    prediction by median(d*) / median(d) of its valid pixels); divide by ``valid.sum()``.
    Sums, so that a caller can add them over batches of different valid counts.
  """
  safe_t = jnp.where(valid, target, 1.0)
  raw = jnp.where(valid, jnp.abs(pred - target) / safe_t, 0.0).sum()
  med = lambda x: jnp.nanmedian(jnp.where(valid, x, jnp.nan), axis=(1, 2))
  scale = jnp.nan_to_num(med(target) / med(pred), nan=1.0)  # an image without valid pixels
  aligned = jnp.where(valid, jnp.abs(pred * scale[:, None, None] - target) / safe_t, 0.0).sum()
  return raw, aligned


class DepthStage(StageBase):
  """Training ``DepthAnythingV2(config.depth_model)`` (kind 'metric') with SiLog on the
  frames of the video pipeline (module docstring).

  Batches: frames (B, T, H, W, 3) in [-1, 1] (uint8 on the way, converted in the step),
  depths (B, T, H, W) metres; every frame is one example. ``config.depth_train``:
  ``silog_lambda`` (0.5), ``dtype`` / ``param_dtype`` (compute / storage, float32).
  Metrics: ``abs_rel`` and ``abs_rel_median`` (per-image median-scaled) over the batch's
  valid pixels, ``valid_fraction``.
  """

  fields = ("frames", "depths")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = checked_model_config(config)
    t = config.get("depth_train", ml_collections.ConfigDict())
    self.lambd = float(t.get("silog_lambda", 0.5))
    if not 0.0 <= self.lambd <= 1.0:
      raise InputError("config.depth_train", "silog_lambda", f"must be in [0, 1], got "
                       f"{self.lambd}")
    try:
      self.dtype = jnp.dtype(t.get("dtype", "float32"))
      self.param_dtype = jnp.dtype(t.get("param_dtype", "float32"))
    except TypeError as e:
      raise InputError("config.depth_train", "dtype", str(e)) from None
    self.frozen: dict = {}

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return depth_anything.DepthAnythingV2(self.cfg, rngs=rngs, dtype=self.dtype,
                                          param_dtype=self.param_dtype)


  def loss(self, model, frozen, batch: Batch, rng):
    """batch: frames (B, T, H, W, 3) in [-1, 1], depths (B, T, H, W) -> SiLog, metrics."""
    del frozen, rng
    b, t, h, w, _ = batch["frames"].shape
    frames = batch["frames"].reshape(b * t, h, w, 3)
    target = batch["depths"].reshape(b * t, h, w).astype(jnp.float32)
    pred = depth_anything.estimate(model, frames)  # (B T, H, W)
    valid = valid_pixels(target, self.cfg.max_depth)
    loss = silog_loss(pred, target, valid, self.lambd)
    n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    raw, aligned = jax.lax.stop_gradient(abs_rel(pred, target, valid))
    return loss, {"abs_rel": raw / n, "abs_rel_median": aligned / n,
                  "valid_fraction": valid.mean(dtype=jnp.float32)}

  def step_flops(self, batch_size: int) -> float:
    d = self.config.data
    h, w = d.resolution
    frames = jax.ShapeDtypeStruct((batch_size * d.num_frames, h, w, 3), jnp.float32)
    fwd = model_flops(lambda: self.build(nnx.Rngs(0)), depth_anything.estimate, frames)
    return 3.0 * fwd  # forward + backward (twice the forward)
