"""Reconstruction protocol (RealEstate10K): generate a clip's frames from its first frame and
cameras, score them against the real ones.

Per clip: the first ``num_frames`` frames (every ``stride``-th) at the model's resolution
(``revisit.fit_clip``); frame 0 is given, frames 1..T-1 are generated along the clip's
cameras and scored per frame by PSNR and SSIM (``metrics.py``, uint8 range) and, when LPIPS
weights are given (``--lpips_backbone``), by LPIPS (``lpips.py``). Per clip: the means over its scored
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


def score_clip(generated: np.ndarray, truth: np.ndarray, lpips_scorer: Callable | None = None
               ) -> dict:
  """Scores frames 1..T-1 of ``generated`` against ``truth`` (both (T, H, W, 3) uint8).

  ``lpips_scorer``: a loaded ``lpips.LPIPS`` (``--lpips_backbone``), or None (not scored).

  Returns:
    psnr, ssim, lpips (None without weights): means over the scored frames; per_frame: each
    metric's (T-1,) list.
  """
  if generated.shape != truth.shape:
    raise ValueError(f"generated {generated.shape} and truth {truth.shape} differ")
  gen, ref = generated[1:], truth[1:]
  per_frame = dict(psnr=np.asarray(metrics.psnr(gen, ref, data_range=255.0), np.float64),
                   ssim=np.asarray(metrics.ssim(gen, ref, data_range=255.0), np.float64))
  if lpips_scorer is not None:
    per_frame["lpips"] = np.asarray(lpips_scorer(gen, ref, data_range=255.0), np.float64)
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
