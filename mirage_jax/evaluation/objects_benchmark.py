"""Moving-objects benchmark: ghosting, object re-entry, object position and identity.

Protocol, per trajectory (a procedural ``loop`` clip with ``K`` moving objects, rendered at
the model's resolution; :func:`render_object_clip`):

  * Ground truth: frames, depth, cameras, ``dynamic_masks`` (object ids 1..K, 0 = static)
    and ``object_tracks`` (each object's world centre per frame). The same seed rendered
    with no objects is the *static background* (same room, same camera path).
  * The first ``context`` frames are given: written into memory from ground truth
    (``oracle_frames``, which also lets object slots estimate velocity) and not scored.
    Every row samples with the same seed.
  * Rows (:data:`ROWS`): ``mirage`` (the reference's append-only cloud, moving content
    written into it like everything else), ``voxel`` (our cache, content the autoencoder's
    dynamic head marks as moving kept out of it), ``voxel+objects`` (the same, moving content
    carried by per-object slots).

Scores of a row on one trajectory (NaN when no frame applies):

  ``static_psnr_revisit``  PSNR over ground-truth static pixels of revisit frames
                           (``revisit.pair_revisits``): a ghost of an object left in memory
                           where it used to be lowers it. ``static_psnr_all``: every scored
                           frame.
  ``lpips_revisit``        LPIPS (``evaluation/lpips.py``) of whole revisit frames, only with
                           LPIPS weights (``--lpips_backbone``).
  ``ghost_psnr``           PSNR over the *ghost region* of every scored frame: static pixels
                           whose surface point was hidden behind a moving object in some
                           earlier frame (:func:`ghost_regions`), i.e. where a memory that
                           kept the object would show it after it left. Frames with fewer
                           than ``min_pixels`` such pixels are left out.
  ``object_psnr_reentry``  re-entry events (:func:`reentry_events`): object k visible (at
                           least ``min_pixels`` pixels) at frame ``b >= context`` after at
                           least ``gap`` frames not visible, and visible before that. Frames
                           ``b .. b + span - 1`` where k is visible are *re-entry frames*;
                           PSNR over object k's pixels dilated by one pixel.
  ``object_position_error_m``, ``object_detection_rate``
                           on re-entry frames: connected components of the generated
                           ``dynamic`` probability > 0.5 (upsampled to the image), each
                           lifted with the generated depth to a 3D centroid; error = distance
                           from object k's ground-truth centre to the nearest centroid (over
                           detected frames); a frame with no component is a miss.
  ``slot_position_error_m`` rows with object slots, on re-entry frames: distance from object
                           k's ground-truth centre to the nearest slot's predicted position
                           (the state the chunk was conditioned on), over frames with a slot.
  ``slot_identity_kept``   rows with object slots, re-entries within the *given* frames (the
                           tracker's own test: it observes the object leave and come back):
                           the fraction where the slot nearest object k (within
                           ``SLOT_GATE_M``) at re-entry has the ident of the slot nearest it
                           at its last visible frame before; no slot there counts as lost.
  ``identity_consistency`` per re-entry frame, the mean generated colour under object k's
                           ground-truth mask is nearest to object k's own mean colour (over
                           all its ground-truth pixels in the clip), rather than another
                           object's or the static background's under the same mask: the
                           fraction of re-entry frames where it is.
  ``cache_bytes``, ``chunk_seconds``  from the rollout (the first chunk, which compiles, is
                           left out of the time).

The summary is the mean over trajectories of each score (NaN-skipping) with the total counts
of revisit frames, re-entry events and re-entry frames. The benchmark runs on one process
(``mirage_jax.evaluate`` runs it on process 0).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from scipy import ndimage

from mirage_jax import geometry, rollout
from mirage_jax import families
from mirage_jax.errors import InputError
from mirage_jax.evaluation import metrics, revisit
from mirage_jax.memory import capacity_for

_masked_psnr = jax.jit(metrics.masked_psnr)
_nanmean = revisit._nanmean  # pylint: disable=protected-access

# Row name -> Rollout arguments.
ROWS = {
    "mirage": dict(backend="mirage", mask_dynamic=False, object_slots=False),
    "voxel": dict(backend="voxel", mask_dynamic=True, object_slots=False),
    "voxel+objects": dict(backend="voxel", mask_dynamic=True, object_slots=True),
}
SCALARS = ("static_psnr_revisit", "static_psnr_all", "lpips_revisit", "ghost_psnr", "object_psnr_reentry", "object_position_error_m",
           "object_detection_rate", "slot_position_error_m", "slot_identity_kept", "identity_consistency",
           "cache_bytes", "chunk_seconds")
SLOT_GATE_M = 1.0  # metres between an object and the slot said to hold it
COUNTS = ("revisit_frames", "ghost_frames", "reentry_events", "reentry_frames")


@dataclasses.dataclass
class ObjectClip:
  """A trajectory with moving objects and its static background.

  Attributes:
    truth: the trajectory (``dynamic_masks`` hold object ids 1..K; ``context`` frames given).
    background: (T, H, W, 3) uint8, the same views without the objects.
    object_tracks: (K, T, 3) float32 world centre of each object per frame.
  """
  truth: revisit.Trajectory
  background: np.ndarray
  object_tracks: np.ndarray


def check_rows(rows: Sequence[str], flag: str = "--object_rows") -> None:
  """Refuses an empty row list or a row not in :data:`ROWS`."""
  if not rows:
    raise InputError(flag, flag.lstrip("-"), f"give at least one of {', '.join(ROWS)}")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise InputError(flag, flag.lstrip("-"), f"unknown {unknown[0]!r} (known: {', '.join(ROWS)})")


def render_object_clip(seed: int, num_frames: int, resolution: Sequence[int], moving_objects: int,
                       context: int) -> ObjectClip:
  """A procedural loop clip with ``moving_objects`` objects at ``resolution`` (H, W)."""
  from data_pipelines import procedural  # pylint: disable=g-import-not-at-top
  h, w = (int(r) for r in resolution)
  clip = procedural.render_clip(seed, num_frames, h, w, trajectory="loop", moving_objects=moving_objects)
  empty = procedural.render_clip(seed, num_frames, h, w, trajectory="loop", moving_objects=0)
  truth = revisit.Trajectory(name=f"seed{seed}", fps=float(clip["fps"]), context=context,
                             **revisit.fit_clip(clip, (h, w)))
  background = revisit.fit_clip(empty, (h, w))["frames"]
  return ObjectClip(truth, background, np.asarray(clip["object_tracks"], np.float32))


# ----------------------------------------------------------------------------- events


def object_visibility(dynamic_masks: np.ndarray, num_objects: int, min_pixels: int) -> np.ndarray:
  """Whether each object covers at least ``min_pixels`` pixels of each frame.

  Args:
    dynamic_masks: (T, H, W) object ids (0 = static).
  Returns:
    (K, T) bool.
  """
  masks = np.asarray(dynamic_masks)
  counts = np.stack([(masks == k + 1).sum(axis=(1, 2)) for k in range(num_objects)]).reshape(num_objects, -1)
  return counts >= min_pixels


def reentry_events(visible: np.ndarray, first: int, gap: int) -> list[tuple[int, int]]:
  """Frames where an object comes back into view.

  Args:
    visible: (K, T) bool.
    first: earliest frame an event may be at (the first scored frame).
    gap: frames the object was out of view just before, at least.
  Returns:
    sorted (k, b): object k visible at b >= first, not visible at b - gap .. b - 1, and
    visible at some frame before b - gap.
  """
  events = []
  for k, vis in enumerate(np.asarray(visible, bool)):
    for b in range(max(first, gap), len(vis)):
      if vis[b] and not vis[b - gap:b].any() and vis[:b - gap].any():
        events.append((k, b))
  return events


def slot_identity_kept(visible: np.ndarray, tracks: np.ndarray, positions: np.ndarray,
                       idents: np.ndarray, last: int, gap: int) -> list[bool]:
  """Per re-entry event at a frame ``< last``: whether the slot holding the object kept its ident.

  Args:
    visible: (K, T) bool. tracks: (K, T, 3) ground-truth centres. positions: (T, S, 3) slot
      positions each frame was conditioned on; idents (T, S) (-1 = empty).
    last: events at frames >= last are left out (generated frames: no observation).
    gap: as in :func:`reentry_events`.
  """
  def holder(k, t):
    live = idents[t] >= 0
    if not live.any():
      return -1
    dist = np.linalg.norm(positions[t][live] - tracks[k, t], axis=-1)
    return int(idents[t][live][np.argmin(dist)]) if dist.min() <= SLOT_GATE_M else -1

  kept = []
  for k, b in reentry_events(visible, 1, gap):
    if b < last:
      before = int(np.flatnonzero(visible[k, :b - gap])[-1])
      now, then = holder(k, b), holder(k, before)
      kept.append(now >= 0 and now == then)
  return kept


def reentry_frames(visible: np.ndarray, events: Sequence[tuple[int, int]], span: int = 3
                   ) -> list[tuple[int, int]]:
  """Sorted unique (k, t) with t in b .. b + span - 1 of an event (k, b) and k visible at t."""
  t_max = visible.shape[1]
  return sorted({(k, t) for k, b in events for t in range(b, min(b + span, t_max)) if visible[k, t]})


def ghost_regions(masks: np.ndarray, depths: np.ndarray, intrinsics: np.ndarray,
                  poses_c2w: np.ndarray, margin: float = 0.05) -> np.ndarray:
  """Static pixels whose surface point a moving object hid in an earlier frame.

  Pixel p of frame b is in the region if it is static at b and its ground-truth point,
  projected into some frame t < b, lands inside that frame on an object pixel that is
  nearer than the point by more than ``margin`` (the object stood in front of it).

  Args:
    masks: (T, H, W) object ids (0 = static). depths: (T, H, W) ground-truth z-depth.
    intrinsics: (T, 3, 3). poses_c2w: (T, 4, 4).
    margin: metres the object must be in front of the point.
  Returns:
    (T, H, W) bool (frame 0 is all False).
  """
  t, h, w = masks.shape
  points = np.asarray(geometry.unproject_depth(np.asarray(depths, np.float32),
                                               np.asarray(intrinsics, np.float32),
                                               np.asarray(poses_c2w, np.float32))).reshape(t, h * w, 3)
  hidden = np.zeros((t, h * w), bool)
  for b in range(1, t):
    # Every earlier frame at once: (b, H*W) projections of frame b's points.
    uv, z = (np.asarray(a) for a in geometry.project_points(
        np.broadcast_to(points[b], (b, h * w, 3)), intrinsics[:b], poses_c2w[:b]))
    u, v = np.floor(uv[..., 0]).astype(int), np.floor(uv[..., 1]).astype(int)
    inside = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    uc, vc = np.clip(u, 0, w - 1), np.clip(v, 0, h - 1)
    earlier = np.arange(b)[:, None]
    occluded = (masks[earlier, vc, uc] > 0) & (depths[earlier, vc, uc] < z - margin)
    hidden[b] = (inside & occluded).any(axis=0)
  return hidden.reshape(t, h, w) & (np.asarray(masks) == 0)


# ----------------------------------------------------------------------------- per-frame scores


def _upsample(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """(T, h, w) -> (T, H, W) nearest, for H, W integer multiples of h, w."""
  fy, fx = hw[0] // mask.shape[1], hw[1] // mask.shape[2]
  return np.repeat(np.repeat(mask, fy, axis=1), fx, axis=2)


def detect_centroids(dynamic: np.ndarray, depth: np.ndarray, K: np.ndarray, c2w: np.ndarray,
                     threshold: float = 0.5) -> np.ndarray:
  """3D centroids of the connected components of a predicted dynamic mask.

  Args:
    dynamic: (h, w) probability of moving content (image size an integer multiple of it).
    depth: (H, W) generated z-depth. K: (3, 3) image intrinsics. c2w: (4, 4).
    threshold: probability above which a cell is moving.
  Returns:
    (N, 3) world centroids (components with no finite positive depth are left out).
  """
  mask = _upsample(np.asarray(dynamic)[None] > threshold, depth.shape)[0]
  labels, n = ndimage.label(mask)
  if n == 0:
    return np.zeros((0, 3), np.float32)
  points = np.asarray(geometry.unproject_depth(np.asarray(depth, np.float32), np.asarray(K, np.float32),
                                               np.asarray(c2w, np.float32)))
  ok = np.isfinite(depth) & (depth > 0) & np.isfinite(points).all(-1)
  centroids = [points[(labels == i) & ok].mean(axis=0) for i in range(1, n + 1)
               if ((labels == i) & ok).any()]
  return np.asarray(centroids, np.float32).reshape(-1, 3)


def mean_colours(frames: np.ndarray, masks: np.ndarray, num_objects: int) -> np.ndarray:
  """(K, 3) mean RGB of each object over all its pixels in the clip (NaN if never seen).

  Args:
    frames: (T, H, W, 3) uint8. masks: (T, H, W) object ids.
  """
  frames = np.asarray(frames, np.float64)
  out = np.full((num_objects, 3), np.nan)
  for k in range(num_objects):
    sel = np.asarray(masks) == k + 1
    if sel.any():
      out[k] = frames[sel].mean(axis=0)
  return out


def identity_consistent(frame: np.ndarray, mask: np.ndarray, k: int, object_colours: np.ndarray,
                        background: np.ndarray) -> bool:
  """Whether the generated colour under object k's mask is nearest object k's colour.

  Args:
    frame: (H, W, 3) generated. mask: (H, W) bool, object k's ground-truth pixels.
    k: object index (0-based). object_colours: (K, 3) ground-truth mean colours.
    background: (H, W, 3) the static background at the same view.
  """
  got = np.asarray(frame, np.float64)[mask].mean(axis=0)
  candidates = np.concatenate([object_colours, np.asarray(background, np.float64)[mask].mean(axis=0)[None]])
  dist = np.linalg.norm(candidates - got, axis=-1)
  return int(np.argmin(np.where(np.isnan(dist), np.inf, dist))) == k


def score_objects(out: Mapping[str, Any], clip: ObjectClip, pairs: np.ndarray, *, min_pixels: int = 4,
                  gap: int = 4, span: int = 3, lpips=None) -> dict[str, Any]:
  """Scores one rollout on one trajectory (the module docstring defines each score).

  Args:
    out: the rollout's ``frames`` (T, H, W, 3) uint8, ``depths`` (T, H, W), ``dynamic``
      (T, h, w) probabilities and optional ``object_positions`` (T, S, 3) with
      ``object_idents`` (T, S) (-1 = empty slot).
    clip: the ground truth.
    pairs: (T,) first-visit frame of each frame, -1 for none.
    min_pixels, gap, span: re-entry events and frames (:func:`reentry_events`).
    lpips: optional ``evaluation.lpips.LPIPS``; without it ``lpips_revisit`` is left out.
  Returns:
    dict of the scores named in ``SCALARS`` but the rollout's costs, plus ``COUNTS``.
  """
  truth = clip.truth
  t = len(truth.frames)
  first = max(truth.context, 1)
  gen = np.asarray(out["frames"], np.float32) / 255.0
  gt = np.asarray(truth.frames, np.float32) / 255.0
  masks = np.asarray(truth.dynamic_masks)
  scored = np.arange(t) >= first
  revisits = scored & (np.asarray(pairs) >= 0)
  static = np.asarray(_masked_psnr(gen, gt, masks == 0))
  ghost = ghost_regions(masks, truth.depths, truth.intrinsics, truth.poses_c2w)
  ghost_frames = scored & (ghost.sum(axis=(1, 2)) >= min_pixels)
  ghost_psnr = np.asarray(_masked_psnr(gen, gt, ghost))
  num = len(clip.object_tracks)
  visible = object_visibility(masks, num, min_pixels)
  events = reentry_events(visible, first, gap)
  frames = reentry_frames(visible, events, span)

  psnr, errors, detected, consistent, slot_errors = [], [], [], [], []
  slots, idents = out.get("object_positions"), out.get("object_idents")
  kept = [] if slots is None or not np.asarray(slots).shape[1] else slot_identity_kept(
      visible, clip.object_tracks, np.asarray(slots), np.asarray(idents), first, gap)
  colours = mean_colours(truth.frames, masks, num)
  for k, i in frames:
    region = masks[i] == k + 1
    psnr.append(float(_masked_psnr(gen[i], gt[i], ndimage.binary_dilation(region, np.ones((3, 3), bool)))))
    centroids = detect_centroids(out["dynamic"][i], out["depths"][i], truth.intrinsics[i], truth.poses_c2w[i])
    detected.append(len(centroids) > 0)
    if len(centroids):
      errors.append(float(np.linalg.norm(centroids - clip.object_tracks[k, i], axis=-1).min()))
    if slots is not None and (idents[i] >= 0).any():
      live = np.asarray(slots[i])[np.asarray(idents[i]) >= 0]
      slot_errors.append(float(np.linalg.norm(live - clip.object_tracks[k, i], axis=-1).min()))
    consistent.append(identity_consistent(out["frames"][i], region, k, colours, clip.background[i]))
  extra = {}
  if lpips is not None:  # revisit frames only: the frames the score is about
    extra["lpips_revisit"] = _nanmean(lpips(gen[revisits], gt[revisits]))
  return dict(**extra, static_psnr_revisit=_nanmean(static[revisits]), static_psnr_all=_nanmean(static[scored]),
              ghost_psnr=_nanmean(ghost_psnr[ghost_frames]), ghost_frames=int(ghost_frames.sum()),
              object_psnr_reentry=_nanmean(psnr), object_position_error_m=_nanmean(errors),
              object_detection_rate=_nanmean(detected), slot_position_error_m=_nanmean(slot_errors),
              slot_identity_kept=_nanmean(kept),
              identity_consistency=_nanmean(consistent),
              revisit_frames=int(revisits.sum()), reentry_events=len(events), reentry_frames=len(frames))


# ----------------------------------------------------------------------------- runner


class ObjectsRunner:
  """Generates and scores trajectories with each row of :data:`ROWS` asked for.

  One ``Rollout`` per row, built once and reused; the append-only ``mirage`` cloud gets the
  capacity of the longest trajectory.

  Args:
    config, ae, dn: the world model (``rollout.load_world_model``).
    rows: names of :data:`ROWS`.
    max_frames: the longest trajectory that will be run.
    pairing: keyword arguments of ``revisit.pair_revisits``.
    min_pixels, gap, span: re-entry events and frames (:func:`score_objects`).
    lpips: optional ``evaluation.lpips.LPIPS`` (:func:`score_objects`).
  """

  def __init__(self, config, ae, dn, rows: Sequence[str], max_frames: int, *,
               pairing: Mapping[str, Any] | None = None, min_pixels: int = 4, gap: int = 4, span: int = 3,
               lpips=None):
    check_rows(rows)
    base = families.world_model(config).memory_config(config)

    def make(spec):
      spec = dict(spec)
      backend = spec.pop("backend")
      return rollout.make_rollout(config, ae, dn, backend, **spec, **capacity_for(backend, max_frames, base))
    self.rows = {r: make(ROWS[r]) for r in rows}
    self.pairing = dict(pairing or {})
    self.scoring = dict(min_pixels=int(min_pixels), gap=int(gap), span=int(span), lpips=lpips)
    self.max_frames = int(max_frames)

  def run(self, clip: ObjectClip, *, seed: int = 0, video_dir: str | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Scores every row on one trajectory.

    Args:
      clip: a trajectory at the model's resolution with ``context`` >= 1.
      seed: sampling seed (the same for every row).
      video_dir: if set, writes ``<video_dir>/<name>/<row>.mp4``: generated | ground truth |
        predicted dynamic mask, and ``ground_truth.mp4``.
    Returns:
      dict: ``num_frames``, ``context``, ``num_objects``, ``events`` [(k, b)], ``COUNTS``,
      ``rows``: row -> scores (``SCALARS``).
    """
    truth = clip.truth
    if len(truth.frames) > self.max_frames:
      raise InputError(truth.name, "frames", f"{len(truth.frames)} frames, more than the runner's "
                       f"max_frames={self.max_frames}")
    pairs = revisit.pair_revisits(truth.poses_c2w, **self.pairing)
    given = (truth.frames[:truth.context], truth.depths[:truth.context])
    if video_dir:
      revisit.write_truth_video(video_dir, truth)
    rows, counts = {}, {}
    for name, r in self.rows.items():
      out = r.generate(truth.frames[0], truth.depths[0], truth.intrinsics, truth.poses_c2w,
                       seed=seed, progress=progress, oracle_frames=given,
                       depth_valid=truth.observed())
      scores = score_objects(out, clip, pairs, **self.scoring)
      counts = {c: scores.pop(c) for c in COUNTS}
      # Wall seconds per chunk after the first (which compiles); nothing blocks per chunk.
      scores.update(cache_bytes=out["cache_bytes"], chunk_seconds=out["chunk_seconds"])
      rows[name] = scores
      if video_dir:
        revisit._write_panel(video_dir, truth, name, out["frames"], out["dynamic"])  # pylint: disable=protected-access
    visible = object_visibility(truth.dynamic_masks, len(clip.object_tracks), self.scoring["min_pixels"])
    events = reentry_events(visible, max(truth.context, 1), self.scoring["gap"])
    return dict(num_frames=len(truth.frames), context=truth.context, num_objects=len(clip.object_tracks),
                events=[list(e) for e in events], **counts, rows=rows)


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Row -> mean over trajectories of each score (NaN-skipping), plus total ``COUNTS``.

  Args:
    results: trajectory name -> :meth:`ObjectsRunner.run`'s dict (or its JSON round trip).
  """
  as_float = lambda v: np.nan if v is None else float(v)
  rows = list(dict.fromkeys(r for res in results.values() for r in res["rows"]))
  # .get: lpips_revisit is there only when LPIPS was scored.
  summary = {row: {k: _nanmean([as_float(res["rows"][row].get(k)) for res in results.values()
                                if row in res["rows"]]) for k in SCALARS} for row in rows}
  summary.update({c: int(sum(res[c] for res in results.values())) for c in COUNTS})
  return summary


def claims(summary: Mapping[str, Any]) -> dict[str, bool]:
  """The project's moving-objects claims on a :func:`summarize` result (rows it lacks: none).

  Voxel keeps ghosts out (ghost-region PSNR >= the reference's cache); object slots bring
  objects back (object PSNR at re-entry +0.5 dB and identity consistency +0.1 over voxel
  without them: margins above the noise of a few dozen re-entry frames).
  """
  scores = {r: s for r, s in summary.items() if isinstance(s, dict)}
  get = lambda r, k: np.nan if scores[r].get(k) is None else float(scores[r][k])
  out = {}
  if {"voxel", "mirage"} <= set(scores):
    out["objects: voxel ghost-region PSNR >= mirage (no ghosts)"] = (
        get("voxel", "ghost_psnr") >= get("mirage", "ghost_psnr"))
  if {"voxel", "voxel+objects"} <= set(scores):
    for key, margin in (("object_psnr_reentry", 0.5), ("identity_consistency", 0.1)):
      out[f"objects: voxel+objects {key} >= voxel + {margin}"] = (
          get("voxel+objects", key) >= get("voxel", key) + margin)
  return out
