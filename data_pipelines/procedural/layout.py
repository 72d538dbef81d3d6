"""Procedural indoor layouts: rooms, hallways, furniture, textures and landmarks.

A layout lives on a grid of ``CELL``-sized squares in the xz plane (world frame: y up, floor
at y = 0). Rooms and hallways are free cells; every other cell is wall, and the walls that
border free space become axis-aligned boxes from the floor to the ceiling. Furniture is
boxes and vertical cylinders (pillars) standing on the floor. Everything a renderer needs
is in ``Scene``: NumPy arrays only, so a scene is cheap to build and to ship to workers.

Surfaces get their colour from a *material* (pattern + two colours + scale). Walls, floors
and ceilings take the material of the *region* (room or hallway) they face, so each room
has its own palette; posters (one per free wall span) make places recognisable.
"""

from __future__ import annotations

import colorsys
import collections
import dataclasses

import numpy as np

from mirage_jax.errors import InputError

CELL = 0.25            # metres per layout grid cell.
EYE_HEIGHT = 1.5       # camera height above the floor.
ARCH = -1              # box material meaning "wall/lintel: use the facing region's wall material".
WALK_RADIUS = 0.45     # clearance the path planner keeps from obstacles (m).

# Material patterns (see render.py).
PLAIN, CHECKER, STRIPES, BRICKS, NOISE, PLANKS, OCTANTS = range(7)
# Poster emblem shapes.
DISC, RING, DIAMOND, CROSS, TRIANGLE, BARS = range(6)


@dataclasses.dataclass
class MovingObject:
  """A rigid object moving back and forth along a floor segment.

  The object's ground point goes from ``a`` to ``b`` and back with a smooth (cosine) speed
  profile; its parts are boxes and spheres given relative to that ground point.

  Attributes:
    a, b: (2,) xz end points of the segment.
    period: seconds for a -> b -> a.
    phase: fraction of the period at time 0.
    box_lo, box_hi: (Nb, 3) part boxes, relative to the ground point.
    box_mat: (Nb,) material ids of the boxes.
    sph_c: (Ns, 3) sphere centres, relative to the ground point. sph_r: (Ns,) radii.
    sph_mat: (Ns,) material ids.
    rolls: whether the object rotates as it rolls (a ball); texture follows the rotation.
    centre_y: height of the reported track point (the object's middle).
  """
  a: np.ndarray
  b: np.ndarray
  period: float
  phase: float
  box_lo: np.ndarray
  box_hi: np.ndarray
  box_mat: np.ndarray
  sph_c: np.ndarray
  sph_r: np.ndarray
  sph_mat: np.ndarray
  rolls: bool
  centre_y: float

  def ground(self, time: np.ndarray) -> np.ndarray:
    """(T, 3) ground point at ``time`` (T,) seconds."""
    s = self.progress(time)
    xz = self.a[None] + s[:, None] * (self.b - self.a)[None]
    return np.stack([xz[:, 0], np.zeros_like(s), xz[:, 1]], axis=-1)

  def progress(self, time: np.ndarray) -> np.ndarray:
    """(T,) position along the segment in [0, 1] at ``time`` (T,)."""
    phi = 2.0 * np.pi * (np.asarray(time, np.float64) / self.period + self.phase)
    return 0.5 - 0.5 * np.cos(phi)

  def rotation(self, time: np.ndarray) -> np.ndarray:
    """(T, 3, 3) object-to-world rotation (rolling balls turn by distance / radius)."""
    t = np.asarray(time, np.float64)
    if not self.rolls:
      return np.broadcast_to(np.eye(3), (t.shape[0], 3, 3)).copy()
    d = self.b - self.a
    length = np.linalg.norm(d)
    u = np.array([d[0], 0.0, d[1]]) / length
    axis = np.cross(np.array([0.0, 1.0, 0.0]), u)
    angle = self.progress(t) * length / float(self.sph_r[0])
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3)[None] + s * kx[None] + (1 - c) * (kx @ kx)[None]

  def track(self, time: np.ndarray) -> np.ndarray:
    """(T, 3) world-space centre of the object."""
    g = self.ground(time)
    g[:, 1] = self.centre_y
    return g

  def footprint_radius(self) -> float:
    """Radius in xz of a circle around the ground point containing the object."""
    corners = np.abs(np.concatenate([self.box_lo, self.box_hi]))[:, [0, 2]]
    spheres = np.abs(self.sph_c[:, [0, 2]]) + self.sph_r[:, None]
    return float(np.linalg.norm(np.concatenate([corners, spheres]), axis=-1).max())


@dataclasses.dataclass
class Scene:
  """Static geometry, materials and landmarks of one layout, plus its moving objects.

  Attributes:
    height: ceiling height (m).
    regions: (GX, GZ) int32 region id of each grid cell (rooms first, then hallways); -1 = wall.
    rooms: (R, 4) float32 room rectangles ``x0, z0, x1, z1``.
    hallways: (C, 4) float32 hallway rectangles; hallway c is region R + c.
    doors: (C, 2) int32 the two rooms each hallway joins.
    box_lo, box_hi: (N, 3) float32 static solid boxes; box_mat: (N,) int32 (ARCH for walls).
    cyl_xz: (M, 2) float32 pillar axes; cyl_r: (M,) radii; cyl_mat: (M,) materials. Pillars
      span floor to ceiling.
    centre_items: (R, 3) float32 ``x, z, radius`` of an item standing in the middle of each
      room (radius 0 when the middle is empty).
    mat_pattern: (Q,) int32; mat_c1, mat_c2: (Q, 3) float32 in [0, 1]; mat_scale: (Q,).
    region_mats: (G, 3) int32 wall, floor, ceiling material of each region.
    region_light: (G, 3) float32 position of each region's ceiling light.
    poster_axis: (P,) int32 wall normal axis (0 = x, 2 = z); poster_sign: (P,) normal sign;
      poster_plane: (P,) wall coordinate; poster_lo, poster_hi: (P, 2) extent in
      (along-wall, y); poster_shape: (P,) emblem; poster_c1, poster_c2: (P, 3) colours.
    objects: moving objects (ids 1..K in masks, in this order).
  """
  height: float
  regions: np.ndarray
  rooms: np.ndarray
  hallways: np.ndarray
  doors: np.ndarray
  box_lo: np.ndarray
  box_hi: np.ndarray
  box_mat: np.ndarray
  cyl_xz: np.ndarray
  cyl_r: np.ndarray
  cyl_mat: np.ndarray
  centre_items: np.ndarray
  mat_pattern: np.ndarray
  mat_c1: np.ndarray
  mat_c2: np.ndarray
  mat_scale: np.ndarray
  region_mats: np.ndarray
  region_light: np.ndarray
  poster_axis: np.ndarray
  poster_sign: np.ndarray
  poster_plane: np.ndarray
  poster_lo: np.ndarray
  poster_hi: np.ndarray
  poster_shape: np.ndarray
  poster_c1: np.ndarray
  poster_c2: np.ndarray
  objects: tuple[MovingObject, ...] = ()

  @property
  def extent(self) -> np.ndarray:
    """(2,) size of the layout in x and z (m); the layout spans [0, extent]."""
    return np.array(self.regions.shape, np.float64) * CELL

  def region_at(self, xz: np.ndarray) -> np.ndarray:
    """(...,) region id of the cell containing each point xz (..., 2); -1 outside free space."""
    ij = np.floor(np.asarray(xz) / CELL).astype(np.int64)
    inside = ((ij >= 0) & (ij < np.array(self.regions.shape))).all(-1)
    ij = np.where(inside[..., None], ij, 0)
    return np.where(inside, self.regions[ij[..., 0], ij[..., 1]], -1)

  def floor_obstacles(self) -> tuple[np.ndarray, np.ndarray]:
    """Footprints of everything standing on the floor (walls, furniture; not lintels).

    Returns:
      rects: (N, 4) ``x0, z0, x1, z1``. circles: (M, 3) ``x, z, r``.
    """
    standing = self.box_lo[:, 1] < EYE_HEIGHT + 0.3
    rects = np.concatenate([self.box_lo[standing][:, [0, 2]], self.box_hi[standing][:, [0, 2]]], -1)
    circles = np.concatenate([self.cyl_xz, self.cyl_r[:, None]], -1)
    return rects.astype(np.float64), circles.astype(np.float64)

  def clearance_xz(self, xz: np.ndarray) -> np.ndarray:
    """(N,) distance in the floor plane from points xz (N, 2) to the nearest floor obstacle.

    Negative inside an obstacle (circles only; inside a box the distance is 0).
    """
    rects, circles = self.floor_obstacles()
    p = np.asarray(xz, np.float64)[:, None, :]
    d = np.maximum(np.maximum(rects[None, :, :2] - p, p - rects[None, :, 2:]), 0.0)
    dist = np.sqrt((d ** 2).sum(-1)).min(1)
    if len(circles):
      dc = np.linalg.norm(p - circles[None, :, :2], axis=-1) - circles[None, :, 2]
      dist = np.minimum(dist, dc.min(1))
    return dist


# ----------------------------------------------------------------------------- palettes


def _hsv(h, s, v) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


class _Materials:
  """Growing material table."""

  def __init__(self):
    self.pattern, self.c1, self.c2, self.scale = [], [], [], []

  def add(self, pattern: int, c1, c2, scale: float) -> int:
    self.pattern.append(pattern)
    self.c1.append(np.asarray(c1, np.float32))
    self.c2.append(np.asarray(c2, np.float32))
    self.scale.append(scale)
    return len(self.pattern) - 1

  def arrays(self):
    return (np.array(self.pattern, np.int32), np.stack(self.c1), np.stack(self.c2),
            np.array(self.scale, np.float32))


def _region_materials(rng: np.random.Generator, mats: _Materials, hue: float, hallway: bool):
  """(wall, floor, ceiling) material ids for one region with base ``hue``."""
  if hallway:
    wall = mats.add(STRIPES, _hsv(hue, 0.15, 0.85), _hsv(hue, 0.35, 0.65), rng.uniform(0.3, 0.5))
  else:
    kind = rng.choice([BRICKS, STRIPES, NOISE, CHECKER])
    wall = mats.add(int(kind), _hsv(hue, rng.uniform(0.35, 0.6), rng.uniform(0.7, 0.9)),
                    _hsv(hue + 0.04, rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.55)),
                    rng.uniform(0.35, 0.7))
  fhue = hue + rng.uniform(0.3, 0.7)
  fkind = int(rng.choice([CHECKER, PLANKS, NOISE]))
  floor = mats.add(fkind, _hsv(fhue, rng.uniform(0.3, 0.6), rng.uniform(0.55, 0.8)),
                   _hsv(fhue + 0.05, rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.45)),
                   rng.uniform(0.4, 0.8))
  ceil = mats.add(NOISE, _hsv(hue, 0.08, 0.92), _hsv(hue, 0.15, 0.78), 0.8)
  return wall, floor, ceil


# ----------------------------------------------------------------------------- plan -> scene


def _snap(x: float) -> float:
  return float(np.round(x / CELL) * CELL)


def _cells(rect) -> tuple[slice, slice]:
  x0, z0, x1, z1 = (int(round(v / CELL)) for v in rect)
  return slice(x0, x1), slice(z0, z1)


def _wall_boxes(regions: np.ndarray, height: float) -> tuple[np.ndarray, np.ndarray]:
  """Covers the wall cells that touch free space with few axis-aligned boxes.

  Greedy: take the first uncovered cell, grow along z, then along x while the whole strip
  is uncovered wall. Returns lo, hi (N, 3).
  """
  free = regions >= 0
  padded = np.pad(free, 1)
  near = np.zeros_like(free)
  for dx in (-1, 0, 1):
    for dz in (-1, 0, 1):
      near |= padded[1 + dx:1 + dx + free.shape[0], 1 + dz:1 + dz + free.shape[1]]
  todo = near & ~free
  lo, hi = [], []
  gx, gz = todo.shape
  for i in range(gx):
    for j in range(gz):
      if not todo[i, j]:
        continue
      j1 = j
      while j1 + 1 < gz and todo[i, j1 + 1]:
        j1 += 1
      i1 = i
      while i1 + 1 < gx and todo[i1 + 1, j:j1 + 1].all():
        i1 += 1
      todo[i:i1 + 1, j:j1 + 1] = False
      lo.append((i * CELL, 0.0, j * CELL))
      hi.append(((i1 + 1) * CELL, height, (j1 + 1) * CELL))
  return np.array(lo, np.float32).reshape(-1, 3), np.array(hi, np.float32).reshape(-1, 3)


@dataclasses.dataclass
class Plan:
  """What a layout is made of, before it becomes arrays.

  Attributes:
    extent: (x, z) size of the layout (m), multiples of CELL.
    height: ceiling height.
    rooms: room rectangles ``(x0, z0, x1, z1)`` (multiples of CELL).
    hallways: hallway rectangles; each touches two rooms.
    doors: the two room indices each hallway joins.
    door_height: top of the doorways (a lintel closes the opening above it).
    boxes: furniture boxes ``(lo (3,), hi (3,), material)``.
    pillars: ``(x, z, r, material)``.
    centre_items: per room ``(x, z, radius)`` of the item in its middle (radius 0: none).
  """
  extent: tuple[float, float]
  height: float
  rooms: list
  hallways: list
  doors: list
  door_height: float = 2.1
  boxes: list = dataclasses.field(default_factory=list)
  pillars: list = dataclasses.field(default_factory=list)
  centre_items: list | None = None


def scene_from_plan(plan: Plan, rng: np.random.Generator, mats: _Materials | None = None) -> Scene:
  """Builds the scene arrays (walls, lintels, palettes, posters) of a plan.

  Args:
    plan: rooms, hallways and furniture.
    rng: draws palettes and posters.
    mats: material table already holding the furniture materials (a fresh one if None).
  """
  mats = mats or _Materials()
  gx, gz = (int(round(e / CELL)) for e in plan.extent)
  regions = np.full((gx, gz), -1, np.int32)
  for r, rect in enumerate(plan.rooms):
    regions[_cells(rect)] = r
  for c, rect in enumerate(plan.hallways):
    sx, sz = _cells(rect)
    hall = regions[sx, sz]
    regions[sx, sz] = np.where(hall < 0, len(plan.rooms) + c, hall)
  if (regions[0] >= 0).any() or (regions[-1] >= 0).any() or (regions[:, 0] >= 0).any() or (
      regions[:, -1] >= 0).any():
    raise InputError("procedural layout", "rooms", "free space must not touch the layout border")

  box_lo, box_hi = _wall_boxes(regions, plan.height)
  box_mat = [ARCH] * len(box_lo)
  # Lintels: a one-cell-thick beam above each hallway end, so openings read as doorways.
  lintel_lo, lintel_hi = [], []
  for rect, (ra, rb) in zip(plan.hallways, plan.doors):
    x0, z0, x1, z1 = rect
    for room in (plan.rooms[ra], plan.rooms[rb]):
      if np.isclose(room[2], x0) or np.isclose(room[0], x1):    # room on the -x / +x side
        x = x0 if np.isclose(room[2], x0) else x1 - CELL
        lintel_lo.append((x, plan.door_height, z0))
        lintel_hi.append((x + CELL, plan.height, z1))
      else:
        z = z0 if np.isclose(room[3], z0) else z1 - CELL
        lintel_lo.append((x0, plan.door_height, z))
        lintel_hi.append((x1, plan.height, z + CELL))
  lo = [box_lo, np.array(lintel_lo, np.float32).reshape(-1, 3)]
  hi = [box_hi, np.array(lintel_hi, np.float32).reshape(-1, 3)]
  box_mat += [ARCH] * len(lintel_lo)
  for b_lo, b_hi, m in plan.boxes:
    lo.append(np.asarray(b_lo, np.float32)[None])
    hi.append(np.asarray(b_hi, np.float32)[None])
    box_mat.append(m)

  # Region palettes: hues spread by the golden ratio so neighbouring rooms differ.
  hue0 = rng.uniform()
  n_regions = len(plan.rooms) + len(plan.hallways)
  region_mats = np.array([
      _region_materials(rng, mats, hue0 + 0.618 * g, hallway=g >= len(plan.rooms))
      for g in range(n_regions)], np.int32)
  rects = list(plan.rooms) + list(plan.hallways)
  region_light = np.array([((r[0] + r[2]) / 2, plan.height - 0.3, (r[1] + r[3]) / 2) for r in rects],
                          np.float32)

  posters = _posters(rng, plan, regions)
  pattern, c1, c2, scale = mats.arrays()
  pillars = np.array([p[:3] for p in plan.pillars], np.float32).reshape(-1, 3)
  centre = plan.centre_items or [(0.0, 0.0, 0.0)] * len(plan.rooms)
  return Scene(
      height=float(plan.height), regions=regions,
      rooms=np.array(plan.rooms, np.float32).reshape(-1, 4),
      hallways=np.array(plan.hallways, np.float32).reshape(-1, 4),
      doors=np.array(plan.doors, np.int32).reshape(-1, 2),
      box_lo=np.concatenate(lo), box_hi=np.concatenate(hi), box_mat=np.array(box_mat, np.int32),
      cyl_xz=pillars[:, :2].copy(), cyl_r=pillars[:, 2].copy(),
      cyl_mat=np.array([p[3] for p in plan.pillars], np.int32),
      centre_items=np.array(centre, np.float32).reshape(-1, 3),
      mat_pattern=pattern, mat_c1=c1, mat_c2=c2, mat_scale=scale,
      region_mats=region_mats, region_light=region_light, **posters)


def _posters(rng: np.random.Generator, plan: Plan, regions: np.ndarray) -> dict:
  """One poster on each room wall span that has no doorway and no tall furniture in front."""
  tall = [(b[0], b[1]) for b in plan.boxes if b[1][1] > 1.25]
  out = collections.defaultdict(list)
  designs = rng.permutation(6 * 8)   # distinct (shape, colour) pairs
  k = 0
  for x0, z0, x1, z1 in plan.rooms:
    # (normal axis, normal sign, wall coordinate, span along the wall, outside cell offset)
    walls = [(0, 1.0, x0, (z0, z1)), (0, -1.0, x1, (z0, z1)),
             (2, 1.0, z0, (x0, x1)), (2, -1.0, z1, (x0, x1))]
    for axis, sign, plane, (s0, s1) in walls:
      width = rng.uniform(0.6, 1.0)
      centre = rng.uniform(s0 + 0.3 + width / 2, s1 - 0.3 - width / 2)
      u0, u1 = centre - width / 2, centre + width / 2
      # Cells just behind the wall along the poster must be wall (no doorway there).
      us = np.arange(u0, u1, CELL / 2)
      behind = plane - sign * CELL / 2
      xz = np.stack([np.full_like(us, behind), us], -1) if axis == 0 else np.stack(
          [us, np.full_like(us, behind)], -1)
      ij = np.floor(xz / CELL).astype(int)
      if (regions[ij[:, 0], ij[:, 1]] >= 0).any():
        continue
      blocked = False
      for lo, hi in tall:
        near = lo[axis] - 0.8 < plane < hi[axis] + 0.8
        ta = 2 if axis == 0 else 0
        if near and lo[ta] < u1 and hi[ta] > u0:
          blocked = True
      if blocked:
        continue
      shape, hue_i = divmod(int(designs[k % len(designs)]), 8)
      k += 1
      h = hue_i / 8 + rng.uniform(-0.03, 0.03)
      y0 = rng.uniform(1.25, 1.4)
      out["poster_axis"].append(axis)
      out["poster_sign"].append(sign)
      out["poster_plane"].append(plane)
      out["poster_lo"].append((u0, y0))
      out["poster_hi"].append((u1, y0 + rng.uniform(0.55, 0.75)))
      out["poster_shape"].append(shape)
      out["poster_c1"].append(_hsv(h + 0.5, 0.25, 0.95))
      out["poster_c2"].append(_hsv(h, 0.9, 0.85))
  dtypes = {"poster_axis": np.int32, "poster_shape": np.int32}
  widths = {"poster_lo": 2, "poster_hi": 2, "poster_c1": 3, "poster_c2": 3}
  return {key: np.array(out[key], dtypes.get(key, np.float32)).reshape((-1, widths[key]) if key in widths
                                                                       else (-1,))
          for key in ("poster_axis", "poster_sign", "poster_plane", "poster_lo", "poster_hi",
                      "poster_shape", "poster_c1", "poster_c2")}


# ----------------------------------------------------------------------------- generator


def _overlaps(a, b, pad: float) -> bool:
  return a[0] - pad < b[2] and b[0] - pad < a[2] and a[1] - pad < b[3] and b[1] - pad < a[3]


def generate_plan(rng: np.random.Generator) -> tuple[Plan, _Materials]:
  """Random plan: 2-4 rooms on a 2x2 grid of slots, hallways between neighbours, furniture.

  Returns the plan and the material table holding its furniture materials.
  """
  n_rooms = int(rng.integers(2, 5))
  slots = [(0, 0), (1, 0), (0, 1), (1, 1)]
  if n_rooms == 2:
    slots = [(0, 0), (1, 0)] if rng.uniform() < 0.5 else [(0, 0), (0, 1)]
  elif n_rooms == 3:
    slots.pop(int(rng.integers(4)))
  margin = 1.0
  # Slot sizes are multiples of 0.5 m so slot centres fall on the grid.
  col_w = [float(np.round(rng.uniform(6.0, 8.5) * 2) / 2) for _ in range(2)]
  row_w = [float(np.round(rng.uniform(6.0, 8.5) * 2) / 2) for _ in range(2)]
  col_x = [margin, margin + col_w[0]]
  row_z = [margin, margin + row_w[0]]
  used_cols = max(s[0] for s in slots) + 1
  used_rows = max(s[1] for s in slots) + 1
  extent = (_snap(2 * margin + sum(col_w[:used_cols])), _snap(2 * margin + sum(row_w[:used_rows])))
  height = _snap(rng.uniform(2.6, 3.2))

  rooms, band = [], 1.0   # every room covers its slot's central band, so hallways line up
  for cx, cz in slots:
    rect = []
    for start, size in ((col_x[cx], col_w[cx]), (row_z[cz], row_w[cz])):
      mid = start + size / 2
      w = _snap(rng.uniform(4.0, size - 0.5))
      lo_min, lo_max = max(start + 0.25, mid + band - w), min(start + size - 0.25 - w, mid - band)
      rect.append(_snap(rng.uniform(lo_min, max(lo_min, lo_max))))
      rect.append(rect[-1] + w)
    rooms.append((rect[0], rect[2], rect[1], rect[3]))

  edges = [(i, j) for i in range(len(slots)) for j in range(i + 1, len(slots))
           if abs(slots[i][0] - slots[j][0]) + abs(slots[i][1] - slots[j][1]) == 1]
  if len(edges) == 4 and rng.uniform() < 0.5:   # a 2x2 grid keeps its cycle half of the time
    edges.pop(int(rng.integers(4)))
  hallways, doors = [], []
  for i, j in edges:
    a, b = rooms[i], rooms[j]
    width = _snap(rng.uniform(1.25, 1.75))
    horizontal = slots[i][1] == slots[j][1]
    if horizontal:
      mid = row_z[slots[i][1]] + row_w[slots[i][1]] / 2
      z = _snap(rng.uniform(mid - band, mid + band - width))
      left, right = (a, b) if a[0] < b[0] else (b, a)
      hallways.append((left[2], z, right[0], z + width))
    else:
      mid = col_x[slots[i][0]] + col_w[slots[i][0]] / 2
      x = _snap(rng.uniform(mid - band, mid + band - width))
      low, high = (a, b) if a[1] < b[1] else (b, a)
      hallways.append((x, low[3], x + width, high[1]))
    doors.append((i, j))

  plan = Plan(extent=extent, height=height, rooms=rooms, hallways=hallways, doors=doors,
              door_height=_snap(rng.uniform(2.0, 2.3)))
  mats = _Materials()
  _furnish(rng, plan, mats)
  return plan, mats


def _furnish(rng: np.random.Generator, plan: Plan, mats: _Materials) -> None:
  """Adds furniture to every room, keeping doorway approaches and the room's walkways free."""
  plan.centre_items = []
  for r, room in enumerate(plan.rooms):
    x0, z0, x1, z1 = room
    keep_out = []  # doorway approaches: 1.5 m deep into the room, 0.5 m wider than the door
    for rect, pair in zip(plan.hallways, plan.doors):
      if r not in pair:
        continue
      hx0, hz0, hx1, hz1 = rect
      if np.isclose(hx1, x0):
        keep_out.append((x0, hz0 - 0.5, x0 + 1.5, hz1 + 0.5))
      elif np.isclose(hx0, x1):
        keep_out.append((x1 - 1.5, hz0 - 0.5, x1, hz1 + 0.5))
      elif np.isclose(hz1, z0):
        keep_out.append((hx0 - 0.5, z0, hx1 + 0.5, z0 + 1.5))
      else:
        keep_out.append((hx0 - 0.5, z1 - 1.5, hx1 + 0.5, z1))
    placed = []
    hue = rng.uniform()

    def material():
      kind = int(rng.choice([PLAIN, NOISE, STRIPES, CHECKER]))
      h = hue + rng.uniform(-0.15, 0.15)
      return mats.add(kind, _hsv(h, rng.uniform(0.4, 0.8), rng.uniform(0.45, 0.85)),
                      _hsv(h + 0.1, rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.45)),
                      rng.uniform(0.15, 0.4))

    # Middle of the room: a pillar or a table half of the time (orbit target).
    cx, cz = (x0 + x1) / 2, (z0 + z1) / 2
    centre = (cx, cz, 0.0)
    pick = rng.uniform()
    if pick < 0.25:
      rad = rng.uniform(0.2, 0.35)
      plan.pillars.append((cx, cz, rad, material()))
      centre = (cx, cz, rad)
      placed.append((cx - rad, cz - rad, cx + rad, cz + rad))
    elif pick < 0.5:
      hx, hz = rng.uniform(0.35, 0.55), rng.uniform(0.3, 0.45)
      _table(plan, (cx - hx, cz - hz, cx + hx, cz + hz), rng.uniform(0.7, 0.8), material())
      centre = (cx, cz, float(np.hypot(hx, hz)))
      placed.append((cx - hx, cz - hz, cx + hx, cz + hz))
    plan.centre_items.append(centre)

    # Against the walls: shelves, cabinets, tables.
    for _ in range(int(rng.integers(2, 5))):
      kind = rng.choice(["shelf", "cabinet", "table"])
      along = rng.uniform(0.8, 1.5)
      depth = {"shelf": rng.uniform(0.3, 0.45), "cabinet": rng.uniform(0.4, 0.6),
               "table": rng.uniform(0.6, 0.8)}[kind]
      side = int(rng.integers(4))
      if side < 2:   # against a wall of constant x
        zc = rng.uniform(z0 + along / 2 + 0.1, z1 - along / 2 - 0.1)
        xa = x0 + 0.05 if side == 0 else x1 - 0.05 - depth
        rect = (xa, zc - along / 2, xa + depth, zc + along / 2)
      else:
        xc = rng.uniform(x0 + along / 2 + 0.1, x1 - along / 2 - 0.1)
        za = z0 + 0.05 if side == 2 else z1 - 0.05 - depth
        rect = (xc - along / 2, za, xc + along / 2, za + depth)
      if any(_overlaps(rect, k, 0.0) for k in keep_out) or any(_overlaps(rect, p, 0.3) for p in placed):
        continue
      # Keep the walkway around the middle item wide enough to pass.
      if centre[2] > 0 and _overlaps(rect, (cx - centre[2], cz - centre[2], cx + centre[2], cz + centre[2]),
                                     1.1):
        continue
      placed.append(rect)
      if kind == "table":
        _table(plan, rect, rng.uniform(0.7, 0.8), material())
      else:
        top = rng.uniform(1.6, 2.0) if kind == "shelf" else rng.uniform(0.6, 1.1)
        pattern = STRIPES if kind == "shelf" else int(rng.choice([PLAIN, NOISE, CHECKER]))
        h = hue + rng.uniform(-0.2, 0.2)
        m = mats.add(pattern, _hsv(h, 0.5, 0.75), _hsv(h, 0.6, 0.3),
                     0.45 if kind == "shelf" else rng.uniform(0.15, 0.35))
        plan.boxes.append(((rect[0], 0.0, rect[1]), (rect[2], top, rect[3]), m))


def _table(plan: Plan, rect, top: float, material: int) -> None:
  """A table: a top slab and four legs."""
  x0, z0, x1, z1 = rect
  plan.boxes.append(((x0, top - 0.05, z0), (x1, top, z1), material))
  leg = 0.06
  for lx in (x0 + 0.03, x1 - 0.03 - leg):
    for lz in (z0 + 0.03, z1 - 0.03 - leg):
      plan.boxes.append(((lx, 0.0, lz), (lx + leg, top - 0.05, lz + leg), material))
