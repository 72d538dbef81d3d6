"""Wan latent clips: the record format, its ArrayRecord reader and the Grain pipeline.

Written once by ``python -m data_pipelines.encode_latents`` (the Wan VAE over a built posed-clip
dataset); training on the Wan family reads these and never encodes pixels. A dataset folder::

  DIR/metadata.json                      shapes, source, VAE export, frame pairing
  DIR/control_latents.npy                (Tl + Pl, h, w, 48) f32: the encoded all-ones video
  DIR/empty_text.npy                     optional (Lt, D): the empty prompt's embedding (umT5
                                         of "", zero-padded; with --text_encoder always)
  DIR/caption_embeddings.npz             with --text_encoder: clip_id -> (Lt_i, D) float32
                                         umT5 of each captioned clip (real tokens only)
  DIR/<split>-<k>-of-<n>.array_record    records written by process k of n

One record (one window of a clip; ``L = Tl + Pl`` latent frames in the model's order, the
target's first):

  target_latents     (Tl, h, w, 48) bfloat16  normalised Wan latents of the T target frames
  preceding_latents  (Pl, h, w, 48) bfloat16  of the P frames before them (encoded as a video)
  reference_latents  (R, h, w, 48)  bfloat16  earlier/later frames, each encoded alone
  depths             (L, h, w)      float32   z-depth at latent resolution (bilinear, half-pixel
                                              centres, no antialiasing, as the reference resizes)
  static_masks       (L, h, w)      uint8     1 = memory may take the cell: static (nearest) and
                                              its depth observed (encode_latents.latent_static_mask)
  intrinsics         (L, 3, 3)      float32   in PIXELS of the encoded images (16 h x 16 w);
                                              the memory backends rescale them to latent cells
  poses_c2w          (L, 4, 4)      float32   OpenCV camera-to-world
  ref_intrinsics     (R, 3, 3), ref_poses_c2w (R, 4, 4)
  text               (Lt, D)        bfloat16  caption embedding (umT5-xxl: 512 x 4096), zeros
                                              past the caption's tokens (the reference's
                                              WanPrompter); no caption: the empty prompt's
                                              embedding (zeros only when none was known)
  has_text           ()             bool      False: no caption; training uses the empty prompt
  clip_index         ()             int32

Latent frame k of a chunk starting at video frame s carries the pose, intrinsics and depth of
video frame ``s + 4 k`` (``memory.mirage.latent_frame_indices``; the reference's pairing).

Each record is an ``.npz`` (no pickles: ``allow_pickle=False``); bfloat16 arrays are stored as
their uint16 bits under a ``<name>.bf16`` key.
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import Any, Sequence

import grain
import jax
import ml_dtypes
import numpy as np

from data_pipelines import pipeline
from mirage_jax.errors import InputError

METADATA = "metadata.json"
CONTROL = "control_latents.npy"
EMPTY_TEXT = "empty_text.npy"
DATASET_NAME = "wan_latents"
_BF16 = np.dtype(ml_dtypes.bfloat16)
FIELDS = ("target_latents", "preceding_latents", "reference_latents", "depths", "static_masks",
          "intrinsics", "poses_c2w", "ref_intrinsics", "ref_poses_c2w", "text", "has_text",
          "clip_index")


def encode_record(example: dict[str, np.ndarray]) -> bytes:
  """One example (the fields above) -> bytes."""
  arrays = {}
  for k, v in example.items():
    v = np.asarray(v)
    if v.dtype == _BF16:
      arrays[k + ".bf16"] = v.view(np.uint16)
    else:
      arrays[k] = v
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_record(data: bytes) -> dict[str, np.ndarray]:
  """Bytes of :func:`encode_record` -> the example (bfloat16 restored)."""
  out = {}
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    for k in z.files:
      if k.endswith(".bf16"):
        out[k[:-5]] = z[k].view(_BF16)
      else:
        out[k] = z[k]
  return out


def shard_path(data_dir: str, split: str, index: int, count: int) -> str:
  return os.path.join(data_dir, f"{split}-{index:05d}-of-{count:05d}.array_record")


class LatentClips:
  """Random-access latent clips of one split of a dataset folder (``len``, ``[i]``).

  Picklable (Grain workers reopen the files).
  """

  def __init__(self, data_dir: str, split: str):
    self.data_dir, self.split = str(data_dir), split
    meta = os.path.join(self.data_dir, METADATA)
    if not os.path.exists(meta):
      raise InputError(self.data_dir, METADATA, "not a latent-clip dataset (run "
                       "python -m data_pipelines.encode_latents first)")
    with open(meta) as f:
      self.metadata = json.load(f)
    self.paths = sorted(glob.glob(os.path.join(self.data_dir, f"{split}-*.array_record")))
    if not self.paths:
      raise InputError(self.data_dir, split, f"no {split}-*.array_record files")
    self._source = None

  def _open(self):
    if self._source is None:
      from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
      self._source = ards.ArrayRecordDataSource(self.paths)
    return self._source

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return decode_record(self._open()[int(index)])

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}


def read_metadata(data_dir: str) -> dict:
  """``DIR/metadata.json`` ({} when absent)."""
  path = os.path.join(str(data_dir), METADATA)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_side_array(data_dir: str, name: str) -> np.ndarray | None:
  """``DIR/<name>`` as an array, or None when absent."""
  path = os.path.join(str(data_dir), name)
  if not os.path.exists(path):
    return None
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(path, name, f"unreadable ({e})") from e


class _ToExample:
  """Record -> float32 training example (bf16 latents widened; the step casts for compute)."""

  def __init__(self, source, drop_preceding: bool = False):
    self.source = source
    self.drop_preceding = drop_preceding

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    """Example of ``(global position, record index)`` (``pipeline.global_rows``)."""
    _, record_index = item
    where = f"latent clip record {record_index}"
    try:
      r = self.source[record_index]
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(where, "record", f"unreadable or corrupt ({type(e).__name__}: {e})") from e
    missing = [k for k in FIELDS if k not in r]
    if missing:
      raise InputError(where, missing[0], "missing from the record")
    out = {}
    for k in FIELDS:
      v = r[k]
      if v.dtype == _BF16 or v.dtype == np.float64:
        v = v.astype(np.float32)
      out[k] = v
    out["has_text"] = np.bool_(out["has_text"])
    out["clip_index"] = np.int32(out["clip_index"])
    if self.drop_preceding:  # the reference's --max-preceding-frames 0: targets only
      tl = out["target_latents"].shape[0]
      out["preceding_latents"] = out["preceding_latents"][:0]
      for k in ("depths", "static_masks", "intrinsics", "poses_c2w"):
        out[k] = out[k][:tl]
    return out


def make_dataset(source: Sequence[Any], *, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, read_threads: int = 2,
                 read_buffer_size: int = 4, start_step: int = 0,
                 where: str = "latent_clips", drop_preceding: bool = False) -> grain.IterDataset:
  """Batches of latent clips (leading axis ``batch_size // shard_count``): this shard's rows
  of global batches ``start_step, start_step + 1, ...`` (``pipeline.global_rows``: the same
  stream for any process count, so a resumed run starts from its step).

  ``drop_preceding``: examples without their preceding latents (``(0, h, w, 48)``; depths,
  static_masks, intrinsics and poses_c2w keep the target frames only), as the reference's
  training script loads them by default.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if batch_size < 1 or batch_size % shard_count:
    raise InputError(where, "batch_size", f"global batch {batch_size} is not a positive "
                     f"multiple of shard_count={shard_count}")
  if len(source) == 0:
    raise InputError(where, "source", "no records")
  ds = pipeline.global_rows(len(source), batch_size=batch_size, seed=seed, shuffle=shuffle,
                            num_epochs=num_epochs, shard_index=shard_index,
                            shard_count=shard_count, start_step=start_step)
  ds = ds.map(_ToExample(source, drop_preceding))
  ds = ds.batch(batch_size // shard_count, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=read_buffer_size))


def from_config(source: Sequence[Any], config, where: str = "config.data",
                start_step: int = 0) -> grain.IterDataset:
  """:func:`make_dataset` with the fields of a ``config.data`` (window fields ignored), from
  global batch ``start_step`` on."""
  return make_dataset(source, batch_size=config.batch_size, seed=config.seed,
                      shuffle=config.shuffle, num_epochs=config.num_epochs,
                      shard_index=config.shard_index, shard_count=config.shard_count,
                      read_threads=config.read_threads, read_buffer_size=config.read_buffer_size,
                      start_step=start_step, where=where,
                      drop_preceding=bool(config.get("drop_preceding", False)))
