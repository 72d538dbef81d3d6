"""Revisit-consistency benchmark: does a place look the same when the camera comes back?

Protocol, per trajectory (a loop: the last part returns to places seen early):

  1. Pair frames with the past: frame ``b`` is a *revisit* of frame ``a < b`` when their
     poses are close (camera centres within ``max_distance`` metres and viewing directions
     within ``max_angle_deg``, combined as in the input pipeline's revisit windows), they
     are at least ``min_gap`` frames apart, and some frame between them is *not* close to
     ``a`` (the camera went away and came back). Each revisit frame is paired with its
     nearest such ``a`` (:func:`pair_revisits`).
  2. Generate the whole trajectory from its first frame (+ depth) with every memory backend,
     and score every generated frame against ground truth (PSNR, SSIM per frame), revisit
     frames against ground truth and against the model's own first-visit generation (frame
     ``a``), the generated clip's reprojection consistency with its own depth
     (``metrics.geometric_consistency``), depth errors and memory coverage.
  3. Rows beside the backends:
       ``oracle``     the configured backend with memory written from ground truth (frames
                      encoded by the autoencoder, ground-truth depth) instead of the
                      generated frames: an upper bound on what memory can give;
       ``none``       no memory: the lower bound (one of the backends);
       ``composite``  no model: ground-truth RGB points of all earlier frames (lifted with
                      ground-truth depth) splatted into the camera where they cover, the
                      previous ground-truth frame elsewhere. It sees ground truth, so it is a
                      reference for "copy from memory" rather than a generator; the design
                      probe found a trained model below it.
     Ground truth against itself gives the floor of the first-visit and geometric scores
     (poses of a pair are close, not identical): ``reference`` in the results.
  4. Rows from other checkpoints (``extra_rows``): a baseline *trained* for its job (e.g.
     ``none (trained)``, a denoiser trained without memory; ``frame_bank (trained)``, one
     trained with the frame bank), run with the memory backend it was trained with, on the
     same trajectories, seed and protocol. The ``none`` backend row of the memory model is
     that model with its memory switched off, a weaker lower bound than a model trained
     without memory; :func:`claims` compares against ``none (trained)`` when it is present.
  5. First-visit frames (:func:`first_visit_frames`): frames of which ground truth seen at
     least ``min_gap`` frames earlier covers at most ``max_coverage`` (0.5): there a long-term
     memory has nothing to copy, and the recent context is all a model has. Every row is
     scored on the same frames (``psnr_unseen``, ``ssim_unseen`` and their per-frame curves),
     which shows what memory conditioning costs or gives on new content.

Memory Maze variant (Po et al. 2025 give 400 context frames at 64x64 and generate the
400-frame retrace): a ``retrace`` rollout of ``2 N`` frames whose first ``N`` frames are
*context*: they are written into memory from ground truth (every row) and the scores are
taken over the last ``N`` frames. Here ``N`` is small (e.g. 40) and the resolution is the
model's. Given frames are also the clean context of the chunks after them (encoded ground
truth, ``Rollout.generate_batch(given_frames=...)``); a chunk that straddles ``N`` still
generates its given frames. The protocol of Po et al. on the environment's exploration
trajectories (not retraces) is ``evaluation/memory_maze_protocol.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from data_pipelines import clip as clip_lib
from data_pipelines import pipeline
from mirage_jax import geometry, rollout
from mirage_jax import families
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError
from mirage_jax.evaluation import metrics, video
from mirage_jax.memory import rgb_points
from mirage_jax.memory import capacity_for

# Jitted once: eager metrics compile op by op, which costs seconds per new shape.
_psnr = jax.jit(metrics.psnr)
_ssim = jax.jit(metrics.ssim)
_geometric = jax.jit(metrics.geometric_consistency)
_depth_metrics = jax.jit(metrics.depth_metrics)
_rgb_write = jax.jit(rgb_points.write)
_rgb_render = jax.jit(rgb_points.render)

# Rows that are not memory backends.
ORACLE, COMPOSITE = "oracle", "composite"
# The ground-truth video beside the rows' videos (videos/<trajectory>/ground_truth.mp4).
GROUND_TRUTH = "ground_truth"
# Scalar scores of a row (means over the frames they name).
SCALARS = ("psnr_all", "ssim_all", "psnr_revisit", "ssim_revisit", "psnr_first_visit",
           "ssim_first_visit", "psnr_unseen", "ssim_unseen", "lpips_all", "lpips_revisit",
           "lpips_unseen", "psnr_revisit_given",
           "psnr_revisit_generated", "revisit_loss", "geometric_psnr",
           "geometric_fraction", "depth_abs_rel", "depth_delta1", "coverage_revisit",
           "cache_bytes", "chunk_seconds")
# Suffix of a row generated by another checkpoint, a baseline trained for its job
# (``none (trained)``: a denoiser trained without memory).
TRAINED = " (trained)"



@dataclasses.dataclass
class Trajectory:
  """One posed clip at the model's resolution.

  Attributes:
    name: identifies it in outputs (file-name safe).
    frames: (T, H, W, 3) uint8. depths: (T, H, W) float32 metric z-depth.
    intrinsics: (T, 3, 3). poses_c2w: (T, 4, 4). dynamic_masks: (T, H, W) uint8 (0 = static).
    fps: frames per second of the videos.
    context: frames ``< context`` are given (written to memory from ground truth) and not
      scored; 0 for the plain protocol (only frame 0 is given).
    depth_valid: (T, H, W) uint8, 0 at a depth hole (its depth is a placeholder); None:
      dense depth. Ground truth enters memory only where :meth:`liftable` (ground-truth
      splats) or, in a model's rollout, where the depth was observed.
  """
  name: str
  frames: np.ndarray
  depths: np.ndarray
  intrinsics: np.ndarray
  poses_c2w: np.ndarray
  dynamic_masks: np.ndarray
  fps: float = 10.0
  context: int = 0
  depth_valid: np.ndarray | None = None

  def liftable(self) -> np.ndarray:
    """(T, H, W) bool: static with observed depth (``data_pipelines.clip.liftable``)."""
    return clip_lib.liftable(self.dynamic_masks, self.depth_valid)

  def observed(self) -> np.ndarray | None:
    """(T, H, W) bool where the depth was observed; None: everywhere."""
    return None if self.depth_valid is None else np.asarray(self.depth_valid) != 0


# ----------------------------------------------------------------------------- inputs & outputs


def fit_clip(clip: Mapping[str, np.ndarray], resolution: Sequence[int],
             num_frames: int | None = None) -> dict[str, np.ndarray]:
  """A clip's first ``num_frames`` frames resized to cover ``resolution`` and centre-cropped.

  Uses the input pipeline's resize (area RGB, nearest depth and masks) so evaluation sees
  frames prepared like the training windows; intrinsics follow the resize and crop.

  Args:
    clip: frames (T, H0, W0, 3) uint8, depths (T, H0, W0), intrinsics (T, 3, 3),
      poses_c2w (T, 4, 4), optional dynamic_masks (T, H0, W0) and depth_valid (T, H0, W0).
    resolution: (H, W) of the model.
    num_frames: keep this many frames (default all).
  Returns:
    frames (T', H, W, 3) uint8, depths (T', H, W), intrinsics (T', 3, 3), poses_c2w
    (T', 4, 4), dynamic_masks (T', H, W) uint8, depth_valid (T', H, W) uint8 or None (the
    clip has none: dense depth).
  """
  t = len(clip["poses_c2w"]) if num_frames is None else min(int(num_frames), len(clip["poses_c2w"]))
  masks = clip.get("dynamic_masks")
  if masks is None:
    masks = np.zeros(np.shape(clip["depths"]), np.uint8)
  example = dict(frames=np.asarray(clip["frames"][:t]), depths=np.asarray(clip["depths"][:t], np.float32),
                 intrinsics=np.asarray(clip["intrinsics"][:t], np.float32), dynamic_masks=np.asarray(masks[:t]))
  if clip.get("depth_valid") is not None:  # nearest, as the depth it marks
    example["depth_valid"] = np.asarray(clip["depth_valid"][:t])
  out = pipeline.resize_and_crop(example, tuple(int(r) for r in resolution), None)
  return dict(frames=np.clip(np.rint(out["frames"]), 0, 255).astype(np.uint8),
              depths=np.asarray(out["depths"], np.float32), intrinsics=out["intrinsics"],
              poses_c2w=np.asarray(clip["poses_c2w"][:t], np.float32),
              dynamic_masks=np.asarray(out["dynamic_masks"], np.uint8),
              depth_valid=(np.asarray(out["depth_valid"] != 0, np.uint8)
                           if "depth_valid" in out else None))


def prepare_output_dir(path: str, overwrite: bool, flag: str = "--output_dir") -> None:
  """Creates ``path``; refuses an existing non-empty directory unless ``overwrite``.

  With ``overwrite`` the files a run writes replace their namesakes (each atomically); other
  files in the directory are left alone.
  """
  if not path:
    raise InputError(flag, "output_dir", "required")
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(flag, "output_dir", f"{path} exists and is not a directory")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise InputError(flag, "output_dir", f"{path} exists and is not empty (pass --overwrite to "
                     "replace its files)")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a parent is a file, read-only, ...
    raise InputError(flag, "output_dir", f"cannot create {path} ({e.strerror or e})") from e


# ----------------------------------------------------------------------------- pairing


def pair_revisits(poses_c2w: np.ndarray, max_distance: float = 0.5, max_angle_deg: float = 30.0,
                  min_gap: int = 4) -> np.ndarray:
  """The first-visit frame each frame revisits (see the module docstring), or -1.

  Args:
    poses_c2w: (T, 4, 4) OpenCV camera-to-world.
    max_distance: metres between camera centres, at most.
    max_angle_deg: degrees between the two cameras' orientations, at most.
    min_gap: frames between a revisit and its first visit, at least.
  Returns:
    (T,) int64: for frame b, the nearest earlier frame a it revisits, -1 when none.
  """
  poses = np.asarray(poses_c2w, np.float32)
  dist, angle = (np.asarray(x, np.float64) for x in
                 geometry.pose_distance(poses[:, None], poses[None, :]))
  score = np.maximum(dist / max_distance, np.degrees(angle) / max_angle_deg)  # (T, T), [a, b]
  t = len(poses)
  # away[a, k]: frames in (a, k] not close to a; the camera left a between a and b when
  # away[a, b - 1] > 0 (a camera standing still never revisits).
  far = np.cumsum(score > 1.0, axis=1)
  away = far - np.diagonal(far)[:, None]
  a, b = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
  left = away[a, np.maximum(b - 1, 0)] > 0
  ok = (b - a >= min_gap) & left & (score <= 1.0)
  masked = np.where(ok, score, np.inf)
  first = np.argmin(masked, axis=0)
  return np.where(np.isfinite(masked.min(axis=0)), first, -1).astype(np.int64)


# ----------------------------------------------------------------------------- scoring


def score_frames(frames: np.ndarray, truth: Trajectory, pairs: np.ndarray,
                 depths: np.ndarray | None = None, coverage: np.ndarray | None = None,
                 first_visit: np.ndarray | None = None, lpips=None) -> dict[str, Any]:
  """Scores one generated (or composited) clip against ground truth.

  Frames ``< max(truth.context, 1)`` were given, not generated: they are left out of every
  mean (but kept in the per-frame curves).

  Args:
    frames: (T, H, W, 3) uint8.
    truth: the trajectory it follows.
    pairs: (T,) first-visit frame of each frame, -1 for none (:func:`pair_revisits`).
    depths: optional (T, H, W) generated depth (geometric and depth scores need it).
    coverage: optional (T, h, w) memory coverage in [0, 1] at any integer-divisible size.
    first_visit: optional (T,) bool frames with no memory coverage
      (:func:`first_visit_frames`): ``psnr_unseen``, ``ssim_unseen`` are their means.
    lpips: optional ``evaluation.lpips.LPIPS``: adds ``lpips_all``, ``lpips_revisit``,
      ``lpips_unseen`` and ``lpips_per_frame`` (without it nothing LPIPS is computed).
  Revisits are also split by their first visit: a given frame (``psnr_revisit_given``) or a
  generated one (``psnr_revisit_generated``). On the latter, ``revisit_loss`` is the PSNR of
  the first visits they revisit minus theirs: what is lost between the two visits, apart
  from how good the first visit was (an oracle's memory holds ground truth of places the
  model had to invent, so its lead there measures first-visit generation, not the memory).
  Returns:
    dict of the scalar means named in ``SCALARS`` that apply (NaN when no frame applies,
    e.g. no revisit frame) and per-frame ``psnr_per_frame``, ``ssim_per_frame`` (T,).
  """
  gen = np.asarray(frames, np.float32) / 255.0
  gt = np.asarray(truth.frames, np.float32) / 255.0
  t = len(gen)
  scored = np.arange(t) >= max(truth.context, 1)
  revisit = scored & (pairs >= 0)
  mean = lambda x, m: _nanmean(np.asarray(x)[m])
  psnr, ssim = np.asarray(_psnr(gen, gt)), np.asarray(_ssim(gen, gt))
  # Every frame against its pair (frame 0 where none), kept for revisit frames: one shape.
  first = gen[np.maximum(pairs, 0)]
  out = dict(psnr_all=mean(psnr, scored), ssim_all=mean(ssim, scored),
             psnr_revisit=mean(psnr, revisit), ssim_revisit=mean(ssim, revisit),
             psnr_first_visit=mean(_psnr(gen, first), revisit),
             ssim_first_visit=mean(_ssim(gen, first), revisit),
             # Given frames (the first frame, context) are not generated: NaN, not 100 dB.
             psnr_per_frame=np.where(scored, psnr, np.nan),
             ssim_per_frame=np.where(scored, ssim, np.nan))
  of_given = revisit & (pairs < max(truth.context, 1))
  of_generated = revisit & ~of_given
  out.update(psnr_revisit_given=mean(psnr, of_given),
             psnr_revisit_generated=mean(psnr, of_generated),
             revisit_loss=mean(psnr[np.maximum(pairs, 0)] - psnr, of_generated))
  if depths is not None:
    depths = np.asarray(depths, np.float32)
    geo = _geometric(gen, depths, truth.intrinsics, truth.poses_c2w)
    err = _depth_metrics(depths, truth.depths, truth.observed())  # not against a hole's placeholder
    out.update(geometric_psnr=_nanmean(geo["psnr"]), geometric_fraction=_nanmean(geo["fraction"]),
               depth_abs_rel=mean(err["abs_rel"], scored), depth_delta1=mean(err["delta1"], scored))
  if coverage is not None:
    out["coverage_revisit"] = mean(np.asarray(coverage, np.float32).mean(axis=(1, 2)), revisit)
  if lpips is not None:
    perceptual = lpips(gen, gt)
    out.update(lpips_all=mean(perceptual, scored), lpips_revisit=mean(perceptual, revisit),
               lpips_per_frame=np.where(scored, perceptual, np.nan))
  if first_visit is not None:
    unseen = scored & np.asarray(first_visit, bool)
    out.update(psnr_unseen=mean(psnr, unseen), ssim_unseen=mean(ssim, unseen))
    if lpips is not None:
      out["lpips_unseen"] = mean(perceptual, unseen)
  return out


def first_visit_frames(truth: Trajectory, min_gap: int = 4, max_coverage: float = 0.5,
                       near: float = 1e-3) -> np.ndarray:
  """Frames with no memory coverage: new content, where a memory has nothing to copy.

  Frame t is a first-visit frame when the ground-truth points of frames ``<= t - min_gap``
  (static pixels lifted with ground-truth depth; the same ``min_gap`` as the revisit
  pairing, so the last few frames, which the recent context holds, do not count) cover at
  most ``max_coverage`` of its pixels. The set depends on the trajectory only, so every
  row is scored on the same frames. Frame 0 and the given context frames are never scored
  (:func:`score_frames` leaves them out).

  Args:
    truth: the trajectory (T frames at (H, W)).
    min_gap: frames between a frame and the earliest frame whose content counts as memory.
    max_coverage: fraction of the pixels, at most.
    near: splat near plane.
  Returns:
    (T,) bool.
  """
  covered = _ground_truth_splats(truth, max(int(min_gap), 1), near)[1]
  return covered.mean(axis=(1, 2)) <= max_coverage


def reference_scores(truth: Trajectory, pairs: np.ndarray) -> dict[str, float]:
  """Ground truth scored like a generation: the floor of the first-visit and geometric scores."""
  s = score_frames(truth.frames, truth, pairs, depths=truth.depths)
  return {k: s[k] for k in ("psnr_first_visit", "ssim_first_visit", "geometric_psnr",
                            "geometric_fraction")}


def trivial_composite(truth: Trajectory, near: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """"Memory where covered, previous frame elsewhere", from ground truth.

  Frame t is the z-buffered splat of the ground-truth RGB points of frames 0..t-1 (every
  static pixel with observed depth lifted with it; the ``rgb_points`` backend's write and
  render) where it covers, and ground-truth frame t-1 elsewhere. Frame 0 is ground truth.

  Args:
    truth: the trajectory (T frames at (H, W)).
    near: splat near plane.
  Returns:
    frames (T, H, W, 3) uint8, coverage (T, H, W) bool (False for frame 0).
  """
  splats, covered = _ground_truth_splats(truth, 1, near)
  previous = np.concatenate([truth.frames[:1], truth.frames[:-1]])  # frame 0: itself
  return np.where(covered[..., None], splats, previous), covered


def _ground_truth_splats(truth: Trajectory, lag: int, near: float
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Frame t rendered from the ground-truth RGB points of frames ``<= t - lag``.

  Returns:
    splats (T, H, W, 3) uint8 (zeros where uncovered), covered (T, H, W) bool (False for
    frames ``< lag``).
  """
  t, h, w = truth.depths.shape
  cfg = memory_lib.MemoryConfig(image_height=h, image_width=w, latent_height=h, latent_width=w,
                                latent_channels=1, capacity=t * h * w, near=near)
  state = rgb_points.init(cfg)
  liftable = truth.liftable()  # depth holes hold a placeholder: never lifted
  splats, cov = np.zeros_like(truth.frames), np.zeros((t, h, w), bool)
  for i in range(lag, t):
    j = i - lag  # the newest frame that counts for frame i
    state = _rgb_write(state, np.zeros((1, h, w, 1), np.float32), truth.depths[j:j + 1],
                       truth.intrinsics[j:j + 1], truth.poses_c2w[j:j + 1],
                       liftable[j:j + 1], np.array([j], np.int32),
                       rgb=truth.frames[j:j + 1].astype(np.float32) / 255.0)
    splat, covered = _rgb_render(state, truth.intrinsics[i:i + 1], truth.poses_c2w[i:i + 1])
    cov[i] = np.asarray(covered[0])
    splats[i] = np.where(cov[i][..., None], video.as_uint8(np.asarray(splat[0])), 0)
  return splats, cov


# ----------------------------------------------------------------------------- runner


class RevisitRunner:
  """Generates and scores trajectories with each backend, the oracle and the composite.

  One ``Rollout`` per row, built once (compiled once) and reused for every trajectory;
  append-only backends get the capacity of the longest trajectory (``capacity_for``), the
  voxel cache keeps its configured one.

  Args:
    config, ae, dn: the world model (``rollout.load_world_model``), either family.
    backends: memory backends to run (names of ``memory.BACKEND_NAMES``).
    max_frames: the longest trajectory that will be run.
    sampling_options: for a Wan-family model, ``WanRollout``'s text, empty_text, guidance_scale.
    oracle: add the ``oracle`` row (the config's backend, memory from ground truth).
    composite: add the ``composite`` row.
    pairing: keyword arguments of :func:`pair_revisits`.
    extra_rows: row name -> (config, ae, dn) of another world model (e.g. a baseline trained
      without memory: ``none (trained)``), run with the backend it was trained with
      (its ``config.memory.backend``); same resolution as ``config``.
    first_visit_coverage: ``max_coverage`` of :func:`first_visit_frames` (its ``min_gap``
      is the pairing's).
    depth: where the memory model's rows take written depth from (``WorldModel.depth_options``;
      default: the family's); the oracle and extra rows keep their family's default.
    lpips: optional ``evaluation.lpips.LPIPS`` scoring every row (:func:`score_frames`).
  """

  def __init__(self, config, ae, dn, backends: Sequence[str], max_frames: int, *,
               oracle: bool = True, composite: bool = True,
               pairing: Mapping[str, Any] | None = None,
               sampling_options: Mapping[str, Any] | None = None,
               extra_rows: Mapping[str, tuple] | None = None,
               first_visit_coverage: float = 0.5, depth: Any = None, lpips=None):
    unknown = [b for b in backends if b not in memory_lib.BACKEND_NAMES]
    if unknown:
      raise InputError("--backends", "backends", f"unknown {unknown[0]!r} (known: "
                       f"{', '.join(memory_lib.BACKEND_NAMES)})")
    base = families.world_model(config).memory_config(config)

    def make(b, world=(config, ae, dn), **options):
      cfg = families.world_model(world[0]).memory_config(world[0])
      return rollout.make_rollout(*world, backend=b, sampling_options=dict(sampling_options or {}),
                                  **capacity_for(b or world[0].memory.backend, max_frames, cfg),
                                  **options)
    self.rows = {b: make(b, depth=depth) for b in backends}
    self.oracle_backend = config.memory.backend
    if oracle:
      self.rows[ORACLE] = make(self.oracle_backend)
    self.extra_backends = {}
    for name, world in (extra_rows or {}).items():
      if name in self.rows or name in (ORACLE, COMPOSITE):
        raise InputError("--baseline_checkpoints", "row", f"{name!r} is already a row")
      other = families.world_model(world[0]).memory_config(world[0])
      if (other.image_height, other.image_width) != (base.image_height, base.image_width):
        raise InputError("--baseline_checkpoints", name, f"resolution {other.image_height}x"
                         f"{other.image_width}, the memory model's is {base.image_height}x"
                         f"{base.image_width}")
      self.rows[name] = make(None, world)
      self.extra_backends[name] = world[0].memory.backend
    self.composite = composite
    self.pairing = dict(pairing or {})
    self.first_visit_coverage = float(first_visit_coverage)
    self.lpips = lpips
    self.image_hw = (base.image_height, base.image_width)
    self.max_frames = int(max_frames)

  def run(self, truth: Trajectory, *, seed: int = 0, video_dir: str | None = None,
          progress: bool = False, return_outputs: bool = False):
    """Scores every row on one trajectory (:meth:`run_batch` of one)."""
    return self.run_batch([truth], seed=seed, video_dir=video_dir, progress=progress,
                          return_outputs=return_outputs)[0]

  def run_batch(self, truths: Sequence[Trajectory], *, seed: int = 0,
                video_dir: str | None = None, progress: bool = False,
                return_outputs: bool = False) -> list:
    """Scores every row on a batch of trajectories (and writes their side-by-side videos).

    Each row generates all of ``truths`` at once (``generate_batch`` of either family: one
    jitted chunk step for the batch, trajectories sharded over this process's devices,
    different lengths padded and masked). Every trajectory is sampled with ``seed``, so its
    scores do not depend on the batch it is in.

    Args:
      truths: trajectories at the model's resolution, each at most ``max_frames`` long.
      seed: sampling seed (the same for every row and trajectory).
      video_dir: if set, writes ``<video_dir>/<truth.name>/<row>.mp4``: generated | ground
        truth | memory coverage, and ``ground_truth.mp4``.
    Returns:
      per trajectory, a dict: ``num_frames``, ``context``, ``pairs`` (T,),
      ``revisit_frames`` (count), ``first_visit`` (T,) bool (:func:`first_visit_frames`),
      ``first_visit_frames`` (count of those scored), ``reference`` (ground truth's own
      scores), ``rows``: row ->
      scores (see :func:`score_frames`; ``chunk_seconds`` is the wall time of one chunk step
      of the whole batch, after the first). With ``return_outputs``: (that dict, per
      generated row the rollout's output (``Rollout.generate``)).
    """
    for truth in truths:
      if truth.frames.shape[1:3] != self.image_hw:
        raise InputError(truth.name, "frames", f"expected the model's resolution "
                         f"{self.image_hw}, got {truth.frames.shape[1:3]}")
      if len(truth.frames) > self.max_frames:  # append-only memories would start evicting
        raise InputError(truth.name, "frames", f"{len(truth.frames)} frames, more than the "
                         f"runner's max_frames={self.max_frames}")
    pairs = [pair_revisits(t.poses_c2w, **self.pairing) for t in truths]
    unseen = [first_visit_frames(t, self.pairing.get("min_gap", 4), self.first_visit_coverage)
              for t in truths]
    if video_dir:
      for truth in truths:
        write_truth_video(video_dir, truth)
    rows, outputs = [{} for _ in truths], [{} for _ in truths]
    given = [(t.frames[:t.context], t.depths[:t.context]) if t.context else None for t in truths]
    for name, r in self.rows.items():
      oracle = [(t.frames, t.depths) for t in truths] if name == ORACLE else given
      outs = generate_trajectories(r, truths, seed=seed, progress=progress, oracle_frames=oracle)
      for b, (truth, out) in enumerate(zip(truths, outs)):
        scores = score_frames(out["frames"], truth, pairs[b], out["depths"], out["coverage"],
                              unseen[b], lpips=self.lpips)
        scores.update(cache_bytes=out["cache_bytes"], chunk_seconds=out["chunk_seconds"])
        if name == ORACLE:
          scores["backend"] = self.oracle_backend
        if name in self.extra_backends:
          scores["backend"] = self.extra_backends[name]
        rows[b][name] = scores
        if return_outputs:
          outputs[b][name] = out
        if video_dir:
          _write_panel(video_dir, truth, name, out["frames"], out["coverage"])
    results = []
    for b, truth in enumerate(truths):
      if self.composite:
        frames, covered = trivial_composite(truth)
        rows[b][COMPOSITE] = score_frames(frames, truth, pairs[b], coverage=covered,
                                          first_visit=unseen[b], lpips=self.lpips)
        if video_dir:
          _write_panel(video_dir, truth, COMPOSITE, frames, covered)
      p = pairs[b]
      scored = np.arange(len(p)) >= max(truth.context, 1)
      result = dict(num_frames=len(truth.frames), context=truth.context, pairs=p,
                    revisit_frames=int(np.sum((p >= 0) & scored)),
                    first_visit=unseen[b], first_visit_frames=int(np.sum(unseen[b] & scored)),
                    reference=reference_scores(truth, p), rows=rows[b])
      results.append((result, outputs[b]) if return_outputs else result)
    return results


def generate_trajectories(r, truths: Sequence[Trajectory], *, seed: int = 0,
                          progress: bool = False, oracle_frames=None) -> list[dict[str, Any]]:
  """``r.generate`` of every trajectory from its frame 0, all at once (``generate_batch``
  of either family: one jitted chunk step for the batch); the Wan family also gets every
  frame's depth (it writes each latent with its frame's given depth, having no depth model).

  Args:
    r: a rollout of ``rollout.make_rollout``. truths: the trajectories.
    oracle_frames: None or one entry per trajectory (see ``Rollout.generate``).
  A trajectory's ``context`` frames are given (``Rollout.generate_batch``'s ``given_frames``):
  the clean context after them is their encoding, not the model's generation.
  """
  oracle_frames = [None] * len(truths) if oracle_frames is None else oracle_frames
  given = ({"given_frames": [t.context for t in truths]} if any(t.context for t in truths)
           else {})
  extra = dict(depths=[t.depths for t in truths]) if r.model.needs_depths else {}
  # Frame 0, given depths and oracle frames are ground truth: nothing is lifted from holes.
  return r.generate_batch([t.frames[0] for t in truths], [t.depths[0] for t in truths],
                          [t.intrinsics for t in truths], [t.poses_c2w for t in truths],
                          seeds=seed, progress=progress, oracle_frames=oracle_frames,
                          depth_valid=[t.observed() for t in truths], **extra, **given)


def write_truth_video(video_dir: str, truth: Trajectory) -> None:
  """``<video_dir>/<truth.name>/ground_truth.mp4``, at the panels' scale (the report's first column)."""
  directory = os.path.join(video_dir, truth.name)
  os.makedirs(directory, exist_ok=True)
  h = truth.frames.shape[1]
  video.write_mp4(os.path.join(directory, f"{GROUND_TRUTH}.mp4"),
                  video.upscale(truth.frames, max(1, 128 // h)), fps=truth.fps)


def panel(truth: Trajectory, frames: np.ndarray, coverage: np.ndarray) -> np.ndarray:
  """generated | ground truth | coverage (or any per-cell mask), uint8 (T, H, 3 W + 4, 3).

  Args:
    frames: (T, H, W, 3) uint8. coverage: (T, h, w) in [0, 1] at an integer-divisible size.
  """
  h = truth.frames.shape[1]
  cov = np.asarray(coverage, np.float32)
  cov = video.upscale(cov[..., None], h // cov.shape[1])[..., 0] > 0.5
  return video.side_by_side([frames, truth.frames, video.mask_to_rgb(cov)])


def _write_panel(video_dir: str, truth: Trajectory, row: str, frames: np.ndarray,
                 coverage: np.ndarray) -> None:
  """:func:`panel`, upscaled to at least 128 pixels high, as MP4."""
  h = truth.frames.shape[1]
  panel_frames = panel(truth, frames, coverage)
  directory = os.path.join(video_dir, truth.name)
  os.makedirs(directory, exist_ok=True)
  video.write_mp4(os.path.join(directory, f"{row}.mp4"), video.upscale(panel_frames, max(1, 128 // h)),
                  fps=truth.fps)


# ----------------------------------------------------------------------------- summary


def summarize(results: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict]:
  """Means over trajectories of each row's scalars, and mean per-frame curves.

  Args:
    results: trajectory name -> the dict :meth:`RevisitRunner.run` returned (or its JSON
      round trip, where NaN became None).
  Returns:
    summary: row -> {scalar: mean over trajectories (NaN-skipping)} plus ``reference`` (the
    ground-truth floor), ``revisit_frames`` and ``first_visit_frames`` (totals); curves:
    row -> {"psnr": (T,), "ssim": (T,), "psnr_unseen": (T,), "ssim_unseen": (T,)} (and
    "lpips", "lpips_unseen" when LPIPS was scored) means over trajectories (the ``_unseen`` curves over first-visit frames only: NaN at an
    index where no trajectory has one), shorter ones padded with NaN.
  """
  rows = {}
  for res in results.values():
    for row in res["rows"]:
      rows.setdefault(row, None)
  summary, curves = {}, {}
  for row in rows:
    has = [res for res in results.values() if row in res["rows"]]
    per = [res["rows"][row] for res in has]
    summary[row] = {k: _nanmean([_float(p[k]) for p in per]) for k in SCALARS if k in per[0]}
    t = max(len(p["psnr_per_frame"]) for p in per)
    curves[row] = {}
    for key in ("psnr", "ssim", "lpips"):
      if not all(f"{key}_per_frame" in p for p in per):  # LPIPS: only when scored
        continue
      stack, unseen = np.full((len(per), t), np.nan), np.full((len(per), t), np.nan)
      for i, (res, p) in enumerate(zip(has, per)):
        v = np.array([_float(x) for x in p[f"{key}_per_frame"]])
        stack[i, :len(v)] = v
        if "first_visit" in res:  # results of before first-visit scoring lack it
          unseen[i, :len(v)] = np.where(np.asarray(res["first_visit"], bool), v, np.nan)
      curves[row][key] = _nanmean(stack, axis=0)
      curves[row][f"{key}_unseen"] = _nanmean(unseen, axis=0)
  refs = [res["reference"] for res in results.values()]
  summary["reference"] = {k: _nanmean([_float(r[k]) for r in refs]) for k in refs[0]} if refs else {}
  summary["revisit_frames"] = int(sum(res["revisit_frames"] for res in results.values()))
  summary["first_visit_frames"] = int(sum(res.get("first_visit_frames", 0)
                                          for res in results.values()))
  return summary, curves


# The ``none`` row is the memory model with its memory switched off, not a model trained
# without memory (that row is ``none (trained)``): tables and claims print it as this.
MEMORY_OFF = "none (memory off)"


def row_label(row: str) -> str:
  """How tables and claims name a summary row (``none`` -> :data:`MEMORY_OFF`)."""
  return MEMORY_OFF if row == "none" else row


def claims(summary: Mapping[str, Any]) -> dict[str, bool]:
  """The project's revisit claims on a :func:`summarize` result (claims on absent rows: none).

  Voxel's revisit PSNR beats no memory by >= 4 dB and is at most 1 dB below the reference's
  cache (doing better is allowed). "No memory" is the baseline trained without memory
  (``none (trained)``) when the summary has it, else the memory model with its memory off,
  named so in the claim (``none (memory off)``, :data:`MEMORY_OFF`).
  """
  psnr = lambda b: np.nan if summary[b].get("psnr_revisit") is None else float(summary[b]["psnr_revisit"])
  out = {}
  none = "none" + TRAINED if "none" + TRAINED in summary else "none"
  if {"voxel", none} <= set(summary):
    out[f"voxel revisit PSNR >= {row_label(none)} + 4 dB"] = psnr("voxel") >= psnr(none) + 4.0
  if {"voxel", "mirage"} <= set(summary):
    out["voxel revisit PSNR >= mirage - 1 dB"] = psnr("voxel") >= psnr("mirage") - 1.0
  return out


def paired_difference(metrics: Mapping[str, Any], row: str, baseline: str,
                      key: str = "psnr_revisit") -> dict[str, float] | None:
  """``row`` minus ``baseline`` on each trajectory (a revisit benchmark's ``metrics``, with
  ``trajectories``): mean, min, max, the count of trajectories where ``row`` is better, and
  their number; None when no trajectory scores both. The spread across trajectories is what
  a difference of the means has to beat."""
  diffs = []
  for result in metrics.get("trajectories", {}).values():
    rows = result.get("rows", {})
    a, b = (_float(rows.get(r, {}).get(key)) for r in (row, baseline))
    if np.isfinite(a) and np.isfinite(b):
      diffs.append(a - b)
  if not diffs:
    return None
  return dict(mean=float(np.mean(diffs)), min=float(np.min(diffs)), max=float(np.max(diffs)),
              better=int(np.sum(np.asarray(diffs) > 0)), count=len(diffs))


def oracle_gap(summary: Mapping[str, Any], row: str = "voxel") -> dict[str, float] | None:
  """How far ``row`` is below the oracle on revisits, and why (None without both rows).

  Returns:
    dict of dB: ``revisit`` (all revisits), ``given`` and ``generated`` (revisits of given
    and of generated first visits), and ``memory``: ``row``'s ``revisit_loss`` minus the
    oracle's, the part of ``generated`` its memory loses; the rest of ``generated`` is
    first-visit quality (the oracle's memory holds ground truth the model never saw).
  """
  if not {row, ORACLE} <= set(summary):
    return None
  diff = lambda k: _float(summary[ORACLE].get(k)) - _float(summary[row].get(k))
  return dict(revisit=diff("psnr_revisit"), given=diff("psnr_revisit_given"),
              generated=diff("psnr_revisit_generated"), memory=-diff("revisit_loss"))


def _float(v) -> float:
  """A JSON number (None for NaN) as a float."""
  return np.nan if v is None else float(v)


def _nanmean(x, axis=None):
  """Mean ignoring NaN; NaN (without a warning) where every value is NaN."""
  x = np.asarray(x, np.float64)
  count = np.sum(~np.isnan(x), axis=axis)
  total = np.nansum(x, axis=axis)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan) if axis is not None else (
      float(total / count) if count else float("nan"))
