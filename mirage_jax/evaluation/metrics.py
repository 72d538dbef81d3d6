"""Image, depth and geometric-consistency metrics, batched in JAX.

All image metrics take float (or uint8) images of shape ``(..., H, W, C)`` with values in
``[0, data_range]`` (``data_range=1.0`` for floats in [0, 1], ``255.0`` for uint8) and return
one value per frame, shape ``(...)``. Reduce over frames with :func:`frame_mean`, which skips
NaNs (frames whose mask selects nothing).

Conventions chosen here:
  * PSNR of identical frames is capped at ``max_db`` (100 dB by default) rather than
    reported as ``inf``: per-frame curves stay plottable, frame means stay finite and JSON
    stays strict. Real 8-bit errors stay well below the cap (one pixel off by 1/255 in a
    256x256 RGB frame is ~101 dB; in a 64x64 frame ~89 dB), so a value at the cap means
    "identical up to float precision".
  * The mean PSNR over frames is the mean of per-frame PSNRs (the usual video-generation
    convention), not the PSNR of the pooled MSE.
  * Masked metrics count only pixels where the mask is True; pixels outside the mask have
    no influence on the value (for SSIM, the local statistics are mask-weighted too).

LPIPS is in ``lpips.py`` beside this module: it needs pretrained AlexNet/VGG weights and
LPIPS' learned linear layers, given by the user (a randomly initialised network would give
numbers that mean nothing), so the benchmarks score it only when they are given.
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp

from mirage_jax import geometry

DEFAULT_MAX_DB = 100.0


def _as_float(x):
  return jnp.asarray(x).astype(jnp.float32)


def _psnr_from_mse(mse, data_range, max_db):
  # mse == 0 gives log10(inf) = inf, which the cap turns into max_db.
  return jnp.minimum(10.0 * jnp.log10(data_range ** 2 / mse), max_db)


# ----------------------------------------------------------------------------- PSNR


def psnr(a, b, data_range: float = 1.0, max_db: float = DEFAULT_MAX_DB):
  """Per-frame PSNR in dB.

  Args:
    a, b: (..., H, W, C) images in [0, data_range].
    data_range: peak value (1.0 for [0, 1] floats, 255.0 for uint8).
    max_db: cap for (near-)identical frames.
  Returns:
    (...) PSNR per frame.
  """
  a, b = _as_float(a), _as_float(b)
  mse = jnp.mean((a - b) ** 2, axis=(-3, -2, -1))
  return _psnr_from_mse(mse, data_range, max_db)


def masked_psnr(a, b, mask, data_range: float = 1.0, max_db: float = DEFAULT_MAX_DB):
  """Per-frame PSNR over the pixels where ``mask`` is True (all channels of those pixels).

  Args:
    a, b: (..., H, W, C) images in [0, data_range].
    mask: (..., H, W) bool, e.g. object region, static region, memory-covered region.
  Returns:
    (...) PSNR per frame; NaN for frames whose mask is empty.
  """
  a, b = _as_float(a), _as_float(b)
  m = jnp.asarray(mask, bool)[..., None]
  sq = jnp.where(m, (a - b) ** 2, 0.0)  # where, not multiply: NaN/inf outside must not leak in
  count = jnp.sum(m, axis=(-3, -2, -1)) * a.shape[-1]
  mse = jnp.sum(sq, axis=(-3, -2, -1)) / jnp.maximum(count, 1)
  return jnp.where(count > 0, _psnr_from_mse(mse, data_range, max_db), jnp.nan)


def frame_mean(values):
  """Mean over all entries of per-frame values (...), ignoring NaNs (empty masks); scalar."""
  return jnp.nanmean(jnp.asarray(values))


# ----------------------------------------------------------------------------- SSIM


def _flatten_frames(x, trailing: int):
  """(..., *trail) -> (N, *trail) and the leading shape to restore."""
  lead = x.shape[:x.ndim - trailing]
  return x.reshape((-1,) + x.shape[x.ndim - trailing:]), lead


def _gaussian_1d(filter_size: int, filter_sigma: float):
  # Same taps as dm-pix's default filter, so the masked variant agrees with pix.ssim.
  hw = filter_size // 2
  shift = (2 * hw - filter_size + 1) / 2
  taps = jnp.exp(-0.5 * ((jnp.arange(filter_size) - hw + shift) / filter_sigma) ** 2)
  return taps / jnp.sum(taps)


def _blur_valid(z, taps):
  """Separable 'valid' Gaussian blur of (N, H, W, C) -> (N, H-k+1, W-k+1, C)."""
  k = taps.shape[0]
  h, w = z.shape[1] - k + 1, z.shape[2] - k + 1
  z = sum(taps[i] * z[:, i:i + h] for i in range(k))
  return sum(taps[i] * z[:, :, i:i + w] for i in range(k))


def ssim(a, b, data_range: float = 1.0, filter_size: int = 11, filter_sigma: float = 1.5):
  """Per-frame SSIM (dm-pix, Gaussian window, mean over channels and valid window centres).

  Args:
    a, b: (..., H, W, C) images in [0, data_range]; H, W >= filter_size.
  Returns:
    (...) SSIM per frame, 1 for identical frames.
  """
  a, lead = _flatten_frames(_as_float(a), 3)
  b, _ = _flatten_frames(_as_float(b), 3)
  out = pix.ssim(a, b, max_val=data_range, filter_size=filter_size, filter_sigma=filter_sigma)
  return out.reshape(lead)


def masked_ssim(a, b, mask, data_range: float = 1.0, filter_size: int = 11,
                filter_sigma: float = 1.5):
  """Per-frame SSIM restricted to ``mask``.

  Local means and (co)variances are mask-weighted Gaussian averages (normalised
  convolution), so pixels outside the mask never enter the statistics; the SSIM map is then
  averaged over window centres inside the mask. With an all-True mask this equals
  :func:`ssim`.

  Args:
    a, b: (..., H, W, C) images in [0, data_range]; H, W >= filter_size.
    mask: (..., H, W) bool.
  Returns:
    (...) SSIM per frame; NaN where no window centre (the image shrunk by
    ``filter_size // 2`` on each side) lies in the mask.
  """
  a, lead = _flatten_frames(_as_float(a), 3)
  b, _ = _flatten_frames(_as_float(b), 3)
  m, _ = _flatten_frames(jnp.asarray(mask, bool), 2)
  m = m[..., None].astype(jnp.float32)
  taps = _gaussian_1d(filter_size, filter_sigma)
  weight = _blur_valid(m, taps)

  def filter_fn(z):
    # jnp.where keeps non-finite values outside the mask out of the sums.
    return _blur_valid(jnp.where(m > 0, z, 0.0), taps) / jnp.maximum(weight, 1e-12)

  ssim_map = pix.ssim(a, b, max_val=data_range, filter_fn=filter_fn, return_map=True)
  hw = filter_size // 2
  centres = m[:, hw:hw + ssim_map.shape[1], hw:hw + ssim_map.shape[2]] > 0
  centres = jnp.broadcast_to(centres, ssim_map.shape)
  total = jnp.sum(jnp.where(centres, ssim_map, 0.0), axis=(1, 2, 3))
  count = jnp.sum(centres, axis=(1, 2, 3))
  out = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
  return out.reshape(lead)


# ----------------------------------------------------------------------------- depth


def depth_metrics(pred, gt, valid=None):
  """Per-frame depth errors over valid pixels.

  A pixel is valid where ``gt`` and ``pred`` are finite and > 0 (and ``valid`` is True).

  Args:
    pred: (..., H, W) predicted z-depth.
    gt: (..., H, W) reference z-depth.
    valid: optional (..., H, W) bool.
  Returns:
    dict of (...) arrays: ``abs_rel`` mean |pred - gt| / gt, ``rmse`` sqrt(mean (pred - gt)^2),
    ``delta1`` fraction with max(pred/gt, gt/pred) < 1.25; NaN for frames with no valid pixel.
  """
  pred, gt = _as_float(pred), _as_float(gt)
  ok = jnp.isfinite(pred) & jnp.isfinite(gt) & (pred > 0) & (gt > 0)
  if valid is not None:
    ok &= jnp.asarray(valid, bool)
  safe_pred = jnp.where(ok, pred, 1.0)
  safe_gt = jnp.where(ok, gt, 1.0)
  count = jnp.sum(ok, axis=(-2, -1))

  def mean(x):
    return jnp.where(count > 0, jnp.sum(jnp.where(ok, x, 0.0), axis=(-2, -1))
                     / jnp.maximum(count, 1), jnp.nan)

  ratio = jnp.maximum(safe_pred / safe_gt, safe_gt / safe_pred)
  return {
      "abs_rel": mean(jnp.abs(safe_pred - safe_gt) / safe_gt),
      "rmse": jnp.sqrt(mean((safe_pred - safe_gt) ** 2)),
      "delta1": mean((ratio < 1.25).astype(jnp.float32)),
  }


# ----------------------------------------------------------------------------- geometric consistency


def reprojection_consistency(frame_i, depth_i, K_i, c2w_i, frame_j, depth_j, K_j, c2w_j,
                             rel_tol: float = 0.05, data_range: float = 1.0,
                             max_db: float = DEFAULT_MAX_DB):
  """How well view j agrees with view i warped into it by i's own depth.

  Every pixel of view i is lifted to 3D with ``depth_i`` and projected into view j. It
  counts when it lands inside j in front of the camera and passes the z-test
  ``|z - depth_j| <= rel_tol * depth_j`` at the nearest pixel (so occluded points and
  points whose two depths disagree are left out). Colours are compared at that nearest
  pixel; nearest sampling leaves a small floor of resampling error, so compare against the
  same score computed on ground-truth frames.

  Args:
    frame_i, frame_j: (H, W, C) images in [0, data_range].
    depth_i, depth_j: (H, W) z-depth.
    K_i, K_j: (3, 3) intrinsics. c2w_i, c2w_j: (4, 4) camera-to-world.
  Returns:
    (psnr, fraction): scalars; PSNR over the counted pixels (NaN when none count) and the
    fraction of view i's pixels that count.
  """
  frame_i, frame_j = _as_float(frame_i), _as_float(frame_j)
  depth_i, depth_j = _as_float(depth_i), _as_float(depth_j)
  h, w = depth_i.shape
  points = geometry.unproject_depth(depth_i, _as_float(K_i), _as_float(c2w_i)).reshape(-1, 3)
  uv, z = geometry.project_points(points, _as_float(K_j), _as_float(c2w_j))
  # Pixel (u, v) covers [u, u+1) x [v, v+1), so floor gives the nearest pixel centre.
  u = jnp.floor(uv[:, 0])
  v = jnp.floor(uv[:, 1])
  inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (z > 0) & jnp.isfinite(depth_i).reshape(-1)
  ui = jnp.clip(u, 0, w - 1).astype(jnp.int32)
  vi = jnp.clip(v, 0, h - 1).astype(jnp.int32)
  target_depth = depth_j[vi, ui]
  passed = inside & (jnp.abs(z - target_depth) <= rel_tol * target_depth)
  sq = (frame_i.reshape(-1, frame_i.shape[-1]) - frame_j[vi, ui]) ** 2
  sq = jnp.where(passed[:, None], sq, 0.0)
  count = jnp.sum(passed)
  mse = jnp.sum(sq) / jnp.maximum(count * frame_i.shape[-1], 1)
  score = jnp.where(count > 0, _psnr_from_mse(mse, data_range, max_db), jnp.nan)
  return score, count / (h * w)


def geometric_consistency(frames, depths, intrinsics, poses_c2w, stride: int = 1,
                          rel_tol: float = 0.05, data_range: float = 1.0,
                          max_db: float = DEFAULT_MAX_DB):
  """Reprojection consistency of a generated clip between frames i and i + stride.

  Args:
    frames: (T, H, W, C) generated images in [0, data_range].
    depths: (T, H, W) generated z-depth.
    intrinsics: (T, 3, 3). poses_c2w: (T, 4, 4).
    stride: frame offset of the neighbour view (T > stride).
  Returns:
    dict with ``psnr`` (T - stride,) (NaN for pairs with no counted pixel) and
    ``fraction`` (T - stride,): per pair (i, i + stride), see
    :func:`reprojection_consistency`.
  """
  frames, depths = jnp.asarray(frames), jnp.asarray(depths)
  intrinsics, poses_c2w = jnp.asarray(intrinsics), jnp.asarray(poses_c2w)
  if not 0 < stride < frames.shape[0]:
    raise ValueError(f"geometric_consistency: need 0 < stride < T, got stride={stride}, "
                     f"T={frames.shape[0]}")
  pair = jax.vmap(lambda *args: reprojection_consistency(
      *args, rel_tol=rel_tol, data_range=data_range, max_db=max_db))
  score, fraction = pair(frames[:-stride], depths[:-stride], intrinsics[:-stride],
                         poses_c2w[:-stride], frames[stride:], depths[stride:],
                         intrinsics[stride:], poses_c2w[stride:])
  return {"psnr": score, "fraction": fraction}
