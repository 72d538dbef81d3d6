r"""Pre-encodes a built posed-clip dataset into Wan latent clips, once.

  python -m data_pipelines.encode_latents --data_dir=DIR --dataset=procedural_rooms \
      --vae=EXPORT/vae --output_dir=LATENTS [--resolution=704,1280 --target_frames=33 \
      --preceding_frames=8 --num_references=0 --windows_per_clip=1 \
      --text_encoder=UMT5_EXPORT --tokenizer=UMT5_TOKENIZER --text_len=512 --num_shards=1]
  # Or embeddings made elsewhere: --text_embeddings=captions.npz --empty_text=empty.npy
  # On Beam workers (as data_pipelines.build): --beam_runner=... --beam_options=...

Each window of ``preceding_frames + target_frames`` video frames becomes one record
(``data_pipelines.latent_clips`` documents the format): the target and preceding frames are
encoded as two videos by the Wan VAE (the preceding part uses its first ``1 + 4 k`` frames,
as the reference's causal encoder does), references as single images.

The clips are encoded on Apache Beam: ``Create(indices) | Reshuffle | ParDo(encode)`` where each
worker loads the VAE once (``DoFn.setup``) and opens the source dataset itself, so the same
code runs in this process (default), on ``--direct_num_workers`` local processes, or on a
cluster. Encoding is jitted and its batch of videos split over the worker's local devices.
The records of clip ``i`` go to ``<split>-<k>-of-<n>.array_record`` with ``k = i % n``
(``--num_shards`` n), in clip order: every runner and worker count writes the same files.
This process then writes ``metadata.json`` (last: it marks the folder complete),
``control_latents.npy`` (the VACE control channels for this window's latent frames) and
``empty_text.npy`` (umT5 of "" by ``--text_encoder``, or ``--empty_text``; without either
training uses the base export's, or umT5 of "" by the config's text encoder, and zeros, with a
warning, only when neither is known).

Captions. ``--text_encoder`` (a ``python -m mirage_jax.convert_text`` export) and
``--tokenizer`` (its ``google/umt5-xxl`` folder): each clip's ``caption`` (the source
dataset's, ``data_pipelines/clip.py``) is encoded by umT5 BEFORE the Beam pipeline, in this
process, as a JAX job on its devices: the distinct captions ``--text_batch`` at a time, jitted
at one shape, the encoder's params sharded over the local devices (``PromptEncoder.
encode_batch``). The embeddings (the real tokens) go to ``caption_embeddings.npz`` in the
output folder (``clip_id -> (Lt_i, D)`` float32, written one array at a time), which the
Beam workers then read as they read ``--text_embeddings``. (Why not on the Beam workers: see
docs/DESIGN.md, "Caption embeddings".) Or ``--text_embeddings``: an ``.npz`` of
``clip_id -> (Lt <= text_len, D)`` embeddings made elsewhere.

Each record's ``text`` is its embedding zero-padded to ``(text_len, D)`` (the reference's
``WanPrompter``: real tokens, zeros past the prompt's length) and ``has_text`` True; a clip
with an empty caption (or no entry in ``--text_embeddings``) gets the empty prompt's real
embedding (umT5 of ""; with ``--text_embeddings``: ``--empty_text`` when given, else zeros)
and ``has_text = False``, which training treats as a dropped caption.

References (``--num_references`` R > 0): picked as the reference's
``reference_frames.select_reference_frames`` picks them, with its defaults: candidates are the
clip's frames at least 2 frames outside the window (``REF_MIN_GAP``), every 2nd of them
(``--ref_stride``) is scored by its largest voxel IoU (``--ref_voxel_size`` 0.1 m, the
reference's 10 x scene voxel) with any one target frame, counting static pixels with observed
depth only; those with IoU >= ``--ref_iou_threshold`` (0.04) are kept, best first, at most R
(the reference's ``max_refs``, 8). The reference then has a variable count; here the R slots
are fixed so batches have one shape: slots left over take the best candidates below the
threshold (then the best again when the clip has fewer candidates than R).

Depth holes (the clip's ``depth_valid``; all of a clip with ``has_depth`` False) never reach
memory: a latent cell's ``static_masks`` is 0 unless its nearest pixel is static and every
pixel its bilinear depth blends is observed (``latent_static_mask``).
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import ml_dtypes
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import clip as clip_lib
from data_pipelines import latent_clips
from data_pipelines import pipeline
from mirage_jax import paths
from mirage_jax.errors import InputError, run_app

_BF16 = np.dtype(ml_dtypes.bfloat16)
CAPTION_EMBEDDINGS = "caption_embeddings.npz"  # written with --text_encoder


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("data_dir", None, "TFDS data_dir of the built posed-clip dataset.",
                      flag_values=fv)
  flags.DEFINE_string("dataset", "procedural_rooms", "Dataset name in --data_dir.",
                      flag_values=fv)
  flags.DEFINE_string("config_name", "default", "Dataset config name.", flag_values=fv)
  flags.DEFINE_string("vae", None, "Wan VAE export (convert_wan's EXPORT/vae).", flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Latent dataset folder to write.", flag_values=fv)
  flags.DEFINE_list("resolution", None, "H,W of the encoded frames (multiples of 16; default: "
                    "the source's, which must be multiples of 16).", flag_values=fv)
  flags.DEFINE_integer("target_frames", 33, "Target video frames (1 + 4 k).", flag_values=fv)
  flags.DEFINE_integer("preceding_frames", 8, "Preceding video frames (>= 1).", flag_values=fv)
  flags.DEFINE_integer("num_references", 0, "Reference frames per window.", flag_values=fv)
  flags.DEFINE_float("ref_voxel_size", REF_VOXEL_SIZE, "Voxel (m) of the reference-frame IoU "
                     "(the reference's 10 x scene_voxel_size).", flag_values=fv)
  flags.DEFINE_float("ref_iou_threshold", REF_IOU_THRESHOLD, "IoU a reference frame needs "
                     "(the reference's eps_iou); slots left over take the best below it.",
                     flag_values=fv)
  flags.DEFINE_integer("ref_stride", REF_STRIDE, "Every n-th candidate frame is scored (the "
                       "reference's K_ref_stride).", flag_values=fv)
  flags.DEFINE_integer("windows_per_clip", 1, "Windows per clip (consecutive, not "
                       "overlapping, from the clip's start).", flag_values=fv)
  flags.DEFINE_list("splits", ["train", "validation"], "Splits to encode.", flag_values=fv)
  flags.DEFINE_string("text_embeddings", "", ".npz of clip_id -> (Lt, D) caption embeddings.",
                      flag_values=fv)
  flags.DEFINE_string("empty_text", "", ".npy (Lt, D): the empty prompt's embedding.",
                      flag_values=fv)
  flags.DEFINE_string("text_encoder", "", "umT5 export (python -m mirage_jax.convert_text) "
                      "that encodes each clip's caption (with --tokenizer).", flag_values=fv)
  flags.DEFINE_string("tokenizer", "", "The text encoder's tokenizer folder (google/umt5-xxl).",
                      flag_values=fv)
  flags.DEFINE_integer("text_batch", 8, "Captions per umT5 call (--text_encoder).",
                       flag_values=fv)
  flags.DEFINE_integer("text_len", 512, "Lt: tokens a caption is padded to (the DiT's "
                       "config.denoiser.text_len).", flag_values=fv)
  flags.DEFINE_integer("text_dim", 4096, "D: the DiT's text_dim (--text_encoder's width must "
                       "match; without captions, the width of the empty text).", flag_values=fv)
  flags.DEFINE_integer("num_shards", 1, "ArrayRecord files per split (a file's writer holds "
                       "its records in memory: at scale, ~1000 clips per file).", flag_values=fv)
  flags.DEFINE_string("beam_runner", "", "Beam runner (data_pipelines.build's); empty: in "
                      "this process.", flag_values=fv)
  flags.DEFINE_list("beam_options", [], "Beam pipeline options, name=value.", flag_values=fv)


# ----------------------------------------------------------------------------- geometry


def _linear_taps(n: int, size: int):
  """Rows/cols and weights of a linear resize n -> size (half-pixel centres, no antialias)."""
  src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
  i1 = np.minimum(i0 + 1, n - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, 1.0 - w1, w1


def resize_depth(depth: np.ndarray, h: int, w: int) -> np.ndarray:
  """(F, H, W) -> (F, h, w) bilinear (as PyTorch's ``interpolate(align_corners=False)``)."""
  r0, r1, a0, a1 = _linear_taps(depth.shape[1], h)
  c0, c1, b0, b1 = _linear_taps(depth.shape[2], w)
  tap = lambda r, c: depth[:, r][:, :, c]
  return (a0[:, None] * b0[None] * tap(r0, c0) + a0[:, None] * b1[None] * tap(r0, c1)
          + a1[:, None] * b0[None] * tap(r1, c0) + a1[:, None] * b1[None] * tap(r1, c1)
          ).astype(np.float32)


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
  """(F, H, W) -> (F, h, w) nearest (PyTorch's ``mode='nearest'``)."""
  rows = np.minimum(np.floor(np.arange(h) * (mask.shape[1] / h)), mask.shape[1] - 1).astype(int)
  cols = np.minimum(np.floor(np.arange(w) * (mask.shape[2] / w)), mask.shape[2] - 1).astype(int)
  return mask[:, rows][:, :, cols]


def latent_static_mask(dynamic_masks: np.ndarray, depth_valid: np.ndarray, h: int, w: int
                       ) -> np.ndarray:
  """(F, H, W) object ids and depth validity -> (F, h, w) bool: the latent cells memory may
  take (``clip.liftable`` at latent resolution).

  Static by the nearest pixel (the reference's mask resize); observed depth only where every
  bilinear tap of ``resize_depth`` is observed, so a cell's depth never blends a hole's
  placeholder in (the reference's NaN holes propagate through its bilinear resize the same way).
  """
  static = resize_mask(clip_lib.liftable(dynamic_masks), h, w)
  observed = resize_depth(np.asarray(depth_valid, np.float32), h, w) >= 1.0 - 1e-6
  return static & observed


# The reference's reference-frame selection (data_process/data_config.py, SampleConfig):
# IoU voxels 10 x scene_voxel_size 0.01 m, eps_iou, max_refs, K_ref_stride,
# min_gap_for_candidates.
REF_VOXEL_SIZE, REF_IOU_THRESHOLD, REF_MAX_COUNT, REF_STRIDE, REF_MIN_GAP = 0.1, 0.04, 8, 2, 2


def _voxels(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, voxel: float,
            keep: np.ndarray | None = None) -> set:
  """Voxel keys of the world points of one frame's depth (any resolution); ``keep`` (H, W)
  bool leaves out moving pixels and depth holes."""
  h, w = depth.shape
  v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  x = (u - K[0, 2]) / K[0, 0] * depth
  y = (v - K[1, 2]) / K[1, 1] * depth
  cam = np.stack([x, y, depth], -1).reshape(-1, 3)
  ok = np.isfinite(cam).all(-1) & (cam[:, 2] > 0)
  if keep is not None:
    ok &= np.asarray(keep, bool).reshape(-1)
  world = cam[ok] @ c2w[:3, :3].T + c2w[:3, 3]
  return set(map(tuple, np.floor(world / voxel).astype(np.int64)))


def reference_candidates(num_frames: int, window: range, min_gap: int = REF_MIN_GAP) -> list[int]:
  """The reference's candidates: frames outside the window (preceding + target frames) at
  least ``min_gap`` frames from it (``sample_indices.sample_frame_indices``)."""
  return [i for i in range(num_frames)
          if i not in window and min(abs(i - window.start), abs(i - (window.stop - 1))) >= min_gap]


def select_references(depths, K, c2w, candidates, targets, *, keep=None,
                      voxel_size: float = REF_VOXEL_SIZE, iou_threshold: float = REF_IOU_THRESHOLD,
                      max_refs: int = REF_MAX_COUNT, stride: int = REF_STRIDE):
  """The reference's ``reference_frames.select_reference_frames``, with its defaults.

  Every ``stride``-th candidate is scored by its largest voxel IoU with any one target frame
  (per frame, not against the targets' union); those with IoU >= ``iou_threshold`` are
  kept, best first, at most ``max_refs``.

  Args:
    depths: (T, H, W); K: (T, 3, 3); c2w: (T, 4, 4); keep: (T, H, W) bool or None (the
      pixels that count: static with observed depth, ``clip.liftable``).
    candidates, targets: frame indices.
  Returns:
    (picked frame indices, their IoUs), best first; possibly empty.
  """
  if max_refs <= 0:
    return [], []
  cands = list(candidates)[::stride] if stride > 1 else list(candidates)
  occ = lambda i: _voxels(depths[i], K[i], c2w[i], voxel_size, None if keep is None else keep[i])
  target_occ = [occ(i) for i in targets]
  scored = []
  for c in cands:
    vox = occ(c)
    best = 0.0
    for t in target_occ:
      union = len(vox | t)
      best = max(best, len(vox & t) / union if union else 0.0)
    if best >= iou_threshold:
      scored.append((c, best))
  scored.sort(key=lambda x: x[1], reverse=True)  # stable: ties keep candidate order
  picked = scored[:max_refs]
  return [c for c, _ in picked], [s for _, s in picked]


# ----------------------------------------------------------------------------- encoding


def load_vae(path: str):
  """(Wan VAE, its config) of the ``--vae`` export (``families.wan.vae.load_export``)."""
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  return wan_vae.load_export(path, "vae")


class Encoder:
  """Batches of videos -> normalised latents, jitted, the batch split over local devices."""

  def __init__(self, vae):
    self.vae = vae
    graphdef, state = nnx.split(vae)
    devices = jax.local_devices()
    self.mesh = Mesh(np.asarray(devices), ("batch",))
    self.n = len(devices)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
    self.state = jax.device_put(state, replicated)
    self._fn = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v),
                       in_shardings=(replicated, self.batch_sharding),
                       out_shardings=self.batch_sharding)

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    """(N, T, H, W, 3) in [-1, 1] -> (N, T_lat, h, w, 48) float32 (N padded internally)."""
    n = videos.shape[0]
    pad = (-n) % self.n
    if pad:
      videos = np.concatenate([videos, np.repeat(videos[-1:], pad, 0)], 0)
    out = self._fn(self.state, jax.device_put(videos, self.batch_sharding))
    return np.asarray(out)[:n]


def _window_starts(num_frames: int, length: int, count: int) -> list[int]:
  return [i * length for i in range(count) if (i + 1) * length <= num_frames]


def _prepare(record, where: str, resolution) -> dict[str, np.ndarray]:
  clip = clip_lib.validate_clip(record, where)
  ex = {k: clip[k] for k in ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks",
                             "depth_valid")}
  if not bool(record.get("has_depth", True)):  # placeholder depth everywhere: nothing to lift
    ex["depth_valid"] = np.zeros_like(ex["depth_valid"])
  h, w = clip["depths"].shape[1:]
  res = tuple(resolution) if resolution else (h, w)
  if res[0] % 16 or res[1] % 16:
    raise InputError("--resolution", "resolution", f"{res} must be multiples of 16 (the Wan "
                     "VAE's 16x downsampling)")
  if res != (h, w):
    ex = pipeline.resize_and_crop(ex, res, None)
  ex["frames"] = np.clip(np.asarray(ex["frames"], np.float32) / 127.5 - 1.0, -1.0, 1.0)
  ex["clip_id"] = str(record.get("clip_id", b"") if not isinstance(record.get("clip_id"), bytes)
                      else record["clip_id"].decode())
  return ex


def encode_clip(record, index: int, where: str, encoder: Encoder, *, resolution,
                target_frames: int, preceding_frames: int, num_references: int,
                windows_per_clip: int, texts: dict, text_shape: tuple[int, int],
                empty: np.ndarray | None = None, ref_voxel_size: float = REF_VOXEL_SIZE,
                ref_iou_threshold: float = REF_IOU_THRESHOLD,
                ref_stride: int = REF_STRIDE) -> list[bytes]:
  """The encoded records (``latent_clips.encode_record``) of one source clip's windows.

  ``texts``: clip_id -> (Lt <= text_len, D) caption embedding; ``empty`` (text_len, D): the
  empty prompt's, the text of clips without one (None: zeros)."""
  ref = dict(voxel_size=ref_voxel_size, iou_threshold=ref_iou_threshold, stride=ref_stride)
  from mirage_jax.memory import mirage  # pylint: disable=g-import-not-at-top
  length = preceding_frames + target_frames
  pre_used = 1 + 4 * ((preceding_frames - 1) // 4)  # what the causal encoder consumes
  ex = _prepare(record, where, resolution)
  t_all = ex["frames"].shape[0]
  starts = _window_starts(t_all, length, windows_per_clip)
  if not starts:
    raise InputError(where, "frames", f"clip has {t_all} frames; a window needs {length}")
  out = []
  for s in starts:
    pre = np.arange(s, s + preceding_frames)
    tgt = np.arange(s + preceding_frames, s + length)
    # Latent k of a chunk pairs with its video frame 4 k (the reference's pairing).
    tgt_ids = tgt[mirage.latent_frame_indices(target_frames)]
    pre_ids = pre[mirage.latent_frame_indices(pre_used)]
    ids = np.concatenate([tgt_ids, pre_ids])
    videos_t = ex["frames"][tgt][None]
    videos_p = ex["frames"][pre[:pre_used]][None]
    tgt_lat = encoder(videos_t)[0]
    pre_lat = encoder(videos_p)[0]
    hh, ww = tgt_lat.shape[1:3]
    if num_references:
      cands = reference_candidates(t_all, range(s, s + length))[::ref["stride"]]
      keep = clip_lib.liftable(ex["dynamic_masks"], ex["depth_valid"])
      pick = lambda cs, threshold: select_references(
          ex["depths"], ex["intrinsics"], ex["poses_c2w"], cs, list(tgt), keep=keep, stride=1,
          voxel_size=ref["voxel_size"], iou_threshold=threshold, max_refs=num_references)[0]
      refs = pick(cands, ref["iou_threshold"])
      if len(refs) < num_references:  # fixed R slots: fill with the best below the threshold
        refs += pick([c for c in cands if c not in refs], 0.0)[:num_references - len(refs)]
      while len(refs) < num_references:  # fewer candidates than slots: repeat the best
        refs.append(refs[-1] if refs else int(tgt_ids[0]))
      ref_lat = encoder(ex["frames"][np.asarray(refs)][:, None])[:, 0]
    else:
      refs = []
      ref_lat = np.zeros((0, hh, ww, tgt_lat.shape[-1]), np.float32)
    static = latent_static_mask(ex["dynamic_masks"][ids], ex["depth_valid"][ids], hh, ww)
    text = texts.get(ex["clip_id"])
    if text is not None:
      text = np.asarray(text)
      if text.ndim != 2 or text.shape[1] != text_shape[1] or not 1 <= len(text) <= text_shape[0]:
        raise InputError(ex["clip_id"], "text_embeddings", f"shape {text.shape}, expected "
                         f"(Lt <= {text_shape[0]}, {text_shape[1]})")
      text = pad_text(text, text_shape[0])
    refs = np.asarray(refs, np.int64)
    record = {
        "target_latents": tgt_lat.astype(_BF16),
        "preceding_latents": pre_lat.astype(_BF16),
        "reference_latents": ref_lat.astype(_BF16),
        "depths": resize_depth(ex["depths"][ids].astype(np.float32), hh, ww),
        "static_masks": static.astype(np.uint8),
        "intrinsics": ex["intrinsics"][ids].astype(np.float32),
        "poses_c2w": ex["poses_c2w"][ids].astype(np.float32),
        "ref_intrinsics": ex["intrinsics"][refs].astype(np.float32).reshape(-1, 3, 3),
        "ref_poses_c2w": ex["poses_c2w"][refs].astype(np.float32).reshape(-1, 4, 4),
        # No caption: the empty prompt's embedding (zeros only when none is known).
        "text": (text if text is not None else empty if empty is not None
                 else np.zeros(text_shape, np.float32)).astype(_BF16),
        "has_text": np.bool_(text is not None),
        "clip_index": np.int32(index),
    }
    out.append(latent_clips.encode_record(record))
  return out


def _encode_fn(source_dir: tuple[str, str, str], split: str, vae: str, num_shards: int,
               text_embeddings: str, settings: dict):
  """A Beam DoFn: clip index -> (shard, (index, its records)); one VAE load per worker."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top

  class EncodeClips(beam.DoFn):
    """Holds only paths and settings: workers load the model and open the source."""

    def setup(self):
      from data_pipelines import builders  # pylint: disable=g-import-not-at-top
      self.encoder = Encoder(load_vae(vae)[0])
      self.source = builders.load(*source_dir).as_data_source(split)
      self.texts = _open_texts(text_embeddings)

    def process(self, index):
      records = encode_clip(self.source[index], index, f"{split} record {index}", self.encoder,
                            texts=self.texts, **settings)
      yield index % num_shards, (index, records)

  return EncodeClips()


def _write_shard(shard_and_clips, *, output_dir: str, split: str, num_shards: int) -> int:
  """Writes one shard's records in clip order (tmp name, then rename); returns their count."""
  from array_record.python import array_record_module as arm  # pylint: disable=g-import-not-at-top
  shard, clips = shard_and_clips
  path = latent_clips.shard_path(output_dir, split, shard, num_shards)
  writer = arm.ArrayRecordWriter(path + ".tmp", "group_size:1")
  count = 0
  for _, records in sorted(clips, key=lambda c: c[0]):
    for record in records:
      writer.write(record)
      count += 1
  writer.close()
  os.replace(path + ".tmp", path)
  return count


def pad_text(emb: np.ndarray, length: int) -> np.ndarray:
  """(Lt <= length, D) -> (length, D) float32, zeros past Lt (the reference's padding: the
  Wan world model's ``load_or_pad``)."""
  from mirage_jax.families.wan import world_model  # pylint: disable=g-import-not-at-top
  return world_model.load_or_pad(emb, emb.shape[1], length)


def source_captions(data_dir: str, dataset: str, config_name: str,
                    splits) -> dict[str, str]:
  """clip_id -> caption of every clip of ``splits`` of the source dataset (those with one)."""
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  builder = builders.load(data_dir, dataset, config_name)
  if "caption" not in builder.info.features:
    return {}  # built before captions: none to encode
  out = {}
  for split in splits:
    source = builder.as_data_source(split)
    for i in range(len(source)):
      clip = builders.record_to_clip(source[i])
      if clip["caption"]:
        out[clip["clip_id"]] = clip["caption"]
  return out


def write_caption_embeddings(path: str, captions: dict[str, str], encoder,
                             batch_size: int) -> int:
  """Encodes the distinct captions (``encoder.encode_batch``) and writes ``path``: an .npz of
  clip_id -> (Lt_i, D) float32, one array at a time (tmp name, then rename). Returns the
  number of distinct captions."""
  import zipfile  # pylint: disable=g-import-not-at-top
  distinct = sorted(set(captions.values()))
  by_caption = {}
  for i in range(0, len(distinct), 64 * batch_size):  # bounded host memory at scale
    group = distinct[i:i + 64 * batch_size]
    by_caption.update(zip(group, encoder.encode_batch(group, batch_size=batch_size)))
  with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    for clip_id in sorted(captions):
      with z.open(clip_id + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, by_caption[captions[clip_id]], allow_pickle=False)
  os.replace(path + ".tmp", path)
  return len(distinct)


def _open_texts(path: str):
  """The lazy ``clip_id -> (Lt, D)`` mapping of a ``--text_embeddings`` .npz ({} without)."""
  if not path:
    return {}
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(path, "text_embeddings", f"unreadable .npz ({e})") from e


def run(*, data_dir: str, dataset: str, config_name: str, vae: str, output_dir: str,
        resolution=None, target_frames: int = 33, preceding_frames: int = 8,
        num_references: int = 0, windows_per_clip: int = 1,
        ref_voxel_size: float = REF_VOXEL_SIZE, ref_iou_threshold: float = REF_IOU_THRESHOLD,
        ref_stride: int = REF_STRIDE, splits=("train", "validation"), text_embeddings: str = "",
        empty_text: str = "", text_encoder: str = "", tokenizer: str = "", text_batch: int = 8,
        text_len: int = 512, text_dim: int = 4096, num_shards: int = 1,
        beam_runner: str = "", beam_options=()) -> dict[str, int]:
  """Encodes the dataset on Beam (see the module docstring).

  Returns: {split: records written}.
  """
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  if not output_dir:
    raise InputError("--output_dir", "output_dir", "is required")
  if target_frames < 5 or (target_frames - 1) % 4:
    raise InputError("--target_frames", "target_frames", f"must be 1 + 4 k with k >= 1, got "
                     f"{target_frames}")
  if ref_voxel_size <= 0 or ref_stride < 1 or not 0.0 <= ref_iou_threshold <= 1.0:
    raise InputError("--ref_voxel_size", "ref_voxel_size", "need ref_voxel_size > 0, ref_stride "
                     ">= 1 and ref_iou_threshold in [0, 1]")
  if preceding_frames < 1 or num_references < 0 or windows_per_clip < 1:
    raise InputError("--preceding_frames", "preceding_frames", "need preceding_frames >= 1, "
                     "num_references >= 0, windows_per_clip >= 1")
  if num_shards < 1:
    raise InputError("--num_shards", "num_shards", f"must be >= 1, got {num_shards}")
  if os.path.exists(os.path.join(output_dir, latent_clips.METADATA)):
    raise InputError(output_dir, "output_dir", "already holds complete latent clips; choose "
                     "another --output_dir (nothing was changed)")
  from mirage_jax.text import prompts  # pylint: disable=g-import-not-at-top
  encoder = None
  if prompts.check_pair(text_encoder, tokenizer):
    for flag, value in (("--text_embeddings", text_embeddings), ("--empty_text", empty_text)):
      if value:
        raise InputError(flag, flag[2:], "give --text_encoder/--tokenizer (captions encoded "
                         f"here) or {flag} (embeddings made elsewhere), not both")
    if text_batch < 1 or text_len < 1:
      raise InputError("--text_batch", "text_batch", f"need text_batch >= 1 and text_len >= 1, "
                       f"got {text_batch}, {text_len}")
    # An encoder of another width than --text_dim (the DiT's text input), a tokenizer of
    # another vocabulary, an unreadable export: refused before anything is written.
    prompts.check_width(text_encoder, text_dim)
    encoder = prompts.PromptEncoder(text_encoder, tokenizer, length=text_len)
    text_dim = encoder.dim
  options = builders.beam_options(beam_runner, beam_options)
  model, _ = load_vae(vae)  # Here too: a bad export is the user's one-line error.
  texts = _open_texts(text_embeddings)
  if texts:
    text_dim = texts[next(iter(texts.keys()))].shape[1]
  empty = None
  if empty_text:
    try:
      empty = np.load(empty_text, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise InputError(empty_text, "empty_text", f"unreadable .npy ({e})") from e
    if empty.ndim != 2 or empty.shape[1] != text_dim or not 1 <= len(empty) <= text_len:
      raise InputError(empty_text, "empty_text", f"shape {empty.shape}, expected "
                       f"(Lt <= {text_len}, {text_dim})")
  builder = builders.load(data_dir, dataset, config_name)
  sizes = {s: builder.info.splits[s].num_examples for s in splits}
  try:
    os.makedirs(output_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(output_dir, "*.array_record*")):
      os.remove(stale)  # Of an incomplete earlier run (no metadata.json): replaced below.
  except OSError as e:
    raise InputError(output_dir, "output_dir", f"cannot write there ({e})") from e
  captions = {}
  if encoder is not None:  # the captions, on this process's devices (module docstring)
    t0 = time.perf_counter()
    empty = encoder.empty()  # umT5 of "": the text of uncaptioned clips, never zeros
    captions = source_captions(data_dir, dataset, config_name, splits)
    text_embeddings = os.path.join(output_dir, CAPTION_EMBEDDINGS)
    distinct = write_caption_embeddings(text_embeddings, captions, encoder, text_batch)
    logging.info("umT5: %d captions (%d distinct) of %d-token prompts in %.1f s",
                 len(captions), distinct, text_len, time.perf_counter() - t0)
  if empty is not None:
    empty = pad_text(np.asarray(empty, np.float32), text_len)
  settings = dict(resolution=resolution, target_frames=target_frames,
                  preceding_frames=preceding_frames, num_references=num_references,
                  windows_per_clip=windows_per_clip, text_shape=(text_len, text_dim),
                  empty=empty, ref_voxel_size=ref_voxel_size,
                  ref_iou_threshold=ref_iou_threshold, ref_stride=ref_stride)
  # Workers open the source themselves (a local folder must be one they all see).
  source_dir = (data_dir if "://" in data_dir else os.path.abspath(data_dir), dataset, config_name)
  t0 = time.perf_counter()
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  with beam.Pipeline(options=options) as p:
    for split in splits:
      fn = _encode_fn(source_dir, split, vae, num_shards, text_embeddings, settings)
      _ = (p | f"{split}/clips" >> beam.Create(list(range(sizes[split])))
           | f"{split}/spread" >> beam.Reshuffle()
           | f"{split}/encode" >> beam.ParDo(fn)
           | f"{split}/shards" >> beam.GroupByKey()
           | f"{split}/write" >> beam.Map(_write_shard, output_dir=output_dir, split=split,
                                          num_shards=num_shards))
  from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
  counts, first = {}, None
  for split in splits:
    paths = sorted(glob.glob(os.path.join(output_dir, f"{split}-*.array_record")))
    src = ards.ArrayRecordDataSource(paths) if paths else []
    counts[split] = len(src)
    if first is None and len(src):
      first = latent_clips.decode_record(src[0])
  logging.info("latent clips %s in %.1f s", counts, time.perf_counter() - t0)
  if first is None:
    raise InputError(output_dir, "records", "nothing was encoded")
  pre_used = 1 + 4 * ((preceding_frames - 1) // 4)
  lat_t, lat_p = (target_frames - 1) // 4 + 1, (pre_used - 1) // 4 + 1
  hh, ww = first["target_latents"].shape[1:3]
  control = np.asarray(_control(model, lat_t + lat_p, hh, ww))
  np.save(os.path.join(output_dir, latent_clips.CONTROL), control)
  if empty is not None:
    np.save(os.path.join(output_dir, latent_clips.EMPTY_TEXT), empty.astype(np.float32))
  meta = dict(source=dict(data_dir=str(data_dir), dataset=dataset, config_name=config_name),
              vae=os.path.abspath(vae), resolution=[hh * 16, ww * 16], latent_hw=[hh, ww],
              target_frames=target_frames, preceding_frames=preceding_frames,
              target_latent_frames=lat_t, preceding_latent_frames=lat_p,
              num_references=num_references, text_len=text_len, text_dim=text_dim,
              text_encoder=os.path.abspath(text_encoder) if text_encoder else "",
              tokenizer=os.path.abspath(tokenizer) if tokenizer else "",
              captioned_clips=len(captions) if encoder is not None else None,
              references=dict(voxel_size=ref_voxel_size, iou_threshold=ref_iou_threshold,
                              stride=ref_stride, min_gap=REF_MIN_GAP),
              intrinsics="pixels of the encoded images", num_shards=num_shards,
              frame_pairing="latent k of a chunk starting at video frame s uses frame s + 4k")
  tmp = os.path.join(output_dir, latent_clips.METADATA + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(output_dir, latent_clips.METADATA))
  return counts


def _control(vae, frames: int, h: int, w: int):
  from mirage_jax.families.wan import conditioning as wan_mirage  # pylint: disable=g-import-not-at-top
  return wan_mirage.control_latents(vae, frames, h, w)


def main() -> int:
  f = flags.FLAGS
  for name in ("data_dir", "vae", "output_dir"):
    if not f[name].value:
      raise InputError(f"--{name}", name, "is required")
  # Written with local renames and globs; training reads a gs:// copy of the output.
  for name in ("data_dir", "vae", "output_dir", "text_embeddings", "empty_text", "text_encoder",
               "tokenizer"):
    paths.require_local(f[name].value, f"--{name}", "encode on a local disk, then copy the "
                        "output folder up")
  res = [int(x) for x in f.resolution] if f.resolution else None
  counts = run(data_dir=f.data_dir, dataset=f.dataset, config_name=f.config_name, vae=f.vae,
               output_dir=f.output_dir, resolution=res, target_frames=f.target_frames,
               preceding_frames=f.preceding_frames, num_references=f.num_references,
               windows_per_clip=f.windows_per_clip, ref_voxel_size=f.ref_voxel_size,
               ref_iou_threshold=f.ref_iou_threshold, ref_stride=f.ref_stride,
               splits=tuple(f.splits),
               text_embeddings=f.text_embeddings, empty_text=f.empty_text,
               text_encoder=f.text_encoder, tokenizer=f.tokenizer, text_batch=f.text_batch,
               text_len=f.text_len, text_dim=f.text_dim, num_shards=f.num_shards,
               beam_runner=f.beam_runner, beam_options=f.beam_options)
  print(f"wrote {counts} latent clips to {f.output_dir}")
  return 0


if __name__ == "__main__":
  define_flags()
  run_app(main)
