"""Reconstruction protocol (RealEstate10K): generate a clip's frames from its first frame and
cameras, score them against the real ones.

Per clip: the first ``num_frames`` frames (every ``stride``-th) at the model's resolution
(``revisit.fit_clip``); frame 0 is given, frames 1..T-1 are generated along the clip's
cameras and scored per frame by PSNR and SSIM (``metrics.py``, uint8 range) and, when LPIPS
weights are given, by LPIPS through :func:`lpips_scores`. Per clip: the means over its scored
frames; summary: the means over clips.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mirage_jax.errors import InputError
from mirage_jax.evaluation import metrics

SCALARS = ("psnr", "ssim", "lpips")


def select_frames(clip: Mapping[str, Any], num_frames: int | None, stride: int) -> dict:
  """Every ``stride``-th frame of ``clip`` (frames, depths, intrinsics, poses_c2w), the first
  ``num_frames`` of them."""
  if stride < 1:
    raise InputError("--stride", "stride", f"must be >= 1, got {stride}")
  keep = slice(0, None if num_frames is None else (num_frames - 1) * stride + 1, stride)
  return {k: np.asarray(clip[k])[keep] for k in ("frames", "depths", "intrinsics", "poses_c2w")}


def check_lpips(weights: str | None) -> Callable | None:
  """The LPIPS function for ``weights`` (None without weights).

  The hook for ``metrics.lpips(a, b, weights=...)`` (uint8 (T, H, W, 3) frames -> (T,)), which
  this build may not have: then given weights are refused in one line (call this before
  loading a model).
  """
  if not weights:
    return None
  fn = getattr(metrics, "lpips", None)
  if fn is None:
    raise InputError("--lpips_weights", "lpips_weights", "this build has no LPIPS "
                     "(mirage_jax.evaluation.metrics.lpips)")
  return fn


def lpips_scores(generated: np.ndarray, truth: np.ndarray, weights: str | None) -> np.ndarray | None:
  """Per-frame LPIPS (T,) of uint8 (T, H, W, 3) frames, or None without ``weights``."""
  fn = check_lpips(weights)
  return None if fn is None else np.asarray(fn(generated, truth, weights=weights), np.float64)


def score_clip(generated: np.ndarray, truth: np.ndarray, lpips_weights: str | None = None) -> dict:
  """Scores frames 1..T-1 of ``generated`` against ``truth`` (both (T, H, W, 3) uint8).

  Returns:
    psnr, ssim, lpips (None without weights): means over the scored frames; per_frame: each
    metric's (T-1,) list.
  """
  if generated.shape != truth.shape:
    raise ValueError(f"generated {generated.shape} and truth {truth.shape} differ")
  gen, ref = generated[1:], truth[1:]
  per_frame = dict(psnr=np.asarray(metrics.psnr(gen, ref, data_range=255.0), np.float64),
                   ssim=np.asarray(metrics.ssim(gen, ref, data_range=255.0), np.float64))
  lp = lpips_scores(gen, ref, lpips_weights)
  if lp is not None:
    per_frame["lpips"] = lp
  out = {k: float(np.nanmean(per_frame[k])) if k in per_frame else None for k in SCALARS}
  out["per_frame"] = {k: v.tolist() for k, v in per_frame.items()}
  return out


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict:
  """Means over clips of each scalar (None when no clip has it), and the clip count."""
  out: dict[str, Any] = {"clips": len(results)}
  for k in SCALARS:
    values = [r[k] for r in results.values() if r.get(k) is not None]
    out[k] = float(np.mean(values)) if values else None
  return out


def table_rows(results: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]
               ) -> list[dict]:
  """Rows for ``report.format_table``: one per clip, then the mean."""
  rows = [dict(clip=name, frames=r["frames"], **{k: r[k] for k in SCALARS})
          for name, r in results.items()]
  return rows + [dict(clip="mean", frames=None, **{k: summary[k] for k in SCALARS})]


TABLE_COLUMNS: Sequence[str] = ("clip", "frames", *SCALARS)
