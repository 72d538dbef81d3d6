"""Vectorised NumPy ray casting of procedural scenes: RGB, z-depth and moving-object masks.

Rays of all pixels of a batch of frames are intersected with every primitive at once
(floor and ceiling planes, axis-aligned boxes by the slab method, vertical cylinders,
spheres); the nearest hit is shaded. Colours are a function of the 3D surface point (and
its normal) only, so a static surface point has the same colour in every view.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.procedural import layout
from data_pipelines.procedural.layout import Scene
from mirage_jax import geometry

FAR = 50.0                 # depth of rays that hit nothing (cannot happen inside a closed layout)
AMBIENT = 0.4
SUN = np.array([0.35, 0.8, 0.5]) / np.linalg.norm([0.35, 0.8, 0.5])  # fixed light direction
_MAX_PAIRS = 1 << 21       # ray-primitive pairs per intersection chunk (bounds temporaries)

# Surface kinds of a hit.
FLOOR, CEILING, BOX, CYLINDER, DYN_BOX, DYN_SPHERE = range(6)


def render_views(scene: Scene, intrinsics, poses_c2w, height: int, width: int, time):
  """Renders views of a scene.

  Args:
    scene: the layout (and its moving objects).
    intrinsics: (T, 3, 3) pixels, OpenCV.
    poses_c2w: (T, 4, 4) OpenCV camera-to-world.
    height, width: image size.
    time: (T,) seconds, positions the moving objects.
  Returns:
    frames: (T, H, W, 3) uint8.
    depths: (T, H, W) float32 z-depth, in (0, FAR].
    dynamic_masks: (T, H, W) uint8, k for pixels showing moving object k (1-based), else 0.
  """
  K = np.asarray(intrinsics, np.float32)
  c2w = np.asarray(poses_c2w, np.float32)
  time = np.asarray(time, np.float64).reshape(-1)
  n = c2w.shape[0]
  # Camera rays have z = 1, so the ray parameter of a hit is its z-depth.
  rays = np.asarray(geometry.camera_rays(K, height, width), np.float32).reshape(n, -1, 3)
  dirs = rays @ np.swapaxes(c2w[:, :3, :3], 1, 2)             # R d for every pixel
  origins = c2w[:, :3, 3]
  dyn = _dynamic_geometry(scene, time)
  visible = [_in_view(scene.box_lo, scene.box_hi, c2w[f], K[f], height, width) for f in range(n)]
  hit = _cast(scene, dyn, origins, dirs, visible)
  rgb = _shade(scene, dyn, origins, dirs, np.sqrt(K[:, 0, 0] * K[:, 1, 1]), hit)
  frames = rgb.reshape(n, height, width, 3)
  depths = np.minimum(hit["t"], FAR).astype(np.float32).reshape(n, height, width)
  masks = hit["object"].reshape(n, height, width)
  return frames, depths, masks


# ----------------------------------------------------------------------------- moving objects


def _dynamic_geometry(scene: Scene, time: np.ndarray) -> dict:
  """Per-frame world-space parts of the moving objects.

  Returns a dict with box_lo, box_hi (T, Nb, 3), box_mat, box_obj (Nb,), sph_c (T, Ns, 3),
  sph_r, sph_mat, sph_obj (Ns,), ground (K, T, 3), rot (K, T, 3, 3).
  """
  n = time.shape[0]
  out = {k: [] for k in ("box_lo", "box_hi", "box_mat", "box_obj", "sph_c", "sph_r", "sph_mat",
                         "sph_obj", "ground", "rot")}
  for k, obj in enumerate(scene.objects):
    g = obj.ground(time)
    rot = obj.rotation(time)
    out["ground"].append(g)
    out["rot"].append(rot)
    for lo, hi, m in zip(obj.box_lo, obj.box_hi, obj.box_mat):
      out["box_lo"].append(g + lo)
      out["box_hi"].append(g + hi)
      out["box_mat"].append(m)
      out["box_obj"].append(k)
    for c, r, m in zip(obj.sph_c, obj.sph_r, obj.sph_mat):
      out["sph_c"].append(g + np.einsum("tij,j->ti", rot, c))
      out["sph_r"].append(r)
      out["sph_mat"].append(m)
      out["sph_obj"].append(k)
  stack = lambda xs, shape: np.stack(xs, 1).astype(np.float32) if xs else np.zeros(shape, np.float32)
  return {
      "box_lo": stack(out["box_lo"], (n, 0, 3)), "box_hi": stack(out["box_hi"], (n, 0, 3)),
      "box_mat": np.array(out["box_mat"], np.int32), "box_obj": np.array(out["box_obj"], np.int32),
      "sph_c": stack(out["sph_c"], (n, 0, 3)), "sph_r": np.array(out["sph_r"], np.float32),
      "sph_mat": np.array(out["sph_mat"], np.int32), "sph_obj": np.array(out["sph_obj"], np.int32),
      "ground": np.array(out["ground"], np.float32).reshape(-1, n, 3),
      "rot": np.array(out["rot"], np.float32).reshape(-1, n, 3, 3),
  }


# ----------------------------------------------------------------------------- intersection


def _in_view(lo, hi, c2w, K, height: int, width: int) -> np.ndarray:
  """Indices of the boxes lo, hi (N, 3) not entirely outside the view frustum of one camera.

  A box is dropped when all 8 corners lie behind the camera or beyond one side of the image
  (a conservative test: it never drops a visible box).
  """
  corners = np.stack([np.where(np.array(m, bool), hi[:, None], lo[:, None])[:, 0]
                      for m in np.ndindex(2, 2, 2)], 1)                      # (N, 8, 3)
  cam = (corners - c2w[:3, 3]) @ c2w[:3, :3]                              # world -> camera
  x, y, z = cam[..., 0], cam[..., 1], cam[..., 2]
  # Image sides as planes through the camera centre: x/z within [-cx, W - cx] / fx (+ slack).
  l, r = -K[0, 2] / K[0, 0], (width - K[0, 2]) / K[0, 0]
  t, b = -K[1, 2] / K[1, 1], (height - K[1, 2]) / K[1, 1]
  out = ((z <= 0).all(1) | (x < l * z - 1e-3).all(1) | (x > r * z + 1e-3).all(1)
         | (y < t * z - 1e-3).all(1) | (y > b * z + 1e-3).all(1))
  return np.flatnonzero(~out)


def _slab(origins, inv_dirs, lo, hi):
  """Nearest entry distance of rays into solid boxes.

  Args:
    origins: (F, 3). inv_dirs: (F, P, 3) reciprocal ray directions.
    lo, hi: (F or 1, N, 3) box corners.
  Returns:
    (F, P) nearest t (inf if no box is hit), (F, P) index of that box.
  """
  a_lo = (lo - origins[:, None]).astype(np.float32)     # (F, N, 3)
  a_hi = (hi - origins[:, None]).astype(np.float32)
  t_near = t_far = None
  for ax in range(3):
    inv = inv_dirs[:, :, ax, None]                      # (F, P, 1)
    t1 = inv * a_lo[:, None, :, ax]
    t2 = inv * a_hi[:, None, :, ax]
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    if t_near is None:
      t_near, t_far = near, far
    else:
      np.maximum(t_near, near, out=t_near)
      np.minimum(t_far, far, out=t_far)
  # The camera is never inside a solid, so a hit has 0 < t_near <= t_far.
  t_near[(t_near > t_far) | (t_near <= 1e-4)] = np.inf
  idx = np.argmin(t_near, axis=-1)
  return np.take_along_axis(t_near, idx[..., None], -1)[..., 0], idx


def _spheres(origins, dirs, centres, radii, planar: bool):
  """Nearest hit of rays with spheres (or, if ``planar``, infinite vertical cylinders).

  Args:
    origins: (F, 3). dirs: (F, P, 3).
    centres: (F or 1, S, 3) (only x, z used for cylinders). radii: (S,).
  Returns:
    (F, P) nearest t (inf if none), (F, P) index.
  """
  axes = [0, 2] if planar else [0, 1, 2]
  oc = (origins[:, None, axes] - centres[..., axes]).astype(np.float32)   # (F, S, A)
  d = dirs[..., axes]
  a = (d * d).sum(-1)[..., None]                                          # (F, P, 1)
  b = d @ np.swapaxes(np.broadcast_to(oc, (d.shape[0],) + oc.shape[1:]), 1, 2)   # (F, P, S)
  c = (oc * oc).sum(-1)[:, None, :] - (radii ** 2)[None, None]            # (F, 1, S)
  disc = b * b - a * c
  t = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-12)
  t[(disc < 0) | (t <= 1e-4)] = np.inf
  idx = np.argmin(t, axis=-1)
  return np.take_along_axis(t, idx[..., None], -1)[..., 0], idx


def _cast(scene: Scene, dyn: dict, origins, dirs, visible: list[np.ndarray]) -> dict:
  """Nearest hit per ray. Returns t, kind, index (T, P) and object (T, P) uint8 ids.

  ``visible[f]`` lists the static boxes that can appear in frame f (frustum culling).
  """
  n, p = dirs.shape[:2]
  # Nudge zero components so reciprocals stay finite (no 0 * inf = nan in the slab test).
  safe = np.where(np.abs(dirs) < 1e-9, 1e-9, dirs)
  inv = (1.0 / safe).astype(np.float32)
  t = np.full((n, p), np.inf, np.float32)
  kind = np.zeros((n, p), np.int8)
  index = np.zeros((n, p), np.int32)

  def take(t_new, k, idx):
    better = t_new < t
    t[better] = t_new[better]
    kind[better] = k
    index[better] = idx[better]

  def take_rows(f, t_new, k, idx):
    better = t_new < t[f]
    t[f, better] = t_new[better]
    kind[f, better] = k
    index[f, better] = idx[better]

  dy = dirs[..., 1]
  oy = origins[:, 1:2]
  zeros = np.zeros((n, p), np.int32)
  take(np.where(dy < 0, -oy / np.minimum(dy, -1e-9), np.inf).astype(np.float32), FLOOR, zeros)
  take(np.where(dy > 0, (scene.height - oy) / np.maximum(dy, 1e-9), np.inf).astype(np.float32),
       CEILING, zeros)

  for f, vis in enumerate(visible):   # static boxes: one frame at a time, culled
    if len(vis):
      t_new, idx = _slab(origins[f:f + 1], inv[f:f + 1], scene.box_lo[vis][None], scene.box_hi[vis][None])
      take_rows(f, t_new[0], BOX, vis[idx[0]])
  n_prims = len(scene.cyl_r) + dyn["box_lo"].shape[1] + len(dyn["sph_r"])
  frames_per_chunk = max(1, _MAX_PAIRS // max(1, p * n_prims))
  for f0 in range(0, n, frames_per_chunk):
    f = slice(f0, min(n, f0 + frames_per_chunk))
    o, d, iv = origins[f], dirs[f], inv[f]
    parts = []
    if len(scene.cyl_r):
      cyl = np.stack([scene.cyl_xz[:, 0], np.zeros_like(scene.cyl_r), scene.cyl_xz[:, 1]], -1)
      parts.append((CYLINDER, _spheres(o, d, cyl[None], scene.cyl_r, planar=True)))
    if dyn["box_lo"].shape[1]:
      parts.append((DYN_BOX, _slab(o, iv, dyn["box_lo"][f], dyn["box_hi"][f])))
    if len(dyn["sph_r"]):
      parts.append((DYN_SPHERE, _spheres(o, d, dyn["sph_c"][f], dyn["sph_r"], planar=False)))
    for k, (t_new, idx) in parts:
      better = t_new < t[f]
      t[f][better] = t_new[better]
      kind[f][better] = k
      index[f][better] = idx[better]

  obj = np.zeros((n, p), np.uint8)
  is_box, is_sph = kind == DYN_BOX, kind == DYN_SPHERE
  obj[is_box] = dyn["box_obj"][index[is_box]] + 1
  obj[is_sph] = dyn["sph_obj"][index[is_sph]] + 1
  return {"t": t, "kind": kind, "index": index, "object": obj}


# ----------------------------------------------------------------------------- textures


def _hash(i, j, salt: int = 0):
  """Deterministic pseudo-random values in [0, 1) for integer lattice points (int64 arrays)."""
  h = (i * 374761393 + j * 668265263 + salt * 1442695041) & 0xFFFFFFFF
  h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
  h ^= h >> 16
  return (h & 0xFFFF).astype(np.float32) / 65536.0


def _value_noise(u, v, salt: int = 0):
  """Smooth 2D value noise in [0, 1) (bilinear between lattice values, smoothstep weights)."""
  iu, iv = np.floor(u), np.floor(v)
  fu, fv = u - iu, v - iv
  iu, iv = iu.astype(np.int64), iv.astype(np.int64)
  su, sv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
  a, b = _hash(iu, iv, salt), _hash(iu + 1, iv, salt)
  c, d = _hash(iu, iv + 1, salt), _hash(iu + 1, iv + 1, salt)
  return (a + (b - a) * su) * (1 - sv) + (c + (d - c) * su) * sv


def _soft(x, sharpness):
  """Soft sign in [0, 1]: edges are blurred over ~1/sharpness so sampling stays stable."""
  return 0.5 + 0.5 * np.clip(x * sharpness, -1.0, 1.0)


def _fade(footprint, period):
  """Contrast kept for a pattern detail of size ``period`` seen with a pixel ``footprint``.

  1 while the detail spans several pixels, 0 once it would alias; so distant or grazing
  surfaces show the pattern's average colour instead of sampling noise (a cheap prefilter
  that views at similar distances agree on).
  """
  return np.clip(1.5 - 2.5 * footprint / period, 0.0, 1.0)


def _pattern(kind: int, u, v, s, local, footprint):
  """Pattern mix m in [0, 1] (0 = colour 1) and a brightness tint of colour 1, for one kind.

  Args:
    kind: pattern id (layout.PLAIN ...).
    u, v: (N,) surface coordinates (m). s: (N,) pattern scale (m).
    local: (N, 3) object-local point (used by OCTANTS).
    footprint: (N,) size of the pixel on the surface (m).
  """
  one = np.ones_like(u)
  if kind == layout.PLAIN:
    return 0.0 * u, one
  if kind == layout.CHECKER:
    m = _soft(np.sin(np.pi * u / s) * np.sin(np.pi * v / s), 4.0)
    return 0.5 + (m - 0.5) * _fade(footprint, s), one
  if kind == layout.STRIPES:
    m = _soft(np.sin(2 * np.pi * u / s), 2.0)
    return 0.5 + (m - 0.5) * _fade(footprint, s / 2), one
  if kind == layout.NOISE:
    lo = _value_noise(u / s, v / s, 7) - 0.5
    hi = _value_noise(2.3 * u / s, 2.3 * v / s, 8) - 0.5
    return 0.5 + 0.8 * lo * _fade(footprint, s) + 0.4 * hi * _fade(footprint, s / 2.3), one
  if kind in (layout.BRICKS, layout.PLANKS):
    # Bricks: rows of height s/2, alternate rows shifted by half a brick. Planks: long rows.
    bw, bh = (s, s / 2) if kind == layout.BRICKS else (3 * s, s / 2)
    row = np.floor(v / bh).astype(np.int64)
    shift = (row % 2) * 0.5 * bw + (kind == layout.PLANKS) * _hash(row, 0 * row, 3) * bw
    uu = (u + shift) / bw
    col = np.floor(uu)
    fu, fv = uu - col, v / bh - row
    gap = np.minimum(np.minimum(fu, 1 - fu) * bw, np.minimum(fv, 1 - fv) * bh)
    mortar = 1.0 - np.clip(gap / 0.035, 0.0, 1.0)    # 1 on the joints, fading out over 3.5 cm
    # Per-brick tint only on colour 1, so it meets the joints continuously.
    tint = 1.0 + (0.3 * _hash(col.astype(np.int64), row, 5) - 0.15) * _fade(footprint, bh)
    return 0.2 + (mortar - 0.2) * _fade(footprint, 0.1), tint
  if kind == layout.OCTANTS:
    r = np.linalg.norm(local, axis=-1) + 1e-6
    return _soft(local[:, 0] * local[:, 1] * local[:, 2] / r ** 3, 12.0), one
  raise ValueError(f"unknown pattern {kind}")


def _poster_colour(shape: int, a, b, half, edge, c1, c2):
  """Emblem-on-background colours with a dark frame, edges blurred over ``edge``.

  Args:
    shape: emblem id. a, b: (N,) normalised poster coordinates in [0, 1].
    half: poster half-size (m), turns normalised distances into metres.
    edge: (N,) blur width (m), at least the pixel footprint, so edges sample stably.
    c1, c2: (3,) background and emblem colours.
  Returns:
    (N, 3) colours and (N,) coverage of the poster (0 outside, 1 well inside).
  """
  x, y = 2 * a - 1, 2 * b - 1
  r = np.hypot(x, y)
  box = lambda size: size - np.maximum(np.abs(x), np.abs(y))   # signed distance to a square
  q = np.mod(a * 4, 2.0)
  sd = {
      layout.DISC: 0.55 - r,
      layout.RING: np.minimum(r - 0.3, 0.6 - r),
      layout.DIAMOND: (0.65 - np.abs(x) - np.abs(y)) / np.sqrt(2),
      layout.CROSS: np.minimum(np.maximum(0.18 - np.abs(x), 0.18 - np.abs(y)), box(0.7)),
      layout.TRIANGLE: np.minimum(y + 0.55, 0.6 * (0.6 - y) / 1.15 - np.abs(x)),
      layout.BARS: np.minimum(np.where(q < 1, np.minimum(q, 1 - q), -np.minimum(q - 1, 2 - q)) / 2,
                              0.7 - np.abs(y)),
  }[shape]
  cover = lambda dist: np.clip(dist * half / edge + 0.5, 0.0, 1.0)[:, None]
  col = c1[None] + (c2 - c1)[None] * cover(sd)
  col = col + (np.float32(0.12) - col) * cover(-box(0.88))   # dark frame
  return col, cover(box(1.0))[:, 0]


# ----------------------------------------------------------------------------- shading


def _shade(scene: Scene, dyn: dict, origins, dirs, focal, hit: dict) -> np.ndarray:
  """(T * P, 3) uint8 colours of the hits; ``focal`` (T,) is each frame's focal length (pixels)."""
  n, p = dirs.shape[:2]
  t = np.minimum(hit["t"], FAR).reshape(-1)
  kind, index = hit["kind"].reshape(-1), hit["index"].reshape(-1)
  frame = np.repeat(np.arange(n), p)
  d = dirs.reshape(-1, 3)
  pts = origins[frame] + t[:, None] * d
  normal = np.zeros_like(pts)
  local = pts.copy()              # texture coordinates frame: world, or the object's own
  axis = np.ones(len(t), np.int64)
  mat = np.zeros(len(t), np.int64)

  normal[kind == FLOOR, 1] = 1.0
  normal[kind == CEILING, 1] = -1.0

  for k, lo_all, hi_all in ((BOX, scene.box_lo[None], scene.box_hi[None]),
                            (DYN_BOX, dyn["box_lo"], dyn["box_hi"])):
    sel = np.flatnonzero(kind == k)
    if not sel.size:
      continue
    fr = frame[sel] if lo_all.shape[0] > 1 else np.zeros_like(sel)
    lo, hi = lo_all[fr, index[sel]], hi_all[fr, index[sel]]
    # The face hit is the axis whose entry distance is the largest.
    dd = np.where(np.abs(d[sel]) < 1e-9, 1e-9, d[sel])
    o = origins[frame[sel]]
    t_in = np.minimum((lo - o) / dd, (hi - o) / dd)
    ax = np.argmax(t_in, axis=-1)
    axis[sel] = ax
    normal[sel, ax] = -np.sign(dd[np.arange(sel.size), ax])
    if k == BOX:
      mat[sel] = scene.box_mat[index[sel]]
    else:
      mat[sel] = dyn["box_mat"][index[sel]]
      local[sel] = pts[sel] - dyn["ground"][dyn["box_obj"][index[sel]], frame[sel]]

  sel = np.flatnonzero(kind == CYLINDER)
  if sel.size:
    rel = pts[sel][:, [0, 2]] - scene.cyl_xz[index[sel]]
    r = scene.cyl_r[index[sel]]
    normal[sel, 0], normal[sel, 2] = rel[:, 0] / r, rel[:, 1] / r
    mat[sel] = scene.cyl_mat[index[sel]]
    axis[sel] = -1
    local[sel, 0] = np.arctan2(rel[:, 1], rel[:, 0]) * r   # unrolled around the pillar

  sel = np.flatnonzero(kind == DYN_SPHERE)
  if sel.size:
    part = index[sel]
    centre = dyn["sph_c"][frame[sel], part]
    normal[sel] = (pts[sel] - centre) / dyn["sph_r"][part][:, None]
    mat[sel] = dyn["sph_mat"][part]
    rot = dyn["rot"][dyn["sph_obj"][part], frame[sel]]
    local[sel] = np.einsum("nji,nj->ni", rot, pts[sel] - centre)   # R^T (p - c)
    axis[sel] = -2

  # Walls, floors and ceilings take the material of the region they face.
  region = scene.region_at(pts[:, [0, 2]] + normal[:, [0, 2]] * (layout.CELL / 2))
  region = np.maximum(region, 0)
  arch_wall = (kind == BOX) & (mat == layout.ARCH)
  mat[arch_wall] = scene.region_mats[region[arch_wall], 0]
  mat[kind == FLOOR] = scene.region_mats[region[kind == FLOOR], 1]
  mat[kind == CEILING] = scene.region_mats[region[kind == CEILING], 2]

  # Pixel size on the surface: z-depth / focal length, stretched at grazing angles.
  cos = np.abs((normal * d).sum(-1)) / np.linalg.norm(d, axis=-1)
  footprint = t / focal[frame] / np.maximum(cos, 0.2)

  # Surface (u, v): the two coordinates across the face's normal axis.
  u = np.where(axis == 0, local[:, 2], local[:, 0])
  v = np.where(axis == 1, local[:, 2], local[:, 1])
  albedo = np.zeros_like(pts)
  pattern = scene.mat_pattern[mat]
  for kd in np.unique(pattern):
    sel = np.flatnonzero(pattern == kd)
    m_ids = mat[sel]
    mix, tint = _pattern(int(kd), u[sel], v[sel], scene.mat_scale[m_ids], local[sel], footprint[sel])
    albedo[sel] = (scene.mat_c1[m_ids] * (tint * (1 - mix))[:, None]
                   + scene.mat_c2[m_ids] * mix[:, None])
  grain = 1.0 + 0.16 * (_value_noise(u / 0.37, v / 0.37, 11) - 0.5) * _fade(footprint, 0.37)
  albedo *= grain[:, None]   # subtle, breaks up flat areas

  sel = np.flatnonzero(arch_wall)
  for q in range(len(scene.poster_axis)):
    ax = scene.poster_axis[q]
    along = pts[sel, 2] if ax == 0 else pts[sel, 0]
    lo, hi = scene.poster_lo[q], scene.poster_hi[q]
    on = ((axis[sel] == ax) & (normal[sel, ax] == scene.poster_sign[q])
          & (np.abs(pts[sel, ax] - scene.poster_plane[q]) < 1e-3)
          & (along > lo[0] - 0.1) & (along < hi[0] + 0.1) & (pts[sel, 1] > lo[1] - 0.1)
          & (pts[sel, 1] < hi[1] + 0.1))   # a margin for the blurred edge
    if on.any():
      s = sel[on]
      a = (along[on] - lo[0]) / (hi[0] - lo[0])
      b = (pts[s, 1] - lo[1]) / (hi[1] - lo[1])
      half = 0.25 * ((hi - lo).sum())
      col, cover = _poster_colour(int(scene.poster_shape[q]), a, b, half, np.maximum(footprint[s], 0.01),
                                  scene.poster_c1[q], scene.poster_c2[q])
      albedo[s] += (col - albedo[s]) * cover[:, None]

  # Lambert: fixed sun direction + the region's ceiling light with distance falloff; both
  # depend on the surface point only (no view-dependent terms).
  to_light = scene.region_light[region] - pts
  dist = np.linalg.norm(to_light, axis=-1)
  lamp = np.maximum((normal * to_light).sum(-1) / np.maximum(dist, 1e-6), 0.0) / (1 + (dist / 3.5) ** 2)
  light = AMBIENT + 0.35 * np.maximum(normal @ SUN, 0.0) + 0.55 * lamp
  rgb = np.clip(albedo * light[:, None], 0.0, 1.0)
  return np.round(rgb * 255).astype(np.uint8)
