"""Grain input pipeline: posed clips -> windows of frames -> resized, batched training examples.

Data flow (one Grain ``MapDataset`` chain, random access until the very end):

  record indices -> shuffle (per epoch) -> repeat: the *global* stream, position -> record
    -> this shard's rows of each global batch, from batch ``start_step`` on
    -> per-example transform (window, resize + crop, normalise) -> batch
    -> ``IterDataset`` (reader threads) -> optional worker processes (``mp_prefetch``)

Global batch ``s`` holds the examples at global positions ``[s * batch_size, (s + 1) *
batch_size)`` of one stream over all records, the same for every process count; shard ``k``
of ``n`` takes rows ``[k * B / n, (k + 1) * B / n)`` of it (``global_rows``). Every random
choice of an example (window start, crop offset) comes from a generator seeded with
``(seed, global position)``, so no two rows of a batch share their draws, whichever process
prepares them. The batches are thus a pure function of the arguments and of the step: a
resumed run starts at ``start_step`` (the checkpoint's step) with any process or device count
and needs no saved iterator state. ``iterator.get_state()`` / ``set_state()`` still work
within one run (worker processes included).

One example (a batch adds a leading ``B`` axis):

  frames         (T, H, W, 3) float32  RGB in [-1, 1]; with ``frames_dtype='uint8'`` uint8
                                       in [0, 255] (a quarter of the bytes to the device;
                                       ``frames_to_float`` maps it to [-1, 1] there).
  depths         (T, H, W)    float32  metric z-depth, > 0.
  intrinsics     (T, 3, 3)    float32  pixels, matching the resized and cropped images.
  poses_c2w      (T, 4, 4)    float32  OpenCV camera-to-world.
  dynamic_masks  (T, H, W)    uint8    object ids, 0 = static.
  depth_valid    (T, H, W)    uint8    1 = observed depth, 0 = a hole (its depth is the clip
                                       format's placeholder: never lift it to 3D).
  is_revisit     ()           bool     the window holds a revisit pair (see below).
  clip_index     ()           int32    index of the source record the window came from.

A *revisit pair* is two frames ``a < b`` of the window, at least ``min_revisit_gap`` window
frames apart, whose camera centres are within ``revisit_distance`` metres and whose viewing
directions are within ``revisit_angle_deg``, and such that some frame between them is *not*
that close to ``a`` (the camera went away and came back; a camera standing still does not
count).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import clip as clip_lib
from mirage_jax import geometry
from mirage_jax.errors import InputError

CROP_MODES = ("center", "random", "random_native")
FRAMES_DTYPES = ("float32", "uint8")


def frames_to_float(frames):
  """RGB in [0, 255] (uint8 or float; NumPy or JAX) -> float32 in [-1, 1].

  The one conversion of the pipeline's float frames and of uint8 frames on the device, so
  both give the same numbers.
  """
  return frames.astype(np.float32) / 127.5 - 1.0


def default_config() -> ml_collections.ConfigDict:
  """Every field ``from_config`` reads, with its default.

  Fields:
    num_frames: frames per window (T).
    stride: source frames between consecutive window frames.
    resolution: output (height, width); images are resized to cover it, then cropped.
    batch_size: *global* batch size over all shards; each shard yields
      ``batch_size // shard_count`` examples per batch.
    seed: seed in [0, 2**32) for shuffling, window starts and crops.
    shuffle: shuffle record order (differently each epoch).
    num_epochs: passes over the data, or None to repeat forever.
    require_revisit: pick windows holding a revisit pair when the clip has one.
    revisit_distance: metres between camera centres of a revisit pair, at most.
    revisit_angle_deg: degrees between viewing directions of a revisit pair, at most.
    min_revisit_gap: window frames between the two frames of a revisit pair, at least (>= 2).
    crop: "center", "random", or "random_native" (random crops of windows not resized down
      first: see :func:`resize_and_crop`).
    shard_index, shard_count: this process's rows of each global batch (shard k of n: rows
      [k * B / n, (k + 1) * B / n)); None = jax.process_index() / count(). Processes
      whose devices hold the same rows (a model axis across hosts) share a shard_index.
    worker_count: worker processes preparing batches; 0 = in this process.
    worker_buffer_size: batches each worker process prepares ahead.
    read_threads: threads preparing examples inside each process.
    read_buffer_size: batches buffered ahead inside each process.
    frames_dtype: "float32" (RGB in [-1, 1]) or "uint8" (the resized RGB rounded to
      [0, 255]; the consumer converts with ``frames_to_float``, e.g. inside a jitted step).
  """
  return ml_collections.ConfigDict(dict(
      num_frames=8, stride=1, resolution=(32, 32), batch_size=8, seed=0, shuffle=True,
      num_epochs=ml_collections.config_dict.placeholder(int), require_revisit=False,
      revisit_distance=0.5, revisit_angle_deg=30.0, min_revisit_gap=4, crop="center",
      shard_index=ml_collections.config_dict.placeholder(int),
      shard_count=ml_collections.config_dict.placeholder(int),
      worker_count=0, worker_buffer_size=2, read_threads=2, read_buffer_size=4,
      frames_dtype="float32"))


# ----------------------------------------------------------------------------- windows


def _revisit_scores(poses: np.ndarray, starts: np.ndarray, num_frames: int, stride: int,
                    revisit_distance: float, revisit_angle_deg: float,
                    min_revisit_gap: int) -> np.ndarray:
  """Revisit score of each candidate window: <= 1 means it holds a revisit pair.

  The score of a pair is ``max(distance / revisit_distance, angle / revisit_angle_deg)``;
  a window's score is the lowest over its pairs that are far enough apart in time and have
  a frame in between scoring > 1 against the first (inf when there is no such pair).

  Args:
    poses: (N, 4, 4) c2w of the whole clip.
    starts: (S,) first source frame of each candidate window.
  Returns:
    (S,) float64 scores.
  """
  centres = poses[:, :3, 3].astype(np.float64)
  forward = poses[:, :3, 2].astype(np.float64)
  idx = starts[:, None] + stride * np.arange(num_frames)  # (S, T)
  c, f = centres[idx], forward[idx]  # (S, T, 3)
  dist = np.linalg.norm(c[:, :, None] - c[:, None, :], axis=-1)  # (S, T, T)
  cos = np.clip(np.einsum("sai,sbi->sab", f, f), -1.0, 1.0)
  angle = np.degrees(np.arccos(cos))
  score = np.maximum(dist / revisit_distance, angle / revisit_angle_deg)
  # far[s, a, k]: how many window frames <= k are not close to frame a; a pair (a, b) has the
  # camera leaving in between when that count grows from a to b - 1.
  far = np.cumsum(score > 1.0, axis=-1)
  a, b = np.triu_indices(num_frames, k=min_revisit_gap)  # pairs with b - a >= gap
  went_away = (far[:, a, b - 1] - far[:, a, a]) > 0  # (S, P)
  pair_score = np.where(went_away, score[:, a, b], np.inf)
  return pair_score.min(axis=-1, initial=np.inf)


def choose_window(poses: np.ndarray, rng: np.random.Generator, *, num_frames: int,
                  stride: int, require_revisit: bool, revisit_distance: float,
                  revisit_angle_deg: float, min_revisit_gap: int) -> tuple[np.ndarray, bool]:
  """Source frame indices of one window and whether it holds a revisit pair.

  Without ``require_revisit`` the start is uniform. With it, the start is uniform over the
  windows holding a revisit pair; if none does, over the windows with the lowest revisit
  score (the closest to one), which is reported as not a revisit.

  Args:
    poses: (N, 4, 4) c2w of the whole clip; N >= (num_frames - 1) * stride + 1.
  Returns:
    (num_frames,) int64 source frame indices, and the revisit flag.
  """
  num_starts = len(poses) - (num_frames - 1) * stride
  kwargs = dict(num_frames=num_frames, stride=stride, revisit_distance=revisit_distance,
                revisit_angle_deg=revisit_angle_deg, min_revisit_gap=min_revisit_gap)
  if require_revisit:
    scores = _revisit_scores(poses, np.arange(num_starts), **kwargs)
    good = np.flatnonzero(scores <= 1.0)
    if good.size == 0:
      good = np.flatnonzero(scores == scores.min())
    start = int(rng.choice(good))
    is_revisit = bool(scores[start] <= 1.0)
  else:
    start = int(rng.integers(num_starts))
    is_revisit = bool(_revisit_scores(poses, np.array([start]), **kwargs)[0] <= 1.0)
  return start + stride * np.arange(num_frames), is_revisit


# ----------------------------------------------------------------------------- resize & crop


@functools.lru_cache(maxsize=64)
def _area_or_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) resampling matrix: area average when shrinking, bilinear when growing.

  Both follow the pixel-centre convention of ``geometry`` (output pixel o spans
  ``[o, o + 1) * n_in / n_out`` in input pixels), so ``scale_intrinsics`` matches exactly.
  """
  w = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  if n_out <= n_in:
    edges = np.arange(n_out + 1) * scale
    for o in range(n_out):
      lo, hi = edges[o], edges[o + 1]
      i = np.arange(int(np.floor(lo)), min(int(np.ceil(hi)), n_in))
      w[o, i] = np.minimum(i + 1, hi) - np.maximum(i, lo)
  else:
    x = (np.arange(n_out) + 0.5) * scale - 0.5
    i0 = np.floor(x).astype(int)
    frac = x - i0
    np.add.at(w, (np.arange(n_out), np.clip(i0, 0, n_in - 1)), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), np.clip(i0 + 1, 0, n_in - 1)), frac)
  w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
  w.flags.writeable = False  # cached and shared between calls
  return w


@functools.lru_cache(maxsize=64)
def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """(n_out,) input pixel whose area holds each output pixel's centre."""
  idx = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)
  idx.flags.writeable = False  # cached and shared between calls
  return idx


@jax.jit
def _adjust_intrinsics(K, sx, sy, top, left):
  """Intrinsics (T, 3, 3) after a resize by (sx, sy) then a crop (jitted: eager dispatch of
  the few small ops costs more than the whole image resize)."""
  return geometry.crop_intrinsics(geometry.scale_intrinsics(K, sx, sy), top, left)


def resize_and_crop(example: dict[str, np.ndarray], resolution: tuple[int, int],
                    rng: np.random.Generator | None, native: bool = False
                    ) -> dict[str, np.ndarray]:
  """Resizes a window to cover ``resolution`` (aspect kept), then crops to it.

  ``native``: a window that already covers ``resolution`` is not shrunk, only cropped (crops
  at the source's own scale: a convolutional network trained on them sees the textures it
  will see on whole frames).

  RGB is area-averaged (bilinear when upsampling); depth and masks take the nearest pixel,
  so depth stays an observed value (> 0, no blended edges) and ids stay ids.

  Args:
    example: ``frames (T, H, W, 3)`` uint8, ``depths (T, H, W)``, ``dynamic_masks (T, H, W)``,
      ``intrinsics (T, 3, 3)``, optional ``depth_valid (T, H, W)`` (nearest, as the depth);
      other keys pass through.
    resolution: output (height, width).
    rng: picks the crop offset; None crops the centre.
  Returns:
    The example with ``frames (T, h, w, 3)`` float32 in [0, 255], ``depths (T, h, w)``,
    ``dynamic_masks (T, h, w)`` and intrinsics adjusted to match.
  """
  t, h, w = example["depths"].shape
  out_h, out_w = resolution
  scale = max(out_h / h, out_w / w)
  if native:
    scale = max(scale, 1.0)
  new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
  if rng is None:
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
  else:
    top, left = int(rng.integers(new_h - out_h + 1)), int(rng.integers(new_w - out_w + 1))
  # Resize and crop in one product: keep only the rows of the resampling matrices we crop.
  wy = _area_or_bilinear_weights(h, new_h)[top:top + out_h]
  wx = _area_or_bilinear_weights(w, new_w)[left:left + out_w]
  frames = example["frames"].astype(np.float32)
  frames = np.matmul(wy, frames.reshape(t, h, w * 3)).reshape(t, out_h, w, 3)
  frames = np.matmul(frames.transpose(0, 1, 3, 2), wx.T).transpose(0, 1, 3, 2)
  rows = _nearest_indices(h, new_h)[top:top + out_h]
  cols = _nearest_indices(w, new_w)[left:left + out_w]
  K = _adjust_intrinsics(example["intrinsics"], new_w / w, new_h / h, top, left)
  return dict(example,
              frames=frames,
              depths=example["depths"][:, rows][:, :, cols],
              dynamic_masks=example["dynamic_masks"][:, rows][:, :, cols],
              **({"depth_valid": example["depth_valid"][:, rows][:, :, cols]}
                 if "depth_valid" in example else {}),
              intrinsics=np.asarray(K, np.float32))


# ----------------------------------------------------------------------------- example


class _MakeExample:
  """Picklable per-example transform (worker processes receive a copy)."""

  def __init__(self, source: Sequence[Any], *, seed: int, num_frames: int, stride: int,
               resolution: tuple[int, int], crop: str, require_revisit: bool,
               revisit_distance: float, revisit_angle_deg: float, min_revisit_gap: int,
               uint8_frames: bool = False):
    self.source = source
    self.seed = seed
    self.uint8_frames = uint8_frames
    self.resolution = resolution
    self.random_crop = crop in ("random", "random_native")
    self.native_crop = crop == "random_native"
    self.window_kwargs = dict(
        num_frames=num_frames, stride=stride, require_revisit=require_revisit,
        revisit_distance=revisit_distance, revisit_angle_deg=revisit_angle_deg,
        min_revisit_gap=min_revisit_gap)

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    """Example of ``(global position, source record index)`` (see :func:`global_rows`)."""
    position, record_index = item
    where = f"clip source record {record_index}"
    try:
      record = self.source[record_index]
    except Exception as e:  # pylint: disable=broad-except  # each source fails its own way
      raise InputError(where, "record", f"unreadable, truncated or corrupt dataset file "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    clip = clip_lib.validate_clip(record, where)
    num_frames, stride = self.window_kwargs["num_frames"], self.window_kwargs["stride"]
    needed = (num_frames - 1) * stride + 1
    if len(clip["frames"]) < needed:
      raise InputError(where, "frames", f"clip has {len(clip['frames'])} frames; a window of "
                       f"num_frames={num_frames} at stride={stride} needs {needed}")
    rng = np.random.default_rng([self.seed, position])
    idx, is_revisit = choose_window(clip["poses_c2w"], rng, **self.window_kwargs)
    example = {k: clip[k][idx] for k in ("frames", "depths", "intrinsics", "poses_c2w",
                                         "dynamic_masks", "depth_valid")}
    example = resize_and_crop(example, self.resolution, rng if self.random_crop else None,
                              native=self.native_crop)
    if self.uint8_frames:
      example["frames"] = np.clip(np.rint(example["frames"]), 0, 255).astype(np.uint8)
    else:
      example["frames"] = np.clip(frames_to_float(example["frames"]), -1.0, 1.0)
    example["is_revisit"] = np.bool_(is_revisit)
    example["clip_index"] = np.int32(record_index)
    return example


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Keeps JAX in worker processes on the CPU (the accelerator belongs to the trainer)."""
  del worker_index, worker_count
  jax.config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- rows


class _Rows:
  """Local index -> (global position, record index) of one shard's rows (picklable)."""

  def __init__(self, order: grain.MapDataset, batch_size: int, first_row: int, rows: int):
    self.order, self.batch_size, self.first_row, self.rows = order, batch_size, first_row, rows

  def __call__(self, j: int) -> tuple[int, int]:
    position = (j // self.rows) * self.batch_size + self.first_row + j % self.rows
    return position, int(self.order[position])


def global_rows(num_records: int, *, batch_size: int, seed: int, shuffle: bool,
                num_epochs: int | None, shard_index: int, shard_count: int,
                start_step: int = 0) -> grain.MapDataset:
  """This shard's rows of global batches ``start_step, start_step + 1, ...``.

  The global stream visits the ``num_records`` records once per epoch (shuffled per epoch
  when ``shuffle``); global batch ``s`` is its positions ``[s * batch_size, (s + 1) *
  batch_size)`` (a last partial batch is dropped), and shard ``k`` of ``n`` takes rows
  ``[k * batch_size / n, (k + 1) * batch_size / n)`` of each. Nothing depends on the
  process count but the rows taken, so a run resized between checkpoints continues the same
  stream.

  Returns:
    MapDataset of ``(global position, record index)`` int pairs, ``batch_size //
    shard_count`` per batch, in batch-major order.
  """
  order = grain.MapDataset.range(num_records)
  if shuffle:
    order = order.shuffle(seed=seed)
  order = order.repeat(num_epochs)
  rows = batch_size // shard_count
  num_batches = len(order) // batch_size  # sys.maxsize // batch_size when repeating forever
  first = min(start_step, num_batches) * rows
  return grain.MapDataset.range(first, num_batches * rows).map(
      _Rows(order, batch_size, shard_index * rows, rows))


# ----------------------------------------------------------------------------- public API


def make_dataset(source: Sequence[Any], *, num_frames: int, stride: int,
                 resolution: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, require_revisit: bool = False,
                 revisit_distance: float = 0.5, revisit_angle_deg: float = 30.0,
                 min_revisit_gap: int = 4, crop: str = "center",
                 shard_index: int | None = None, shard_count: int | None = None,
                 worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 2,
                 read_buffer_size: int = 4, start_step: int = 0, frames_dtype: str = "float32",
                 where: str = "make_dataset") -> grain.IterDataset:
  """Grain dataset of batches of clip windows (fields documented in ``default_config``).

  Args:
    source: random-access clip records (``len`` and ``[i]`` giving dicts in the
      ``data_pipelines.clip`` format), e.g. ``tfds.builder(...).as_data_source(split)``.
      Must be picklable when ``worker_count > 0``.
    start_step: the first global batch to yield (a resumed run's step).
    where: names the caller in error messages (a config path, say).
  Returns:
    IterDataset of batch dicts, each field with a leading ``batch_size // shard_count`` axis:
    this shard's rows of global batches ``start_step, start_step + 1, ...`` (see the module
    docstring and :func:`global_rows`).
  """
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  _check(where, num_frames=num_frames, stride=stride, resolution=resolution,
         batch_size=batch_size, seed=seed, num_epochs=num_epochs,
         require_revisit=require_revisit, revisit_distance=revisit_distance,
         revisit_angle_deg=revisit_angle_deg, min_revisit_gap=min_revisit_gap, crop=crop,
         shard_index=shard_index, shard_count=shard_count, worker_count=worker_count,
         worker_buffer_size=worker_buffer_size, read_threads=read_threads,
         read_buffer_size=read_buffer_size, start_step=start_step, frames_dtype=frames_dtype)
  if len(source) == 0:
    raise InputError(where, "source", "no records")
  make_example = _MakeExample(
      source, seed=seed, num_frames=num_frames, stride=stride,
      resolution=(int(resolution[0]), int(resolution[1])), crop=crop,
      uint8_frames=frames_dtype == "uint8",
      require_revisit=require_revisit, revisit_distance=revisit_distance,
      revisit_angle_deg=revisit_angle_deg, min_revisit_gap=min_revisit_gap)
  ds = global_rows(len(source), batch_size=batch_size, seed=seed, shuffle=shuffle,
                   num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
                   start_step=start_step)
  ds = ds.map(make_example)
  ds = ds.batch(batch_size // shard_count, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    # Grain 0.2.18 reads an absl flag when starting workers and fails outside an absl app
    # (tests, notebooks) unless flags count as parsed; inside an app this is a no-op.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size),
                        worker_init_fn=_worker_init)
  return ds


def make_iterator(source: Sequence[Any], **kwargs) -> grain.DatasetIterator:
  """``iter(make_dataset(source, **kwargs))``: a checkpointable iterator (get/set_state)."""
  return iter(make_dataset(source, **kwargs))


def from_config(source: Sequence[Any], config: ml_collections.ConfigDict,
                where: str = "config.data", start_step: int = 0) -> grain.IterDataset:
  """``make_dataset`` with every field of ``default_config`` read from ``config``, from
  global batch ``start_step`` on.

  Fields of ``config`` outside ``default_config`` are ignored (a data config may also name the
  dataset and split); missing fields raise InputError.
  """
  kwargs = {}
  for field in default_config():
    if field not in config:
      raise InputError(where, field, "missing (see data_pipelines.pipeline.default_config)")
    kwargs[field] = config[field]
  return make_dataset(source, where=where, start_step=start_step, **kwargs)


def _check(where: str, **a) -> None:
  """Raises InputError for the first bad argument of ``make_dataset``."""
  def positive_int(name):
    if not isinstance(a[name], (int, np.integer)) or isinstance(a[name], bool) or a[name] < 1:
      raise InputError(where, name, f"expected an integer >= 1, got {a[name]!r}")
  for name in ("num_frames", "stride", "batch_size", "shard_count"):
    positive_int(name)
  res = a["resolution"]
  if (not isinstance(res, (tuple, list)) or len(res) != 2
      or not all(isinstance(r, (int, np.integer)) and r >= 1 for r in res)):
    raise InputError(where, "resolution", f"expected (height, width) positive ints, got {res!r}")
  if not isinstance(a["seed"], (int, np.integer)) or not 0 <= a["seed"] < 2**32:
    raise InputError(where, "seed", f"expected an integer in [0, 2**32), got {a['seed']!r}")
  if a["num_epochs"] is not None:
    positive_int("num_epochs")
  if not isinstance(a["start_step"], (int, np.integer)) or a["start_step"] < 0:
    raise InputError(where, "start_step", f"expected an integer >= 0, got {a['start_step']!r}")
  if a["frames_dtype"] not in FRAMES_DTYPES:
    raise InputError(where, "frames_dtype", f"expected one of {FRAMES_DTYPES}, got "
                     f"{a['frames_dtype']!r}")
  if a["crop"] not in CROP_MODES:
    raise InputError(where, "crop", f"expected one of {CROP_MODES}, got {a['crop']!r}")
  if not 0 <= a["shard_index"] < a["shard_count"]:
    raise InputError(where, "shard_index", f"expected 0 <= shard_index < {a['shard_count']}, "
                     f"got {a['shard_index']!r}")
  if a["batch_size"] % a["shard_count"]:
    raise InputError(where, "batch_size", f"global batch {a['batch_size']} is not divisible by "
                     f"shard_count={a['shard_count']}")
  for name in ("revisit_distance", "revisit_angle_deg"):
    if not a[name] > 0:
      raise InputError(where, name, f"expected > 0, got {a[name]!r}")
  if not isinstance(a["min_revisit_gap"], (int, np.integer)) or a["min_revisit_gap"] < 2:
    raise InputError(where, "min_revisit_gap", "expected an integer >= 2 (a revisit needs a "
                     f"frame in between), got {a['min_revisit_gap']!r}")
  if a["require_revisit"] and a["min_revisit_gap"] > a["num_frames"] - 1:
    raise InputError(where, "min_revisit_gap", f"{a['min_revisit_gap']} cannot fit in a window "
                     f"of num_frames={a['num_frames']}")
  for name in ("worker_count", "read_threads"):
    if not isinstance(a[name], (int, np.integer)) or a[name] < 0:
      raise InputError(where, name, f"expected an integer >= 0, got {a[name]!r}")
  for name in ("worker_buffer_size", "read_buffer_size"):
    positive_int(name)
