"""Memory Maze (Pasukonis et al. 2022) as a source of posed RGB-D clips with revisits.

A seeded maze, a seeded scripted agent and MuJoCo's renderer give, per step, the egocentric RGB
frame, its metric z-depth, and the exact camera pose, in the ``data_pipelines/clip.py`` format.

Needs the optional extra ``pip install -e .[memory_maze]`` and, without a GPU, Debian's
``libosmesa6`` with ``MUJOCO_GL=osmesa`` (set here by default before MuJoCo is imported).

Conventions verified against MuJoCo ray casting (``mujoco.mj_ray``, relative error ~1e-6):
  * The egocentric camera ``walker/egocentric`` is a pinhole with vertical fov ``cam_fovy`` and
    square pixels, so ``geometry.intrinsics_from_fov`` gives its intrinsics exactly.
  * MuJoCo cameras look down their -z axis with +y up; OpenCV's frame is (x, -y, -z) of it.
  * ``physics.render(depth=True)`` linearises the z-buffer into distance along the optical axis
    (z-depth), as the clip format wants, but only without multisampling: the default 4x MSAA
    resolves depth from one sub-sample, which shifts it by ~0.4 px against the pixel centre
    (4 cm of floor height at 24 px tall). So MSAA is switched off, and RGB is anti-aliased by
    rendering at 2x and averaging 2x2 blocks, which keeps each colour centred on its pixel.

World frame: MuJoCo's, z up, floor at z = 0, metres. Grid coordinates (``agent_pos``) are
``xy / 2 + maze_size / 2`` (cells are 2 m). Sky pixels get the depth of MuJoCo's skybox
(hundreds of metres, drawn around the camera, so not a fixed place in the world).
"""

from __future__ import annotations

import math
import os

import numpy as np

from data_pipelines import clip as clip_lib
from mirage_jax import geometry
from mirage_jax.errors import InputError

_WHERE = "data_pipelines.memory_maze"
_EXTRA_HINT = ("Memory Maze needs the optional extra: pip install -e '.[memory_maze]' "
               "(memory-maze, dm-control, mujoco, gym), and for headless CPU rendering "
               "`apt-get install -y libosmesa6` with MUJOCO_GL=osmesa")

# Episode lengths of the benchmark (time limit x 4 Hz control), by maze size.
_EPISODE_STEPS = {9: 1000, 11: 2000, 13: 3000, 15: 4000}
_POLICIES = ("explore", "retrace")
_CAMERA = "walker/egocentric"
# Colour is rendered at this multiple of the requested size and box-filtered down.
_SUPERSAMPLE = 2

# The discrete action set of Memory Maze (indices into DiscreteActionSetWrapper's list).
_NOOP, _FORWARD, _LEFT, _RIGHT, _FORWARD_LEFT, _FORWARD_RIGHT = range(6)
# Heading errors (radians) above which the agent turns on the spot / turns while moving.
# The agent turns ~0.3 rad per step, so the inner band stops it oscillating around the goal.
_TURN_IN_PLACE = 0.6
_TURN_WHILE_MOVING = 0.15
# A cell centre counts as reached within this distance (grid units; the agent moves ~0.11/step).
_REACHED = 0.3
# Probability of carrying on straight at a junction (momentum of the random walk).
_MOMENTUM = 0.7
# Frames "retrace" keeps for its two half-turns (turn back, then face the first heading again).
_RETRACE_TURN_FRAMES = 24
_GRID_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (dx, dy) in grid cells

def _import_tasks():
  """Imports ``memory_maze.tasks`` with a headless renderer, or raises a helpful ImportError."""
  # dm_control picks its OpenGL backend once, at import; memory_maze itself defaults to EGL,
  # which needs a GPU.
  os.environ.setdefault("MUJOCO_GL", "osmesa")
  try:
    from memory_maze import tasks  # pylint: disable=import-outside-toplevel
  except Exception as e:  # Missing packages and missing GL libraries fail with varied types.
    raise ImportError(f"{_EXTRA_HINT}; import failed with {type(e).__name__}: {e}") from e
  return tasks


def is_available() -> bool:
  """True when memory_maze and a MuJoCo rendering backend can be imported."""
  try:
    _import_tasks()
  except ImportError:
    return False
  return True


def require(where: str) -> None:
  """Raises ``InputError(where, 'memory_maze', <install step>)`` unless :func:`is_available`.

  For entry points: a missing extra or renderer is one line naming the install step, before
  any work starts (not an ImportError traceback from a worker later).
  """
  try:
    _import_tasks()
  except ImportError as e:
    raise InputError(where, "memory_maze", str(e)) from None


# ----------------------------------------------------------------------------- policy


def _wrap_angle(a: float) -> float:
  return (a + math.pi) % (2.0 * math.pi) - math.pi


def _steer(pos: np.ndarray, heading: np.ndarray, target: np.ndarray) -> int:
  """Discrete action that drives an agent at ``pos`` facing ``heading`` (both (2,)) to ``target``."""
  to = target - pos
  err = _wrap_angle(math.atan2(to[1], to[0]) - math.atan2(heading[1], heading[0]))
  if abs(err) > _TURN_IN_PLACE:
    return _LEFT if err > 0 else _RIGHT  # "left" turns counter-clockwise in the grid frame
  if abs(err) > _TURN_WHILE_MOVING:
    return _FORWARD_LEFT if err > 0 else _FORWARD_RIGHT
  return _FORWARD


def _face(heading: np.ndarray, goal_heading: np.ndarray) -> int:
  """Action that turns on the spot from ``heading`` towards ``goal_heading`` ((2,) each)."""
  err = _wrap_angle(math.atan2(goal_heading[1], goal_heading[0]) - math.atan2(heading[1], heading[0]))
  if abs(err) <= _TURN_WHILE_MOVING:
    return _NOOP
  return _LEFT if err > 0 else _RIGHT


class _GridWalker:
  """Random walk with momentum over the maze's free cells, steered cell centre to cell centre.

  A maze has dead ends and loops, so the walk revisits places on its own; ``retrace`` then walks
  the visited cells back to the start and turns to the first heading (the protocol of Po et al.
  2025: observe a path, then come back along it).
  """

  def __init__(self, layout: np.ndarray, pos: np.ndarray, heading: np.ndarray, num_frames: int,
               policy: str, rng: np.random.Generator):
    """layout: (n, n) 1 = free, indexed [y, x] in grid cells; pos, heading: (2,) grid units."""
    self._layout = layout
    self._rng = rng
    self._start_heading = heading.copy()
    cell = (int(pos[0]), int(pos[1]))
    self._path = [cell]  # cell centres reached, in order
    # Start along the free direction closest to where the agent looks.
    self._direction = max(self._free_directions(cell), key=lambda d: d[0] * heading[0] + d[1] * heading[1])
    self._target = self._next_cell(cell)
    self._out_frames = (num_frames if policy == "explore"
                        else max(0, (num_frames - _RETRACE_TURN_FRAMES) // 2))
    self._way_back: list[tuple[int, int]] | None = None

  def _free_directions(self, cell: tuple[int, int]) -> list[tuple[int, int]]:
    n_y, n_x = self._layout.shape
    out = []
    for dx, dy in _GRID_DIRECTIONS:
      x, y = cell[0] + dx, cell[1] + dy
      if 0 <= x < n_x and 0 <= y < n_y and self._layout[y, x]:
        out.append((dx, dy))
    return out

  def _next_cell(self, cell: tuple[int, int]) -> tuple[int, int]:
    free = self._free_directions(cell)
    back = (-self._direction[0], -self._direction[1])
    onward = [d for d in free if d != back] or free  # turn back only at a dead end
    if self._direction in onward and self._rng.random() < _MOMENTUM:
      step = self._direction
    else:
      step = onward[self._rng.integers(len(onward))]
    self._direction = step
    return (cell[0] + step[0], cell[1] + step[1])

  def act(self, t: int, pos: np.ndarray, heading: np.ndarray) -> int:
    """Action at frame ``t`` for the agent at ``pos`` facing ``heading`` ((2,) grid units)."""
    if t >= self._out_frames and self._way_back is None:
      self._way_back = self._path[::-1]
    if self._way_back is None:
      centre = np.add(self._target, 0.5)
      if np.linalg.norm(centre - pos) < _REACHED:
        self._path.append(self._target)
        self._target = self._next_cell(self._target)
        centre = np.add(self._target, 0.5)
      return _steer(pos, heading, centre)
    while self._way_back:
      centre = np.add(self._way_back[0], 0.5)
      if np.linalg.norm(centre - pos) >= _REACHED:
        return _steer(pos, heading, centre)
      self._way_back.pop(0)
    return _face(heading, self._start_heading)


# ----------------------------------------------------------------------------- rollout


def _check_args(seed, num_frames, height, width, maze_size, policy) -> None:
  if maze_size not in _EPISODE_STEPS:
    raise InputError(_WHERE, "maze_size", f"expected one of {sorted(_EPISODE_STEPS)}, got {maze_size!r}")
  if policy not in _POLICIES:
    raise InputError(_WHERE, "policy", f"expected one of {_POLICIES}, got {policy!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InputError(_WHERE, "seed", f"expected an integer >= 0, got {seed!r}")
  limit = _EPISODE_STEPS[maze_size]
  if not isinstance(num_frames, (int, np.integer)) or not 1 <= num_frames <= limit:
    raise InputError(_WHERE, "num_frames",
                     f"expected an integer in [1, {limit}] (the {maze_size}x{maze_size} episode length), "
                     f"got {num_frames!r}")
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise InputError(_WHERE, name, f"expected a positive integer, got {value!r}")


def _opencv_c2w(cam_xpos: np.ndarray, cam_xmat: np.ndarray) -> np.ndarray:
  """OpenCV c2w (4, 4) from a MuJoCo camera's position (3,) and row-major rotation (9,)."""
  c2w = np.eye(4)
  # Columns of cam_xmat are the camera's x, y, z axes in the world; OpenCV flips y and z.
  c2w[:3, :3] = cam_xmat.reshape(3, 3) * np.array([1.0, -1.0, -1.0])
  c2w[:3, 3] = cam_xpos
  return c2w


def rollout_episode(seed: int, num_frames: int, height: int, width: int, *, maze_size: int = 9,
                    policy: str = "explore") -> tuple[clip_lib.Clip, dict[str, np.ndarray]]:
  """Runs the scripted agent in a seeded maze; returns the clip and the agent's own state.

  Args:
    seed: seeds the maze layout, spawn and textures (memory_maze) and the policy.
    num_frames: T, frames in the clip (the first is the spawn view; one agent step each after).
    height, width: H, W of the rendered frames.
    maze_size: 9, 11, 13 or 15 (inner cells per side; a cell is 2 m).
    policy: "explore" (random walk with momentum, revisits at dead ends and loops) or
      "retrace" (explore for about half the clip, walk back along the same cells, then turn to
      the first heading, so the clip ends where it began).
  Returns:
    clip: the validated clip (see data_pipelines/clip.py), fps = 4 (the benchmark's control rate).
    agent: ``agent_pos`` (T, 2) and ``agent_dir`` (T, 2) float32, memory_maze's grid-unit
      position of the walker and its unit heading; ``maze_layout`` (n, n) uint8, 1 = free,
      indexed [y, x] in grid cells.
  Raises:
    InputError: for bad arguments. ImportError: when the extra or the renderer is missing.
  """
  _check_args(seed, num_frames, height, width, maze_size, policy)
  tasks = _import_tasks()
  from dm_control.mujoco import engine  # pylint: disable=import-outside-toplevel
  from memory_maze import wrappers  # pylint: disable=import-outside-toplevel

  s = _SUPERSAMPLE
  env = getattr(tasks, f"memory_maze_{maze_size}x{maze_size}")(
      seed=int(seed), global_observables=True, target_color_in_image=False)
  try:
    # The env's own camera observation would cost a second render per step (about half the
    # step time); frames are rendered below at the requested size instead.
    env.task.observables["walker/egocentric_camera"].enabled = False
    remap = env
    while not isinstance(remap, wrappers.RemapObservationWrapper):
      remap = remap.env
    remap.mapping.pop("image")
    mjcf_visual = env.task.root_entity.mjcf_model.visual
    mjcf_visual.quality.offsamples = 0  # see the module docstring
    offscreen = mjcf_visual.get_children("global")
    offscreen.offwidth = max(640, s * width)  # MuJoCo's default buffer is 640 x 480
    offscreen.offheight = max(480, s * height)
    step = env.reset()
    physics = env.physics
    cam = physics.model.name2id(_CAMERA, "camera")
    fov_y = float(physics.model.cam_fovy[cam])
    # Cameras built once: physics.render() builds a new MuJoCo scene on every call.
    colour_camera = engine.Camera(physics, s * height, s * width, cam)
    depth_camera = engine.Camera(physics, height, width, cam)
    walker = _GridWalker(np.asarray(step.observation["maze_layout"]), step.observation["agent_pos"],
                         step.observation["agent_dir"], num_frames, policy,
                         np.random.default_rng(int(seed)))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    depths = np.empty((num_frames, height, width), np.float32)
    poses = np.empty((num_frames, 4, 4), np.float64)
    agent_pos = np.empty((num_frames, 2), np.float32)
    agent_dir = np.empty((num_frames, 2), np.float32)
    for t in range(num_frames):
      if t > 0:
        step = env.step(walker.act(t, agent_pos[t - 1], agent_dir[t - 1]))
      rgb = colour_camera.render().astype(np.float32)
      frames[t] = np.round(rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3))).astype(np.uint8)
      depths[t] = depth_camera.render(depth=True)
      poses[t] = _opencv_c2w(physics.data.cam_xpos[cam], physics.data.cam_xmat[cam])
      agent_pos[t] = step.observation["agent_pos"]
      agent_dir[t] = step.observation["agent_dir"]
    layout = np.asarray(step.observation["maze_layout"], np.uint8)
  finally:
    env.close()

  # The renderer's far plane bounds depth; guard the format's "> 0 and finite" all the same.
  far = float(np.max(depths[np.isfinite(depths)], initial=1.0))
  depths = np.clip(np.nan_to_num(depths, nan=far, posinf=far), 1e-3, far)
  intrinsics = np.broadcast_to(geometry.intrinsics_from_fov(fov_y, height, width), (num_frames, 3, 3))
  clip = clip_lib.validate_clip({
      "frames": frames,
      "depths": depths,
      "intrinsics": intrinsics,
      "poses_c2w": poses,
      "fps": np.float32(tasks.DEFAULT_CONTROL_FREQ),
      "dynamic_masks": np.zeros((num_frames, height, width), np.uint8),
  }, f"{_WHERE}(seed={seed}, maze_size={maze_size}, policy={policy})")
  return clip, {"agent_pos": agent_pos, "agent_dir": agent_dir, "maze_layout": layout}


def rollout_clip(seed: int, num_frames: int, height: int, width: int, *, maze_size: int = 9,
                 policy: str = "explore") -> clip_lib.Clip:
  """One posed RGB-D clip from Memory Maze, deterministic for ``seed``.

  See ``rollout_episode`` for the arguments. Returns the clip dict: frames (T, H, W, 3) uint8,
  depths (T, H, W) float32 metric z-depth, intrinsics (T, 3, 3), poses_c2w (T, 4, 4) OpenCV,
  fps () = 4, dynamic_masks (T, H, W) zeros (the targets do not move).
  """
  return rollout_episode(seed, num_frames, height, width, maze_size=maze_size, policy=policy)[0]
