"""Monocular depth brought to the memory's scale.

A monocular estimate is right up to a scale (a metric model: roughly, and it drifts from
frame to frame) or up to a scale and shift of inverse depth (a relative model: its output is
affine-invariant disparity). The memory already holds the geometry of everything seen: read
into a new frame's camera it gives the depth of each latent cell it covers. Each generated
frame is fitted to that depth where the memory covers enough of it, robustly (the read and
the new frame disagree at occlusion edges and where the generation moved content), and keeps
the last fit where it does not (newly seen content is written at the scale of what came
before, back to the first frame's given or metric depth).

Fits are over the latent grid (the memory's resolution): the estimate is resized there with
the memory's own resize (``splatting.depth_at``).
"""

from __future__ import annotations

import jax.numpy as jnp

from mirage_jax.memory import splatting

_REWEIGHTS = 5  # iteratively reweighted least squares: a quarter of wrong cells is shed


def _valid_pairs(estimate, memory_depth, coverage):
  """(estimate at the latent grid (F, h, w), cells where both are usable (F, h, w) bool)."""
  _, h, w = coverage.shape
  est = splatting.depth_at(estimate.astype(jnp.float32), h, w)
  return est, coverage & (memory_depth > 0) & (est > 0) & jnp.isfinite(est)


def median_scale(depth, memory_depth, coverage, *, min_cells: int = 8):
  """Per-frame median of memory depth / estimated depth over the cells both know.

  Args:
    depth: (F, H, W) estimated z-depth (H, W a multiple of the latent grid or equal to it).
    memory_depth: (F, h, w) the memory read's depth (0 where empty).
    coverage: (F, h, w) bool cells the memory covers.
    min_cells: a frame with fewer usable cells gets no fit.
  Returns:
    scale (F,) float32 (1 where no fit), enough (F,) bool the frames that got a fit.
  """
  est, ok = _valid_pairs(depth, memory_depth, coverage)
  ratio = jnp.nanmedian(jnp.where(ok, memory_depth / jnp.where(ok, est, 1.0), jnp.nan),
                        axis=(1, 2))
  enough = ok.sum(axis=(1, 2)) >= min_cells
  return jnp.where(enough, ratio, 1.0), enough


def _weighted_line(x, y, weight):
  """Per-frame weighted least squares y ~ a x + b over (F, n) -> a (F,), b (F,)."""
  wsum = jnp.maximum(weight.sum(-1), 1e-12)
  mx, my = (weight * x).sum(-1) / wsum, (weight * y).sum(-1) / wsum
  dx = x - mx[:, None]
  var = (weight * dx * dx).sum(-1)
  a = (weight * dx * (y - my[:, None])).sum(-1) / jnp.maximum(var, 1e-12)
  return a, my - a * mx


def inverse_affine(disparity, memory_depth, coverage, *, min_cells: int = 8):
  """Per-frame robust fit 1 / memory depth ~ a * disparity + b (a relative model's output).

  Least squares, then ``_REWEIGHTS`` times again with Cauchy weights of the last fit's
  residuals (scale: 1.4826 x their median absolute value), so occlusion edges and moved
  content do not pull the line.

  Args:
    disparity: (F, H, W) relative inverse depth (>= 0).
    memory_depth, coverage, min_cells: as :func:`median_scale`.
  Returns:
    a (F,), b (F,) float32 (1, 0 where no fit), enough (F,) bool.
  """
  f = disparity.shape[0]
  x, ok = _valid_pairs(disparity, memory_depth, coverage)
  x, ok = x.reshape(f, -1), ok.reshape(f, -1)
  y = jnp.where(ok, 1.0 / jnp.where(ok, memory_depth.reshape(f, -1), 1.0), 0.0)
  a, b = _weighted_line(x, y, ok.astype(jnp.float32))
  for _ in range(_REWEIGHTS):
    r = jnp.where(ok, y - (a[:, None] * x + b[:, None]), jnp.nan)
    sigma = 1.4826 * jnp.nanmedian(jnp.abs(r), axis=-1) + 1e-12
    a, b = _weighted_line(x, y, jnp.where(ok, 1.0 / (1.0 + (r / sigma[:, None]) ** 2), 0.0))
  enough = (ok.sum(-1) >= min_cells) & (a > 0)
  return jnp.where(enough, a, 1.0), jnp.where(enough, b, 0.0), enough
