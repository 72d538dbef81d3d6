"""Smooth, collision-free camera trajectories through a procedural layout.

Every trajectory is a list of *segments*, each a dense polyline of camera states
``(x, z, yaw, pitch)`` at eye height. Walking segments come from a grid planner (BFS on
cells with enough clearance), shortcut by line of sight and rounded at the corners, with
the camera looking a little ahead along the path. Segments are played one after the other,
each starting and ending at rest (smooth speed ramps), and frames are spread along them so
no frame moves more than ``MAX_STEP_M`` or turns more than ``MAX_TURN_DEG``; a trajectory
too long for the frame budget is scaled down until it fits.
"""

from __future__ import annotations

import collections

import numpy as np

from data_pipelines.procedural.layout import EYE_HEIGHT, WALK_RADIUS, Scene
from mirage_jax import geometry

KINDS = ("forward", "pan", "corner", "orbit", "loop")
MAX_STEP_M = 0.15       # per frame at the fastest point of a segment
MAX_TURN_DEG = 6.0
SAFE_MARGIN = 0.3       # every camera centre keeps at least this floor distance from solids
_GRID = 0.2             # planner cell (m)
_RAMP_FRAMES = 4        # frames to speed up / slow down at each segment end
_LOOK_AHEAD = 0.8       # m along the path that a walking camera looks at


# ----------------------------------------------------------------------------- planner


class _Planner:
  """Grid over the layout with each cell's clearance; BFS paths between free cells."""

  def __init__(self, scene: Scene):
    self.scene = scene
    self.shape = tuple(int(np.ceil(e / _GRID)) for e in scene.extent)
    ij = np.stack(np.meshgrid(*(np.arange(s) for s in self.shape), indexing="ij"), -1).reshape(-1, 2)
    centres = (ij + 0.5) * _GRID
    inside = scene.region_at(centres) >= 0
    clear = np.where(inside, scene.clearance_xz(centres), -1.0)
    self.clearance = clear.reshape(self.shape)
    self.walkable = self.clearance >= WALK_RADIUS
    # Keep only the part reachable from room 0, so any two walkable cells are joined.
    seeds = self.cells_in(scene.rooms[0])
    if len(seeds):
      self.walkable &= self.bfs(tuple(seeds[0])) >= 0

  def cell(self, xz) -> tuple[int, int]:
    return tuple(np.clip((np.asarray(xz) / _GRID).astype(int), 0, np.array(self.shape) - 1))

  def centre(self, cell) -> np.ndarray:
    return (np.asarray(cell, np.float64) + 0.5) * _GRID

  def cells_in(self, rect, min_clear: float = WALK_RADIUS) -> np.ndarray:
    """(N, 2) walkable cells inside a rectangle ``x0, z0, x1, z1`` with clearance >= min_clear."""
    ij = np.argwhere(self.walkable & (self.clearance >= min_clear))
    c = (ij + 0.5) * _GRID
    keep = (c[:, 0] > rect[0]) & (c[:, 0] < rect[2]) & (c[:, 1] > rect[1]) & (c[:, 1] < rect[3])
    return ij[keep]

  def bfs(self, start) -> np.ndarray:
    """(GX, GZ) int32 BFS parent index (flat) of every walkable cell reachable from start; -1 else.

    The start cell is its own parent. 8-connected, diagonal moves only between free cells.
    """
    gx, gz = self.shape
    parent = np.full(gx * gz, -1, np.int64)
    s = start[0] * gz + start[1]
    parent[s] = s
    queue = collections.deque([start])
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    w = self.walkable
    while queue:
      i, j = queue.popleft()
      for di, dj in steps:
        a, b = i + di, j + dj
        if 0 <= a < gx and 0 <= b < gz and w[a, b] and parent[a * gz + b] < 0:
          if di and dj and not (w[i + di, j] and w[i, j + dj]):
            continue
          parent[a * gz + b] = i * gz + j
          queue.append((a, b))
    return parent.reshape(gx, gz)

  def path(self, parent: np.ndarray, goal) -> np.ndarray:
    """(N, 2) metric cell-centre path from the BFS start to ``goal``."""
    gz = self.shape[1]
    flat = parent.reshape(-1)
    k = goal[0] * gz + goal[1]
    cells = [k]
    while flat[k] != k:
      k = flat[k]
      cells.append(k)
    cells = np.array(cells[::-1])
    return self.centre(np.stack([cells // gz, cells % gz], -1))

  def segment_clear(self, a, b, min_clear: float) -> bool:
    n = max(2, int(np.linalg.norm(b - a) / 0.05))
    pts = a[None] + np.linspace(0, 1, n)[:, None] * (b - a)[None]
    ij = np.clip((pts / _GRID).astype(int), 0, np.array(self.shape) - 1)
    return bool((self.clearance[ij[:, 0], ij[:, 1]] >= min_clear).all())


def _shortcut(planner: _Planner, pts: np.ndarray) -> np.ndarray:
  """Drops waypoints while the straight line between the kept ones stays clear."""
  out, i = [pts[0]], 0
  while i < len(pts) - 1:
    j = len(pts) - 1
    while j > i + 1 and not planner.segment_clear(pts[i], pts[j], WALK_RADIUS - 0.05):
      j -= 1
    out.append(pts[j])
    i = j
  return np.array(out)


def _round_corners(way: np.ndarray, cut: float) -> np.ndarray:
  """Dense (N, 2) curve (2 cm spacing) along waypoints, corners replaced by quadratic Beziers."""
  pieces = [way[:1]]
  prev = way[0]
  for k in range(1, len(way) - 1):
    a, v, b = way[k - 1], way[k], way[k + 1]
    da = min(cut, 0.45 * np.linalg.norm(v - a))
    db = min(cut, 0.45 * np.linalg.norm(b - v))
    p0 = v + (a - v) / np.linalg.norm(a - v) * da
    p2 = v + (b - v) / np.linalg.norm(b - v) * db
    pieces.append(_line(prev, p0))
    s = np.linspace(0, 1, 24)[:, None]
    pieces.append((1 - s) ** 2 * p0 + 2 * s * (1 - s) * v + s ** 2 * p2)
    prev = p2
  pieces.append(_line(prev, way[-1]))
  pts = np.concatenate(pieces)
  keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=-1) > 1e-6])
  return _resample(pts[keep], 0.02)


def _line(a, b) -> np.ndarray:
  n = max(2, int(np.ceil(np.linalg.norm(b - a) / 0.02)) + 1)
  return a[None] + np.linspace(0, 1, n)[:, None] * (b - a)[None]


def _resample(pts: np.ndarray, step: float) -> np.ndarray:
  seg = np.linalg.norm(np.diff(pts, axis=0), axis=-1)
  s = np.concatenate([[0.0], np.cumsum(seg)])
  q = np.linspace(0, s[-1], max(2, int(np.ceil(s[-1] / step)) + 1))
  return np.stack([np.interp(q, s, pts[:, 0]), np.interp(q, s, pts[:, 1])], -1)


def _walk(planner: _Planner, start_cell, goal_cell, parent=None) -> np.ndarray:
  """Dense walking states (N, 4) ``x, z, yaw, pitch`` from start to goal (looking ahead)."""
  parent = planner.bfs(start_cell) if parent is None else parent
  way = _shortcut(planner, planner.path(parent, goal_cell))
  if len(way) < 2:
    way = np.stack([way[0], way[0] + 1e-3])
  for cut in (0.8, 0.5, 0.3, 0.15, 0.0):
    pts = _round_corners(way, cut) if cut else _resample(way, 0.02)
    if planner.scene.clearance_xz(pts).min() >= SAFE_MARGIN + 0.02:
      break
  ahead = int(_LOOK_AHEAD / 0.02)
  idx = np.minimum(np.arange(len(pts)) + ahead, len(pts) - 1)
  delta = pts[idx] - pts
  yaw = np.arctan2(delta[:, 1], delta[:, 0])
  # Near the end the look-ahead point collapses: keep the last well-defined heading.
  short = np.linalg.norm(delta, axis=-1) < 0.3
  if short.all():
    yaw[:] = 0.0
  elif short.any():
    last = np.flatnonzero(~short)[-1]
    yaw[short & (np.arange(len(pts)) > last)] = yaw[last]
  # Average the heading over ~0.6 m of path so sharp corners do not jerk the view.
  k = int(0.3 / 0.02)
  yaw = np.convolve(np.pad(np.unwrap(yaw), k, mode="edge"), np.ones(2 * k + 1) / (2 * k + 1), "valid")
  return np.concatenate([pts, yaw[:, None], np.zeros((len(pts), 1))], -1)


def _truncate(states: np.ndarray, frac: float) -> np.ndarray:
  """The first ``frac`` of a dense segment (by sample count, at least 2 samples)."""
  return states[:max(2, int(round(frac * len(states))))]


def _turn(state: np.ndarray, angle: float) -> np.ndarray:
  """Dense states (N, 4) turning in place by ``angle`` radians from ``state`` (4,)."""
  n = max(2, int(np.ceil(abs(angle) / np.deg2rad(0.5))) + 1)
  out = np.repeat(state[None], n, 0)
  out[:, 2] = state[2] + np.linspace(0, angle, n)
  return out


# ----------------------------------------------------------------------------- timing


def _ramp_progress(n_steps: int) -> np.ndarray:
  """(n_steps + 1,) progress in [0, 1] that starts and ends at rest (sin^2 speed ramps)."""
  r = min(0.5, _RAMP_FRAMES / n_steps)
  x = np.linspace(0, 1, 2001)
  speed = np.ones_like(x)
  ramp = np.minimum(x, 1 - x) < r
  speed[ramp] = np.sin(0.5 * np.pi * np.minimum(x, 1 - x)[ramp] / r) ** 2
  cum = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]))])
  return np.interp(np.linspace(0, 1, n_steps + 1), x, cum / cum[-1])


def _cost(states: np.ndarray) -> np.ndarray:
  """(N,) cumulative motion of a dense segment in units of the per-frame limits."""
  step = np.abs(np.diff(states, axis=0))
  per = np.maximum(np.linalg.norm(np.diff(states[:, :2], axis=0), axis=-1) / MAX_STEP_M,
                   np.maximum(step[:, 2], step[:, 3]) / np.deg2rad(MAX_TURN_DEG))
  return np.concatenate([[0.0], np.cumsum(per)])


def _play(segments: list[np.ndarray], num_frames: int) -> np.ndarray | None:
  """(num_frames, 4) states playing the segments in order, or None if they do not fit."""
  costs = [_cost(s) for s in segments]
  total = sum(c[-1] for c in costs)
  steps = num_frames - 1
  if total <= 0:
    return np.repeat(segments[0][:1], num_frames, 0)
  n = [max(1, int(np.floor(steps * c[-1] / total))) for c in costs]
  while sum(n) > steps:
    n[int(np.argmax(n))] -= 1
  for k in np.argsort([-c[-1] / m for c, m in zip(costs, n)]):
    if sum(n) == steps:
      break
    n[k] += 1
  out = [segments[0][:1]]
  for seg, c, m in zip(segments, costs, n):
    if m < 1:
      return None
    q = _ramp_progress(m) * c[-1]
    if np.diff(q).max(initial=0.0) > 1.0 + 1e-6:
      return None
    out.append(np.stack([np.interp(q, c, seg[:, k]) for k in range(4)], -1)[1:])
  return np.concatenate(out)


def _fit(build, num_frames: int) -> np.ndarray | None:
  """Plays ``build(scale)`` with the largest scale in (0, 1] whose motion fits the frames."""
  scale = 1.0
  while scale > 0.02:
    segments = build(scale)
    if segments is not None:
      states = _play(segments, num_frames)
      if states is not None:
        return states
    scale *= 0.85
  return None


# ----------------------------------------------------------------------------- kinds


def _pick_start(rng, planner: _Planner, room) -> tuple[int, int]:
  cells = planner.cells_in(room, 0.7)
  if not len(cells):
    cells = planner.cells_in(room)
  return tuple(cells[rng.integers(len(cells))])


def _reachable(parent: np.ndarray, planner: _Planner, rect) -> np.ndarray:
  cells = planner.cells_in(rect)
  return cells[parent[cells[:, 0], cells[:, 1]] >= 0]


def _other_room(rng, scene: Scene, room: int) -> tuple[int, int]:
  """A hallway from ``room`` and the room at its other end."""
  options = [(c, int(pair[1] if pair[0] == room else pair[0])) for c, pair in enumerate(scene.doors)
             if room in pair]
  return options[rng.integers(len(options))]


def _forward(rng, scene: Scene, planner: _Planner, num_frames: int):
  room = int(rng.integers(len(scene.rooms)))
  start = _pick_start(rng, planner, scene.rooms[room])
  parent = planner.bfs(start)
  # Walk towards a far reachable cell (the farthest of a few random ones).
  cells = np.argwhere(parent >= 0)
  cand = cells[rng.choice(len(cells), size=min(8, len(cells)), replace=False)]
  goal = tuple(cand[np.argmax(np.linalg.norm(cand - np.array(start), axis=-1))])
  states = _walk(planner, start, goal, parent)
  return _fit(lambda s: [_truncate(states, s)], num_frames)


def _pan(rng, scene: Scene, planner: _Planner, num_frames: int):
  room = int(rng.integers(len(scene.rooms)))
  cell = _pick_start(rng, planner, scene.rooms[room])
  x, z = planner.centre(cell)
  state = np.array([x, z, rng.uniform(-np.pi, np.pi), 0.0])
  sweep = rng.uniform(np.deg2rad(120), np.deg2rad(300)) * rng.choice([-1.0, 1.0])
  return _fit(lambda s: [_turn(state, s * sweep)], num_frames)


def _corner(rng, scene: Scene, planner: _Planner, num_frames: int):
  room = int(rng.integers(len(scene.rooms)))
  hall, other = _other_room(rng, scene, room)
  h = scene.hallways[hall]
  door = np.array([(h[0] + h[2]) / 2, (h[1] + h[3]) / 2])
  start = _pick_start(rng, planner, scene.rooms[room])
  parent = planner.bfs(start)
  ends = _reachable(parent, planner, scene.rooms[other])
  # Prefer a goal off the doorway's axis so the path turns after the door.
  a, b = planner.centre(ends) - door, door - planner.centre(start)
  off = np.abs(a[:, 0] * b[1] - a[:, 1] * b[0])
  goal = tuple(ends[rng.choice(np.argsort(-off)[:max(1, len(ends) // 4)])])
  states = _walk(planner, start, goal, parent)
  # Scale down around the doorway: keep the part of the path nearest to it.
  mid = int(np.argmin(np.linalg.norm(states[:, :2] - door, axis=-1)))

  def build(s):
    half = max(1, int(s * len(states) / 2))
    a, b = max(0, mid - half), min(len(states), mid + half)
    return [states[a:b]] if b - a >= 2 else None
  return _fit(build, num_frames)


def _orbit(rng, scene: Scene, planner: _Planner, num_frames: int):
  room = int(rng.integers(len(scene.rooms)))
  x, z, item = scene.centre_items[room]
  if item == 0:
    x0, z0, x1, z1 = scene.rooms[room]
    x, z = (x0 + x1) / 2, (z0 + z1) / 2
  phi = np.linspace(0, 2 * np.pi, 721)
  for radius in np.arange(2.2, 0.79, -0.1):
    ring = np.stack([x + radius * np.cos(phi), z + radius * np.sin(phi)], -1)
    if scene.clearance_xz(ring).min() >= SAFE_MARGIN + 0.1 and (scene.region_at(ring) >= 0).all():
      break
  else:
    return None
  start = rng.uniform(0, 2 * np.pi)
  sign = rng.choice([-1.0, 1.0])
  pitch = np.arctan2(0.9 - EYE_HEIGHT, radius)   # look at the item's middle

  def build(s):
    ang = start + sign * np.linspace(0, s * 2 * np.pi, max(2, int(s * 720)))
    return [np.stack([x + radius * np.cos(ang), z + radius * np.sin(ang), ang + np.pi,
                      np.full_like(ang, pitch)], -1)]
  return _fit(build, num_frames)


def _loop(rng, scene: Scene, planner: _Planner, num_frames: int):
  """Out through a doorway and back to the start pose.

  With enough frames the camera turns around, walks back facing forward and turns to its
  first heading again; with fewer it retraces the way out backwards. Either way the last
  frames re-see the first ones.
  """
  room = int(rng.integers(len(scene.rooms)))
  _, other = _other_room(rng, scene, room)
  start = _pick_start(rng, planner, scene.rooms[room])
  parent = planner.bfs(start)
  ends = _reachable(parent, planner, scene.rooms[other])
  goal = tuple(ends[rng.integers(len(ends))])
  out = _walk(planner, start, goal, parent)
  way = rng.choice([-1.0, 1.0])

  def turn_around(s):
    o = _truncate(out, s)
    if np.linalg.norm(o[-1, :2] - o[0, :2]) < 1.2:
      return None
    back = o[::-1].copy()
    back[:, 2] += way * np.pi
    return [o, _turn(o[-1], way * np.pi), back, _turn(back[-1], way * np.pi)]

  def retrace(s):
    o = _truncate(out, s)
    return [o, o[::-1]]
  states = _fit(turn_around, num_frames)
  if states is None:
    states = _fit(retrace, num_frames)
  if states is not None:
    states[-1] = states[0]   # exact return (removes interpolation round-off)
  return states


def connected(scene: Scene) -> bool:
  """Whether every room has walkable floor reachable from room 0."""
  planner = _Planner(scene)
  return all(len(planner.cells_in(room)) for room in scene.rooms)


_BUILDERS = {"forward": _forward, "pan": _pan, "corner": _corner, "orbit": _orbit, "loop": _loop}


def make_trajectory(rng: np.random.Generator, scene: Scene, kind: str, num_frames: int) -> np.ndarray:
  """Camera poses of one trajectory.

  Args:
    rng: the trajectory's random stream.
    scene: the layout to move through.
    kind: one of KINDS.
    num_frames: T.
  Returns:
    (T, 4, 4) float32 OpenCV camera-to-world poses at eye height.
  """
  planner = _Planner(scene)
  states = None
  for attempt in range(8):   # a kind may not fit a draw (e.g. no room to orbit): redraw, then pan
    states = _BUILDERS[kind if attempt < 6 else "pan"](rng, scene, planner, num_frames)
    if states is not None:
      break
  return states_to_poses(states)


def states_to_poses(states: np.ndarray) -> np.ndarray:
  """(T, 4, 4) poses from (T, 4) ``x, z, yaw, pitch`` states (yaw 0 looks along +x)."""
  poses = []
  for x, z, yaw, pitch in states:
    eye = np.array([x, EYE_HEIGHT, z])
    look = np.array([np.cos(yaw) * np.cos(pitch), np.sin(pitch), np.sin(yaw) * np.cos(pitch)])
    poses.append(geometry.look_at(eye, eye + look, up=(0.0, 1.0, 0.0)))
  return np.stack(poses).astype(np.float32)
