"""Videos for looking at results: MP4/GIF writers, side-by-side panels, depth colouring.

Frames are uint8 RGB arrays ``(T, H, W, 3)``. Files are written atomically (a temporary name
in the target directory, then ``os.replace``; see :func:`report.atomic_output`), so a failed
or interrupted write never leaves a half-written video behind.
"""

from __future__ import annotations

import os
from typing import Sequence

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np

from mirage_jax.errors import InputError
from mirage_jax.evaluation.report import atomic_output


def _check_frames(frames, where: str) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise InputError(where, "frames", f"expected dtype uint8, got {frames.dtype} "
                     "(convert with video.as_uint8)")
  if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
    raise InputError(where, "frames", f"expected shape (T, H, W, 3) with T, H, W >= 1, "
                     f"got {frames.shape}")
  return frames


# ----------------------------------------------------------------------------- conversions


def as_uint8(frames, data_range: float = 1.0) -> np.ndarray:
  """Float images in [0, data_range] (any shape) to uint8, rounded and clipped."""
  frames = np.asarray(frames, np.float32)
  return np.clip(np.rint(frames * (255.0 / data_range)), 0, 255).astype(np.uint8)


def mask_to_rgb(mask, colour: Sequence[int] = (255, 255, 255)) -> np.ndarray:
  """Boolean masks (T, H, W) to uint8 (T, H, W, 3): ``colour`` where True, black elsewhere."""
  mask = np.asarray(mask, bool)
  return np.where(mask[..., None], np.asarray(colour, np.uint8), np.uint8(0))


def depth_to_rgb(depths, vmin: float | None = None, vmax: float | None = None,
                 cmap: str = "turbo") -> np.ndarray:
  """Colour-maps z-depth (T, H, W) to uint8 RGB (T, H, W, 3) with one range for all frames.

  One range for the whole clip keeps a colour meaning the same distance in every frame. By
  default it is the 1st..99th percentile of the finite values, so a far plane that sources
  clamp "infinitely far" pixels to does not squash everything else. Non-finite pixels are
  black.
  """
  depths = np.asarray(depths, np.float32)
  finite = np.isfinite(depths)
  values = depths[finite]
  if vmin is None:
    vmin = float(np.percentile(values, 1)) if values.size else 0.0
  if vmax is None:
    vmax = float(np.percentile(values, 99)) if values.size else 1.0
  scaled = np.clip((depths - vmin) / max(vmax - vmin, 1e-6), 0.0, 1.0)
  import matplotlib  # pylint: disable=g-import-not-at-top  # only where a depth is drawn
  rgb = matplotlib.colormaps[cmap](np.where(finite, scaled, 0.0))[..., :3]
  return np.where(finite[..., None], as_uint8(rgb), np.uint8(0))


def upscale(frames, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of (..., H, W, C) by an integer factor -> (..., H*f, W*f, C)."""
  if int(factor) != factor or factor < 1:
    raise ValueError(f"upscale: factor must be an integer >= 1, got {factor}")
  frames = np.asarray(frames)
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def side_by_side(panels: Sequence[np.ndarray], separator_px: int = 2,
                 separator_value: int = 255) -> np.ndarray:
  """Concatenates panels left to right with thin solid separators.

  Typical use: ``side_by_side([generated, ground_truth, mask_to_rgb(coverage)])``.

  Args:
    panels: uint8 arrays (T, H, W_k, 3), same T and H.
  Returns:
    uint8 (T, H, sum_k W_k + separator_px * (len(panels) - 1), 3).
  """
  panels = [np.asarray(p) for p in panels]
  if not panels:
    raise ValueError("side_by_side: no panels")
  t, h = panels[0].shape[:2]
  for k, p in enumerate(panels):
    if p.dtype != np.uint8 or p.ndim != 4 or p.shape[-1] != 3 or p.shape[:2] != (t, h):
      raise ValueError(f"side_by_side: panel {k} is {p.dtype} {p.shape}; expected uint8 "
                       f"({t}, {h}, W, 3) like panel 0")
  separator = np.full((t, h, separator_px, 3), separator_value, np.uint8)
  pieces = [panels[0]]
  for p in panels[1:]:
    pieces += [separator, p]
  return np.concatenate(pieces, axis=2)


# ----------------------------------------------------------------------------- files


def write_mp4(path: str | os.PathLike, frames, fps: float = 8.0, quality: float = 8.0) -> None:
  """Writes uint8 frames (T, H, W, 3) as H.264 MP4 (yuv420p, plays everywhere).

  yuv420p needs even sizes: an odd height or width gets one black row or column added.

  Raises:
    InputError: bad frames, or the directory is missing or not writable.
  """
  frames = _check_frames(frames, os.fspath(path))
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  with atomic_output(path) as tmp:
    # macro_block_size=1: keep our size (imageio would otherwise resize to multiples of 16).
    writer = imageio_v2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                   quality=quality, pixelformat="yuv420p", macro_block_size=1)
    try:
      for frame in frames:
        writer.append_data(frame)
    finally:
      writer.close()


def write_gif(path: str | os.PathLike, frames, fps: float = 8.0) -> None:
  """Writes uint8 frames (T, H, W, 3) as a looping GIF (256-colour palette per frame).

  Note: the GIF encoder merges consecutive identical frames into one longer frame.

  Raises:
    InputError: bad frames, or the directory is missing or not writable.
  """
  frames = _check_frames(frames, os.fspath(path))
  with atomic_output(path) as tmp:
    iio.imwrite(tmp, frames, extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)
