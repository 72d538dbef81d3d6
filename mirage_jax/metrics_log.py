"""Training metrics to JSONL (always) and TensorBoard event files (through ``tensorboardX``).

Scalars go to ``<workdir>/metrics.jsonl`` and TensorBoard; images and videos (e.g. the
side-by-side training-time rollouts) to TensorBoard only. A video is stored the way
TensorBoard shows videos: an image summary whose encoded image is an animated GIF (what
``tensorboardX``'s ``add_video`` writes, encoded here with Pillow instead of moviepy), so it
plays in TensorBoard's image dashboard.

Reading back (:func:`read_events`, :func:`read_tags`) uses TensorBoard's own event-file loader
(the ``tensorboard`` package, in the ``dev`` extra): what it reads, TensorBoard shows.
"""

from __future__ import annotations

import io
import json
import os
from typing import Mapping

import numpy as np
from PIL import Image
import tensorboardX
from tensorboardX import summary as tbx_summary
from tensorboardX.proto.summary_pb2 import Summary

from mirage_jax import paths


def _gif_bytes(frames: np.ndarray, fps: float) -> bytes:
  """uint8 frames (T, H, W, 3) as a looping animated GIF."""
  images = [Image.fromarray(f) for f in frames]
  buffer = io.BytesIO()
  images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                 duration=max(1, round(1000.0 / fps)), loop=0)
  return buffer.getvalue()


class MetricsWriter:
  """Writes metrics to ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/``.

  Only process 0 writes (every process computes the same global metrics). Every write is
  flushed, so a crashed run keeps what it logged. A ``gs://`` workdir is written through a
  local copy uploaded every 30 s and at ``close`` (Cloud Storage cannot append; a killed run
  loses what it logged since the last upload).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._events = self._mirror = None
    if not enabled:
      return
    if paths.is_remote(workdir):
      self._mirror = paths.Mirror(workdir, resume=("metrics.jsonl",))
      workdir = self._mirror.local
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      self._events = tensorboardX.FileWriter(os.path.join(workdir, "tensorboard"))

  def _add(self, step: int, summary: Summary) -> None:
    self._events.add_summary(summary, int(step))
    self._events.flush()
    self._sync()

  def _sync(self) -> None:
    if self._mirror is not None:
      self._mirror.sync()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends one JSON line ``{"step": step, **scalars}`` and one TensorBoard event."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    self._sync()
    if self._events is not None:
      self._add(step, Summary(value=[v for tag, x in values.items()
                                     for v in tbx_summary.scalar(tag, x).value]))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images: tag -> uint8 (H, W, 3)."""
    if not self.enabled or self._events is None:
      return
    for tag, image in images.items():
      self._add(step, tbx_summary.image(tag, np.asarray(image, np.uint8), dataformats="HWC"))

  def write_videos(self, step: int, videos: Mapping[str, np.ndarray], fps: float = 8.0) -> None:
    """TensorBoard videos (animated GIFs in image summaries): tag -> uint8 (T, H, W, 3)."""
    if not self.enabled or self._events is None:
      return
    for tag, frames in videos.items():
      frames = np.asarray(frames, np.uint8)
      _, h, w, c = frames.shape
      image = Summary.Image(height=h, width=w, colorspace=c,
                            encoded_image_string=_gif_bytes(frames, fps))
      self._add(step, Summary(value=[Summary.Value(tag=tag, image=image)]))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._events is not None:
      self._events.close()
    if self._mirror is not None:
      self._mirror.close()
    self._jsonl = self._events = self._mirror = None


def _events(path: str):
  # TensorBoard's own reader (the ``tensorboard`` package, ``dev`` extra): a run-time import
  # so training never needs it.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  return event_file_loader.LegacyEventFileLoader(path).Load()  # events as written (no migration)


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Reads back the scalar events of an event file with TensorBoard's loader.

  Returns:
    ``(step, {tag: value})`` per event that holds scalars, in file order.
  """
  out = []
  for event in _events(path):
    scalars = {v.tag: v.simple_value for v in event.summary.value
               if v.WhichOneof("value") == "simple_value"}
    if scalars:
      out.append((int(event.step), scalars))
  return out


def read_tags(path: str) -> dict[str, dict[str, list[int]]]:
  """Which tags an event file holds, by kind, with their steps.

  Returns:
    ``{"scalars": {tag: [step, ...]}, "images": {...}, "videos": {...}}``; videos are the
    image summaries whose encoded image is a GIF.
  """
  out = {"scalars": {}, "images": {}, "videos": {}}
  for event in _events(path):
    for v in event.summary.value:
      kind = v.WhichOneof("value")
      if kind == "simple_value":
        key = "scalars"
      elif kind == "image":
        key = "videos" if v.image.encoded_image_string[:4] == b"GIF8" else "images"
      else:
        continue
      out[key].setdefault(v.tag, []).append(int(event.step))
  return out
