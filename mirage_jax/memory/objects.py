"""Object slots: moving content carried as latent billboards with their own 3D motion.

The static latent memory keeps moving content out (its ``static_mask``). Here that content
lives in a fixed number ``S`` of *slots*, each a latent appearance patch (p x p cells, C
channels, plus alpha) and a 3D state (world position, velocity in metres per frame, world
half extent). Per observed frame, ``detect`` turns the 4-connected components of dynamic
latent cells into detections; ``observe`` matches them greedily to the slots' predicted
positions, updates matched slots, opens slots for new objects and retires slots that stay
unseen. ``render`` draws every slot at its position predicted for the target frame as a
camera-facing square (a billboard) into target views; the caller composites the result
into the memory conditioning.

All functions are pure JAX with static shapes (the state never grows), so they jit, vmap
over clips and do not recompile as trajectories get longer. Shapes: ``S = cfg.slots``,
``M = cfg.max_detections``, ``p = cfg.patch``, latent grid (h, w, C), image (H, W).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirage_jax import geometry
from mirage_jax.errors import InputError, settings_dataclass
from mirage_jax.memory.config import live_bytes
from mirage_jax.memory.splatting import depth_at, latent_intrinsics, mask_at

_WHERE = "config.objects"


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ObjectConfig:
  """Static settings of the object slots (hashable: it rides in the state as aux data).

  Attributes:
    image_height, image_width: resolution the intrinsics refer to.
    latent_height, latent_width, latent_channels: latent grid (h, w, C); the image size
      must be an integer multiple of it.
    slots: S, number of slots (the state's size is fixed).
    patch: p, appearance stored as p x p latent cells plus alpha.
    max_detections: M, components kept per frame (largest first).
    min_cells: components with fewer latent cells are ignored.
    match_distance: metres, gate between a slot's predicted position and a detection.
    velocity_smoothing: EMA weight of the newest velocity estimate, in [0, 1].
    velocity_horizon: frames, time constant of the damped extrapolation.
    max_unseen: frames without a match before a slot is retired.
    miss_limit: frames predicted visible but not detected before a slot is retired.
    near: points with camera depth <= near are ignored.
  """
  image_height: int
  image_width: int
  latent_height: int
  latent_width: int
  latent_channels: int
  slots: int = 8
  patch: int = 4
  max_detections: int = 4
  min_cells: int = 1
  match_distance: float = 1.0
  velocity_smoothing: float = 0.5
  velocity_horizon: float = 8.0
  max_unseen: int = 96
  miss_limit: int = 2
  near: float = 1e-3

  def __post_init__(self):
    for name in ("image_height", "image_width", "latent_height", "latent_width", "latent_channels",
                 "slots", "patch", "max_detections", "min_cells", "max_unseen", "miss_limit"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(_WHERE, name, f"must be a positive integer, got {value!r}")
    if self.image_height % self.latent_height or self.image_width % self.latent_width:
      raise InputError(_WHERE, "latent_height", f"image {(self.image_height, self.image_width)} is not an "
                       f"integer multiple of the latent grid {(self.latent_height, self.latent_width)}")
    for name in ("match_distance", "velocity_horizon", "near"):
      if not getattr(self, name) > 0:
        raise InputError(_WHERE, name, f"must be > 0, got {getattr(self, name)!r}")
    if not 0.0 <= self.velocity_smoothing <= 1.0:
      raise InputError(_WHERE, "velocity_smoothing", f"must be in [0, 1], got {self.velocity_smoothing!r}")


def object_config(settings: Any) -> ObjectConfig:
  """An ``ObjectConfig`` from itself, an ``ml_collections.ConfigDict`` or a mapping."""
  return settings_dataclass(ObjectConfig, settings, _WHERE)


# ----------------------------------------------------------------------------- state


@struct.dataclass
class ObjectState:
  """Slots of one scene; vmap adds leading batch dims to every array.

  Attributes:
    valid: (S,) bool live slots.
    ident: (S,) int32 persistent object id (-1 for free slots).
    next_ident: () int32 id the next new object gets.
    position: (S, 3) float32 world position at ``last_seen``.
    velocity: (S, 3) float32 metres per frame.
    last_seen: (S,) int32 frame index of the last match.
    misses: (S,) int32 frames predicted visible but not detected since the last match.
    radius: (S,) float32 world half extent of the billboard square.
    appearance: (S, p, p, C) float32 latent patch (not premultiplied).
    alpha: (S, p, p) float32 coverage of the patch, in [0, 1].
  """
  valid: jax.Array
  ident: jax.Array
  next_ident: jax.Array
  position: jax.Array
  velocity: jax.Array
  last_seen: jax.Array
  misses: jax.Array
  radius: jax.Array
  appearance: jax.Array
  alpha: jax.Array
  cfg: ObjectConfig = struct.field(pytree_node=False)


class Detections(NamedTuple):
  """Objects found in one frame, largest first.

  Attributes:
    valid: (M,) bool. position: (M, 3) world centroid. radius: (M,) world half extent.
    appearance: (M, p, p, C). alpha: (M, p, p). cells: (M,) int32 latent cells.
  """
  valid: jax.Array
  position: jax.Array
  radius: jax.Array
  appearance: jax.Array
  alpha: jax.Array
  cells: jax.Array


def init(cfg) -> ObjectState:
  """Empty slots (``cfg``: ``ObjectConfig``, ConfigDict or mapping)."""
  cfg = object_config(cfg)
  s, p, c = cfg.slots, cfg.patch, cfg.latent_channels
  return ObjectState(valid=jnp.zeros((s,), bool), ident=jnp.full((s,), -1, jnp.int32),
                     next_ident=jnp.zeros((), jnp.int32), position=jnp.zeros((s, 3), jnp.float32),
                     velocity=jnp.zeros((s, 3), jnp.float32), last_seen=jnp.zeros((s,), jnp.int32),
                     misses=jnp.zeros((s,), jnp.int32), radius=jnp.zeros((s,), jnp.float32),
                     appearance=jnp.zeros((s, p, p, c), jnp.float32),
                     alpha=jnp.zeros((s, p, p), jnp.float32), cfg=cfg)


def nbytes(state: ObjectState) -> int:
  """Bytes of the live slots (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)


# ----------------------------------------------------------------------------- helpers


def _bilinear(table, index, x, y, clamp: bool):
  """Bilinear samples of a stack of grids.

  Args:
    table: (N, A, B, K) N grids of A rows and B columns.
    index: (...) int32 grid each sample reads.
    x, y: (...) continuous column / row coordinates (cell i's centre at i).
    clamp: True: samples outside take the nearest edge; False: the outside is zero.
  Returns:
    (..., K) samples.
  """
  n, a, b, k = table.shape
  flat = table.reshape(n * a * b, k)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  out = jnp.zeros(x.shape + (k,), table.dtype)
  for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
    weight = (1.0 - jnp.abs(x - xi)) * (1.0 - jnp.abs(y - yi))
    if not clamp:
      weight = jnp.where((xi >= 0) & (xi <= b - 1) & (yi >= 0) & (yi <= a - 1), weight, 0.0)
    cell = (index * a + jnp.clip(yi, 0, a - 1).astype(jnp.int32)) * b + jnp.clip(xi, 0, b - 1).astype(jnp.int32)
    out = out + weight[..., None] * flat[cell]
  return out


# Under vmap a while_loop's predicate becomes an ``any`` over the batch (every example runs
# until the slowest converges; on a batch split over devices, a collective per iteration).
# sequential_vmap maps a batch through one loop per example instead (same labels: a
# converged example is a fixed point of ``step``).
@jax.custom_batching.sequential_vmap
def _components(mask):
  """4-connected components of a (h, w) bool mask; batched by ``vmap``, one loop per example.

  Returns:
    (h, w) int32: per masked cell the smallest flat index in its component; h * w elsewhere.
  """
  h, w = mask.shape
  n = h * w
  start = jnp.where(mask, jnp.arange(n, dtype=jnp.int32).reshape(h, w), n)

  def step(carry):
    labels, _ = carry
    pad = jnp.pad(labels, 1, constant_values=n)
    nb = jnp.minimum(jnp.minimum(pad[:-2, 1:-1], pad[2:, 1:-1]), jnp.minimum(pad[1:-1, :-2], pad[1:-1, 2:]))
    new = jnp.where(mask, jnp.minimum(labels, nb), n)
    # Pointer jumping: a label names a cell of the same component whose label is no larger,
    # so reading that cell's label shortcuts long chains (log instead of linear iterations).
    new = jnp.append(new.reshape(-1), n)[new]
    return new, jnp.any(new != labels)

  labels, _ = jax.lax.while_loop(lambda c: c[1], step, (start, jnp.array(True)))
  return labels


def _focal(K):
  """(..., 2) focal lengths (fx, fy) of (..., 3, 3) intrinsics."""
  return jnp.stack([K[..., 0, 0], K[..., 1, 1]], axis=-1)


# ----------------------------------------------------------------------------- detect


def detect(cfg: ObjectConfig, latents, depth, intrinsics, c2w, dynamic) -> Detections:
  """Objects in one frame: the ``M`` largest 4-connected components of dynamic latent cells.

  Each detection's appearance is the square around the projection of its world centroid
  that just contains its cells (half size ``radius * f / z``), resampled to p x p; using the
  same square as ``render`` makes a read from the observing camera give the patch back.

  Args:
    latents: (h, w, C). depth: (H, W) or (h, w) metric z-depth.
    intrinsics: (3, 3) of the image resolution. c2w: (4, 4).
    dynamic: (H, W) or (h, w) bool, True where content moves (a latent cell is dynamic if
      any of its pixels is).
  Returns:
    ``Detections`` with (M, ...) fields; a detection is valid when it has at least
    ``min_cells`` cells and a finite depth > near.
  """
  h, w, m, p = cfg.latent_height, cfg.latent_width, cfg.max_detections, cfg.patch
  mask = ~mask_at(~dynamic[None].astype(bool), h, w)[0]
  d = depth_at(depth[None].astype(jnp.float32), h, w)[0]
  K = latent_intrinsics(cfg, intrinsics)
  labels = _components(mask)
  sizes = jnp.zeros((h * w + 1,), jnp.int32).at[labels.reshape(-1)].add(1)[:-1]
  cells, roots = jax.lax.top_k(sizes, m)
  member = (labels[None] == roots[:, None, None]) & (cells >= cfg.min_cells)[:, None, None]  # (M, h, w)

  points = geometry.unproject_depth(d, K, c2w)  # (h, w, 3)
  good = member & (jnp.isfinite(d) & (d > cfg.near) & jnp.all(jnp.isfinite(points), -1))[None]
  count = good.sum((1, 2))
  total = jnp.where(good[..., None], points[None], 0.0).sum((1, 2))
  position = total / jnp.maximum(count, 1)[:, None]
  uv, z = geometry.project_points(position, K, c2w)  # (M, 2), (M,)
  valid = (cells >= cfg.min_cells) & (count > 0) & (z > cfg.near)
  uv = jnp.where(valid[:, None], uv, 0.0)
  z = jnp.where(valid, z, 1.0)

  # Smallest world half extent whose projected square (centred on the centroid) holds every cell.
  focal = _focal(K)
  reach = (jnp.abs(geometry.pixel_grid(h, w)[None] - uv[:, None, None]) + 0.5) / focal  # (M, h, w, 2)
  reach = jnp.where(member, reach.max(-1), 0.0).max((1, 2))
  radius = jnp.where(valid, reach * z, 0.0)

  half = radius[:, None] * focal / z[:, None]  # (M, 2) latent pixels
  t = (jnp.arange(p, dtype=jnp.float32) + 0.5) * (2.0 / p) - 1.0
  x = uv[:, 0, None, None] + half[:, 0, None, None] * t[None, None, :] - 0.5  # (M, p, p)
  y = uv[:, 1, None, None] + half[:, 1, None, None] * t[None, :, None] - 0.5
  # Premultiplied by the component's mask, so background latents do not bleed into edges.
  alpha_cells = member.astype(jnp.float32)[..., None]
  table = jnp.concatenate([latents.astype(jnp.float32)[None] * alpha_cells, alpha_cells], -1)
  sample = _bilinear(table, jnp.broadcast_to(jnp.arange(m)[:, None, None], x.shape), x, y, clamp=False)
  alpha = jnp.where(valid[:, None, None], sample[..., -1], 0.0)
  appearance = jnp.where(alpha[..., None] > 0, sample[..., :-1] / jnp.maximum(alpha, 1e-6)[..., None], 0.0)
  return Detections(valid=valid, position=jnp.where(valid[:, None], position, 0.0), radius=radius,
                    appearance=appearance, alpha=alpha, cells=jnp.where(valid, cells, 0))


# ----------------------------------------------------------------------------- observe


def predict(state: ObjectState, frame_index):
  """(S, 3) slot positions at ``frame_index`` (() int), damped constant velocity.

  ``p + v * tau * (1 - exp(-dt / tau))`` with ``dt = frame_index - last_seen`` (0 for
  earlier frames) and ``tau = velocity_horizon``: the object coasts ``v * tau`` at most.
  """
  tau = state.cfg.velocity_horizon
  dt = jnp.maximum(frame_index - state.last_seen, 0).astype(jnp.float32)
  return state.position + state.velocity * (-tau * jnp.expm1(-dt / tau))[:, None]


def _greedy_match(cost):
  """One-to-one matching, cheapest pair first.

  Args:
    cost: (S, M) float32, inf where a pair may not match.
  Returns:
    (S,) int32 detection matched to each slot (-1 for none).
  """
  s, m = cost.shape

  def body(_, carry):
    cost, match = carry
    k = jnp.argmin(cost)
    i, j = k // m, k % m
    ok = jnp.isfinite(cost[i, j])
    match = match.at[i].set(jnp.where(ok, j, match[i]))
    cost = jnp.where(ok, cost.at[i, :].set(jnp.inf).at[:, j].set(jnp.inf), cost)
    return cost, match

  _, match = jax.lax.fori_loop(0, min(s, m), body, (cost, jnp.full((s,), -1, jnp.int32)))
  return match


def _visible(cfg: ObjectConfig, positions, radius, depth, K, c2w):
  """(S,) bool: the slot's centre projects into the frame and nothing observed is in front.

  Args:
    positions: (S, 3). radius: (S,). depth: (h, w) observed depth at latent resolution.
    K: (3, 3) latent intrinsics. c2w: (4, 4).
  """
  h, w = depth.shape
  uv, z = geometry.project_points(positions, K, c2w)
  u = jnp.clip(uv[:, 0], -1.0, w + 1.0)  # clip before the int cast (huge near the camera plane)
  v = jnp.clip(uv[:, 1], -1.0, h + 1.0)
  inside = (z > cfg.near) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
  observed = depth[jnp.clip(v, 0, h - 1).astype(jnp.int32), jnp.clip(u, 0, w - 1).astype(jnp.int32)]
  # Occluded only when the observed surface is clearly in front of the whole object; missing
  # depth (NaN, inf) occludes nothing.
  return inside & ~(observed < z - radius)


def _observe_frame(state: ObjectState, frame):
  """One frame of ``observe``; ``frame`` holds one frame of each of its arrays."""
  cfg = state.cfg
  latents, depth, intrinsics, c2w, dynamic, t, observed = frame
  det = detect(cfg, latents, depth, intrinsics, c2w, dynamic)
  pred = predict(state, t)
  dist = jnp.linalg.norm(pred[:, None] - det.position[None], axis=-1)  # (S, M)
  allowed = state.valid[:, None] & det.valid[None] & (dist <= cfg.match_distance)
  match = _greedy_match(jnp.where(allowed, dist, jnp.inf))
  matched = match >= 0
  j = jnp.maximum(match, 0)

  # Matched slots take the detection; velocity from the last observed (not predicted) position.
  dt = jnp.maximum(t - state.last_seen, 1).astype(jnp.float32)
  a = cfg.velocity_smoothing
  step = (det.position[j] - state.position) / dt[:, None]
  if_matched = lambda new, old: jnp.where(matched.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  velocity = if_matched(a * step + (1 - a) * state.velocity, state.velocity)
  position = if_matched(det.position[j], state.position)
  # A generated frame moves the track on but keeps the observed look (no drift of appearance).
  relook = matched & observed
  looks = lambda new, old: jnp.where(relook.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  radius, appearance, alpha = (looks(x[j], y) for x, y in ((det.radius, state.radius),
                                                           (det.appearance, state.appearance),
                                                           (det.alpha, state.alpha)))
  last_seen = jnp.where(matched, t, state.last_seen)

  # Unmatched slots that should have been seen count a miss; stale slots retire.
  K = latent_intrinsics(cfg, intrinsics)
  d = depth_at(depth[None].astype(jnp.float32), cfg.latent_height, cfg.latent_width)[0]
  seen = _visible(cfg, pred, state.radius, d, K, c2w)
  misses = jnp.where(matched, 0, state.misses + (state.valid & seen & observed).astype(jnp.int32))
  valid = state.valid & (misses < cfg.miss_limit) & (t - last_seen <= cfg.max_unseen)

  # Unmatched detections (largest first) open slots: free ones first, then the least recently
  # seen; slots matched in this frame are never taken.
  s = cfg.slots
  top = jnp.iinfo(jnp.int32).max
  key = jnp.where(matched, top, jnp.where(valid, last_seen, jnp.iinfo(jnp.int32).min))
  order = jnp.argsort(key, stable=True)
  fresh = det.valid & observed & ~jnp.any(match[:, None] == jnp.arange(cfg.max_detections)[None],
                                          axis=0)
  rank = jnp.cumsum(fresh) - 1
  take = fresh & (rank < jnp.sum(~matched))
  target = jnp.where(take, order[jnp.minimum(rank, s - 1)], s)
  new_det = jnp.full((s,), -1, jnp.int32).at[target].set(jnp.arange(cfg.max_detections, dtype=jnp.int32),
                                                         mode="drop")
  new = new_det >= 0
  k = jnp.maximum(new_det, 0)
  if_new = lambda x, y: jnp.where(new.reshape((-1,) + (1,) * (y.ndim - 1)), x, y)
  valid = valid | new
  ident = jnp.where(valid, if_new(state.next_ident + rank[k].astype(jnp.int32), state.ident), -1)
  return ObjectState(valid=valid, ident=ident, next_ident=state.next_ident + jnp.sum(take, dtype=jnp.int32),
                     position=if_new(det.position[k], position), velocity=if_new(jnp.zeros_like(velocity), velocity),
                     last_seen=jnp.where(new, t, last_seen), misses=jnp.where(new, 0, misses),
                     radius=if_new(det.radius[k], radius), appearance=if_new(det.appearance[k], appearance),
                     alpha=if_new(det.alpha[k], alpha), cfg=cfg), None


def _check(cfg: ObjectConfig, where: str, f: int, **arrays):
  """Shape checks at the entry points (static shapes, so they run under jit too)."""
  h, w, c = cfg.latent_height, cfg.latent_width, cfg.latent_channels
  full, small = (f, cfg.image_height, cfg.image_width), (f, h, w)
  allowed = {"latents": [(f, h, w, c)], "depth": [full, small], "intrinsics": [(f, 3, 3)],
             "c2w": [(f, 4, 4)], "dynamic": [full, small], "frame_index": [(f,)],
             "observed": [(f,)]}
  for name, array in arrays.items():
    if tuple(array.shape) not in allowed[name]:
      raise InputError(where, name, f"expected shape {' or '.join(map(str, allowed[name]))}, "
                       f"got {tuple(array.shape)}")


def observe(state: ObjectState, latents, depth, intrinsics, c2w, dynamic, frame_index,
            observed=None) -> ObjectState:
  """Folds F frames, in order, into the slots.

  Per frame: detect; predict the slots to the frame; match greedily (closest pair first,
  within ``match_distance``); a matched slot takes the detection's position, radius,
  appearance and alpha, and blends its velocity (EMA of ``(new - old) / dt``); an unmatched
  detection opens a slot with a fresh ident; an unmatched slot predicted visible (in the
  frame, not behind observed depth) counts a miss and retires at ``miss_limit``; slots
  unseen for more than ``max_unseen`` frames retire.

  A frame that was generated, not observed, only moves matched tracks on (position,
  velocity, last seen): the model's own output neither opens slots (a hallucinated blob is
  not an object anyone saw), nor retires them (a missed re-draw is not evidence the object
  left), nor replaces their appearance (generation would drift it).

  Args:
    latents: (F, h, w, C). depth: (F, H, W) or (F, h, w) metric z-depth.
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    dynamic: (F, H, W) or (F, h, w) bool, True where content moves.
    frame_index: (F,) int frame numbers.
    observed: (F,) bool, False for generated frames (default: all observed).
  Returns:
    The new state.
  """
  f = latents.shape[0]
  observed = jnp.ones((f,), bool) if observed is None else jnp.asarray(observed, bool)
  _check(state.cfg, "objects.observe", f, latents=latents, depth=depth, intrinsics=intrinsics,
         c2w=c2w, dynamic=dynamic, frame_index=frame_index, observed=observed)
  frames = (latents, depth, intrinsics, c2w, dynamic, jnp.asarray(frame_index, jnp.int32), observed)
  state, _ = jax.lax.scan(_observe_frame, state, frames)
  return state


# ----------------------------------------------------------------------------- render


def render(state: ObjectState, intrinsics, c2w, frame_index):
  """Draws the slots, at their predicted positions, into T target views at latent resolution.

  Each slot is a camera-facing square of world half extent ``radius`` (``radius * f / z``
  latent cells) whose cells sample the patch bilinearly; a cell is covered where alpha
  > 0.5 and the nearest covering slot wins it.

  Args:
    intrinsics: (T, 3, 3) of the image resolution. c2w: (T, 4, 4). frame_index: (T,) int.
  Returns:
    latents (T, h, w, C) float32 (zeros where uncovered), coverage (T, h, w) bool,
    depth (T, h, w) camera z of the winning slot (0 where uncovered),
    ident (T, h, w) int32 winning slot's ident (-1 where uncovered).
  """
  cfg = state.cfg
  _check(cfg, "objects.render", intrinsics.shape[0], intrinsics=intrinsics, c2w=c2w,
         frame_index=frame_index)
  h, w, s, p = cfg.latent_height, cfg.latent_width, cfg.slots, cfg.patch
  K = latent_intrinsics(cfg, intrinsics)
  table = jnp.concatenate([state.appearance * state.alpha[..., None], state.alpha[..., None]], -1)
  slot_of = jnp.broadcast_to(jnp.arange(s)[:, None, None], (s, h, w))

  def one(K1, c2w1, t):
    uv, z = geometry.project_points(predict(state, t), K1, c2w1)  # (S, 2), (S,)
    front = state.valid & (z > cfg.near)
    half = jnp.maximum(state.radius[:, None] * _focal(K1) / jnp.maximum(z, cfg.near)[:, None], 1e-6)
    # Patch coordinates of every cell centre in every slot's square (its edges at -0.5, p - 0.5).
    corner = (uv - half)[:, None, None]
    local = (geometry.pixel_grid(h, w)[None] - corner) / (2 * half[:, None, None]) * p - 0.5
    local = jnp.where(front[:, None, None, None], local, -2.0)  # off every patch
    alpha = _bilinear(table[..., -1:], slot_of, local[..., 0], local[..., 1], clamp=False)[..., 0]
    hit = front[:, None, None] & (alpha > 0.5)
    win = jnp.argmin(jnp.where(hit, z[:, None, None], jnp.inf), axis=0)  # (h, w)
    covered = hit.any(0)
    lw = jnp.take_along_axis(local, win[None, ..., None], axis=0)[0]
    sample = _bilinear(table, win, lw[..., 0], lw[..., 1], clamp=False)
    image = sample[..., :-1] / jnp.maximum(sample[..., -1:], 1e-6)
    return (jnp.where(covered[..., None], image, 0.0), covered, jnp.where(covered, z[win], 0.0),
            jnp.where(covered, state.ident[win], -1))

  return jax.vmap(one)(K, c2w, jnp.asarray(frame_index, jnp.int32))
