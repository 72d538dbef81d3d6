"""Posed clips from procedural scenes: layout + trajectory + moving objects -> clip dict.

Everything is a function of the seed. Separate random streams for the layout, the
trajectory, the moving objects and the trajectory kind keep one choice from shifting
another: the same seed with and without moving objects gives the same room and path.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.clip import Clip
from data_pipelines.procedural import layout, trajectories
from data_pipelines.procedural.layout import MovingObject, Scene
from data_pipelines.procedural.render import render_views
from mirage_jax import geometry
from mirage_jax.errors import InputError

TRAJECTORY_KINDS = trajectories.KINDS
_RANDOM_WEIGHTS = {"forward": 0.15, "pan": 0.15, "corner": 0.15, "orbit": 0.15, "loop": 0.4}
_BATCH = 32            # frames rendered per call (bounds memory at large sizes)
_MAX_SPEED = 1.0       # m/s, fastest point of a moving object's back-and-forth


def build_scene(seed: int) -> Scene:
  """The static layout of ``seed`` (redrawn until every room is reachable on foot)."""
  rng = np.random.default_rng([seed, 0])
  while True:
    plan, mats = layout.generate_plan(rng)
    scene = layout.scene_from_plan(plan, rng, mats)
    if trajectories.connected(scene):
      return scene


def _object_parts(kind: str, rng: np.random.Generator, first_mat: int):
  """Parts of one object: (box_lo, box_hi, box_mat, sph_c, sph_r, sph_mat, rolls, centre_y, mats)."""
  hue = rng.uniform()
  c1 = layout._hsv(hue, 0.85, 0.9)
  c2 = layout._hsv(hue + 0.5, 0.6, 0.95)
  none3, none1 = np.zeros((0, 3)), np.zeros((0,))
  if kind == "ball":
    r = rng.uniform(0.18, 0.3)
    mats = [(layout.OCTANTS, c1, c2, 1.0)]
    return none3, none3, np.zeros(0, int), np.array([[0, r, 0]]), np.array([r]), np.array([first_mat]), \
        True, r, mats
  if kind == "box":
    s = rng.uniform(0.35, 0.6)
    mats = [(layout.CHECKER, c1, c2, s / 2)]
    return (np.array([[-s / 2, 0, -s / 2]]), np.array([[s / 2, s, s / 2]]), np.array([first_mat]),
            none3, none1, np.zeros(0, int), False, s / 2, mats)
  # A walking figure: legs, torso, head.
  mats = [(layout.PLAIN, layout._hsv(hue + 0.6, 0.5, 0.35), c2, 1.0),
          (layout.STRIPES, c1, c2, 0.12),
          (layout.PLAIN, np.array([0.9, 0.75, 0.6]), c2, 1.0)]
  lo = np.array([[-0.15, 0.0, -0.1], [-0.2, 0.8, -0.12]])
  hi = np.array([[0.15, 0.8, 0.1], [0.2, 1.4, 0.12]])
  return (lo, hi, np.array([first_mat, first_mat + 1]), np.array([[0.0, 1.55, 0.0]]), np.array([0.13]),
          np.array([first_mat + 2]), False, 0.85, mats)


def add_moving_objects(rng: np.random.Generator, scene: Scene, poses_c2w: np.ndarray, num: int,
                       fps: float) -> Scene:
  """Adds ``num`` objects moving back and forth across the camera's view.

  Object k's path crosses the view of the frame at fraction (k+1)/(num+1) of the clip,
  perpendicular to the viewing direction and long enough to leave the view on both sides
  where the room allows, so objects exit and re-enter. Paths keep clear of furniture and of
  the camera at every frame.

  Args:
    rng: the objects' random stream.
    scene: static scene. poses_c2w: (T, 4, 4) the camera trajectory.
    num: number of objects. fps: frame rate (object speed is in m/s).
  Returns:
    The scene with ``objects`` and their materials added.
  """
  t = poses_c2w.shape[0]
  time = np.arange(t) / fps
  cams = poses_c2w[:, [0, 2], 3].astype(np.float64)
  pattern, c1, c2, scale = [list(a) for a in (scene.mat_pattern, scene.mat_c1, scene.mat_c2, scene.mat_scale)]
  objects = []
  for k in range(num):
    kind = ("ball", "box", "figure")[(k + int(rng.integers(3))) % 3]
    parts = _object_parts(kind, rng, len(pattern))
    for m in parts[-1]:
      pattern.append(m[0]); c1.append(m[1]); c2.append(m[2]); scale.append(m[3])
    obj = None
    anchor = int(round((k + 1) / (num + 1) * (t - 1)))
    for attempt in range(60):
      if attempt < 20:   # across the anchor frame's view
        f = poses_c2w[anchor, [0, 2], 2].astype(np.float64)
        f /= max(np.linalg.norm(f), 1e-9)
        centre = cams[anchor] + rng.uniform(1.6, 3.5) * f
        along = np.array([-f[1], f[0]])
      else:              # anywhere in a room
        x0, z0, x1, z1 = scene.rooms[rng.integers(len(scene.rooms))]
        centre = np.array([rng.uniform(x0, x1), rng.uniform(z0, z1)])
        a = rng.uniform(0, np.pi)
        along = np.array([np.cos(a), np.sin(a)])
      obj = _try_path(scene, parts, centre, along, cams, time, rng)
      if obj is not None:
        break
    if obj is None:
      raise RuntimeError(f"procedural scene: no free path for moving object {k + 1}")
    objects.append(obj)
  return dataclasses.replace(
      scene, objects=tuple(objects), mat_pattern=np.array(pattern, np.int32),
      mat_c1=np.array(c1, np.float32), mat_c2=np.array(c2, np.float32),
      mat_scale=np.array(scale, np.float32))


def _try_path(scene: Scene, parts, centre, along, cams, time, rng) -> MovingObject | None:
  """A MovingObject on the longest clear segment through ``centre`` along ``along``, or None."""
  box_lo, box_hi, box_mat, sph_c, sph_r, sph_mat, rolls, centre_y, _ = parts
  obj = MovingObject(a=centre, b=centre, period=1.0, phase=0.0, box_lo=box_lo, box_hi=box_hi,
                     box_mat=box_mat, sph_c=sph_c, sph_r=sph_r, sph_mat=sph_mat, rolls=rolls,
                     centre_y=centre_y)
  radius = obj.footprint_radius()

  def clear(p):
    p = np.atleast_2d(p)
    return (scene.clearance_xz(p) >= radius + 0.05) & (scene.region_at(p) >= 0)

  if not clear(centre)[0]:
    return None
  steps = np.arange(1, 31) * 0.1
  ends = []
  for sign in (-1.0, 1.0):
    ok = clear(centre[None] + sign * steps[:, None] * along[None])
    n = int(np.argmin(ok)) if not ok.all() else len(ok)
    ends.append(centre + sign * (steps[n - 1] if n else 0.0) * along)
  length = float(np.linalg.norm(ends[1] - ends[0]))
  if length < 1.5:
    return None
  obj = dataclasses.replace(obj, a=ends[0], b=ends[1],
                            period=np.pi * length / rng.uniform(0.5, _MAX_SPEED), phase=rng.uniform())
  gap = np.linalg.norm(obj.ground(time)[:, [0, 2]] - cams, axis=-1)
  if gap.min() < radius + trajectories.SAFE_MARGIN + 0.1:
    return None
  return obj


def render_clip(seed: int, num_frames: int, height: int, width: int, *, trajectory: str = "loop",
                moving_objects: int = 0, fov_y_deg: float = 75.0, fps: float = 10.0) -> Clip:
  """Renders one posed clip of a procedural indoor scene.

  Args:
    seed: selects the layout, the trajectory and the objects (same seed -> same bytes).
    num_frames: T >= 2.
    height, width: image size in pixels.
    trajectory: one of TRAJECTORY_KINDS, or "random" (drawn from the seed; loops are common).
    moving_objects: K, number of moving objects (ids 1..K in ``dynamic_masks``).
    fov_y_deg: vertical field of view.
    fps: frame rate; objects move in m/s, so it sets their per-frame motion.
  Returns:
    A clip dict in the format of data_pipelines/clip.py, with ``object_tracks (K, T, 3)``
    and a ``caption`` (:func:`describe`) of the scene, path and objects.
  """
  where = "render_clip"
  if num_frames < 2:
    raise InputError(where, "num_frames", f"need at least 2 frames, got {num_frames}")
  if height < 1 or width < 1:
    raise InputError(where, "height/width", f"must be positive, got {height}x{width}")
  if trajectory not in TRAJECTORY_KINDS + ("random",):
    raise InputError(where, "trajectory", f"expected one of {TRAJECTORY_KINDS + ('random',)}, got {trajectory!r}")
  if not 0 <= moving_objects <= 255:
    raise InputError(where, "moving_objects", f"expected 0..255, got {moving_objects}")
  if not 0 < fov_y_deg < 170:
    raise InputError(where, "fov_y_deg", f"expected (0, 170) degrees, got {fov_y_deg}")
  if not fps > 0:
    raise InputError(where, "fps", f"must be > 0, got {fps}")

  scene = build_scene(seed)
  if trajectory == "random":
    kinds = list(_RANDOM_WEIGHTS)
    trajectory = kinds[np.random.default_rng([seed, 3]).choice(len(kinds), p=list(_RANDOM_WEIGHTS.values()))]
  poses = trajectories.make_trajectory(np.random.default_rng([seed, 1]), scene, trajectory, num_frames)
  if moving_objects:
    scene = add_moving_objects(np.random.default_rng([seed, 2]), scene, poses, moving_objects, fps)
  K = np.repeat(geometry.intrinsics_from_fov(fov_y_deg, height, width)[None], num_frames, 0)
  time = np.arange(num_frames) / fps
  parts = [render_views(scene, K[s], poses[s], height, width, time[s])
           for s in (slice(i, i + _BATCH) for i in range(0, num_frames, _BATCH))]
  tracks = np.array([obj.track(time) for obj in scene.objects], np.float32).reshape(-1, num_frames, 3)
  return {
      "frames": np.concatenate([p[0] for p in parts]),
      "depths": np.concatenate([p[1] for p in parts]),
      "intrinsics": K.astype(np.float32),
      "poses_c2w": poses,
      "fps": np.float32(fps),
      "dynamic_masks": np.concatenate([p[2] for p in parts]),
      "object_tracks": tracks,
      "caption": describe(scene, poses, trajectory),
  }


# ----------------------------------------------------------------------------- captions

_PATTERN_WORDS = {layout.PLAIN: "plain", layout.CHECKER: "checkered", layout.STRIPES: "striped",
                  layout.BRICKS: "brick", layout.NOISE: "mottled", layout.PLANKS: "wooden plank",
                  layout.OCTANTS: "patterned"}
_PATH_WORDS = {"forward": "moves forward", "pan": "pans around", "corner": "turns a corner",
               "orbit": "circles", "loop": "walks a loop"}
# Upper hue bound (HSV, [0, 1)) of each colour name; red wraps around.
_HUES = ((0.04, "red"), (0.11, "orange"), (0.18, "yellow"), (0.45, "green"), (0.54, "teal"),
         (0.70, "blue"), (0.83, "purple"), (0.95, "pink"), (1.01, "red"))


def colour_name(rgb) -> str:
  """A plain-English name of an RGB colour in [0, 1]^3 (``white``, ``dark blue``, ...)."""
  import colorsys  # pylint: disable=g-import-not-at-top
  h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
  if s < 0.2:
    return "white" if v > 0.8 else "black" if v < 0.25 else "grey"
  name = next(n for bound, n in _HUES if h < bound)
  return f"dark {name}" if v < 0.45 else f"light {name}" if s < 0.4 and v > 0.75 else name


def _surface(scene: Scene, mat: int) -> str:
  return f"{colour_name(scene.mat_c1[mat])} {_PATTERN_WORDS[int(scene.mat_pattern[mat])]}"


def _count(n: int, word: str, plural: str = "") -> str:
  return f"{n} {word if n == 1 else plural or word + 's'}"


def describe(scene: Scene, poses_c2w: np.ndarray, trajectory: str) -> str:
  """A one-paragraph caption from the scene's own parameters: the camera path, the rooms,
  the walls and floor where the path starts, furniture, pillars and posters, and the moving
  objects; so clips of different seeds get different captions that say what they show."""
  rooms, halls = len(scene.rooms), len(scene.hallways)
  start = int(scene.region_at(poses_c2w[0, [0, 2], 3].astype(np.float64)))
  wall, floor, _ = (int(m) for m in scene.region_mats[max(start, 0)])
  place = "a hallway" if start >= rooms else "a room"
  furniture = int(np.sum(scene.box_mat != layout.ARCH))
  parts = [f"A camera {_PATH_WORDS.get(trajectory, 'moves')} through an indoor scene of "
           f"{_count(rooms, 'room')} joined by {_count(halls, 'hallway')}, starting in {place} "
           f"with {_surface(scene, wall)} walls and a {_surface(scene, floor)} floor.",
           f"There are {_count(furniture, 'piece', 'pieces')} of furniture, "
           f"{_count(len(scene.cyl_r), 'pillar')} and {_count(len(scene.poster_shape), 'poster')}"
           " on the walls."]
  movers = []
  for obj in scene.objects:
    kind = ("figure" if len(obj.box_lo) and len(obj.sph_r) else "ball" if len(obj.sph_r)
            else "box")
    mat = int(obj.box_mat[-1] if len(obj.box_lo) else obj.sph_mat[0])
    movers.append(f"a {colour_name(scene.mat_c1[mat])} {kind}")
  if movers:
    verb = "moves" if len(movers) == 1 else "move"
    listed = movers[0] if len(movers) == 1 else ", ".join(movers[:-1]) + " and " + movers[-1]
    parts.append(f"{listed[0].upper()}{listed[1:]} {verb} across the view.")
  return " ".join(parts)
