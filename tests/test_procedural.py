"""Procedural scenes: analytic depth, view-consistent colour, safe trajectories, loops, objects."""

import numpy as np
import pytest

from data_pipelines.clip import validate_clip
from data_pipelines.procedural import (TRAJECTORY_KINDS, Plan, build_scene, make_trajectory, render_clip,
                                       render_views, scene_from_plan)
from data_pipelines.procedural.layout import EYE_HEIGHT
from mirage_jax import geometry
from mirage_jax.errors import InputError

MARGIN = 0.25   # required distance from every camera centre to every solid (m)


def _world_rays(K, c2w, h, w):
  """(H*W, 3) world ray directions with camera z = 1 (so ray parameter = z-depth)."""
  rays = np.asarray(geometry.camera_rays(K, h, w)).reshape(-1, 3)
  return rays @ c2w[:3, :3].T


def _exit_room(o, d, lo, hi):
  """Ray parameter where rays from o (3,) along d (N, 3) leave the box [lo, hi] (inside)."""
  with np.errstate(divide="ignore"):
    t = np.maximum((lo - o) / d, (hi - o) / d)
  return t.min(-1)


def _enter_box(o, d, lo, hi):
  with np.errstate(divide="ignore", invalid="ignore"):
    t1, t2 = (lo - o) / d, (hi - o) / d
  near, far = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
  return np.where((near <= far) & (near > 0), near, np.inf)


# ----------------------------------------------------------------------------- depth


def test_depth_equals_analytic_ray_distance():
  room_lo, room_hi = np.array([1.0, 0.0, 1.0]), np.array([5.0, 2.75, 6.0])
  box_lo, box_hi = np.array([3.25, 0.0, 4.5]), np.array([3.75, 1.0, 5.0])
  plan = Plan(extent=(6.5, 7.5), height=2.75, rooms=[(1.0, 1.0, 5.0, 6.0)], hallways=[], doors=[],
              boxes=[(tuple(box_lo), tuple(box_hi), 0)])
  scene = scene_from_plan(plan, np.random.default_rng(0))
  h, w = 24, 32
  eyes = [(3.0, 1.5, 3.5), (1.7, 1.2, 1.9), (4.2, 2.0, 5.2)]
  targets = [(4.0, 1.5, 3.5), (3.5, 0.6, 5.0), (2.0, 0.5, 1.5)]
  poses = np.stack([geometry.look_at(e, t, up=(0, 1, 0)) for e, t in zip(eyes, targets)])
  K = np.repeat(geometry.intrinsics_from_fov(70.0, h, w)[None], 3, 0)
  _, depths, masks = render_views(scene, K, poses, h, w, np.zeros(3))
  for f in range(3):
    o = poses[f, :3, 3].astype(np.float64)
    d = _world_rays(K[f], poses[f].astype(np.float64), h, w)
    expected = np.minimum(_exit_room(o, d, room_lo, room_hi), _enter_box(o, d, box_lo, box_hi))
    np.testing.assert_allclose(depths[f].reshape(-1), expected, rtol=1e-4, atol=1e-4)
  # Facing the +x wall squarely from 2 m: every wall pixel is at z-depth exactly 2.
  np.testing.assert_allclose(depths[0, 8:16, 8:24], 2.0, atol=1e-5)
  assert not masks.any()


def test_floor_depth_closed_form():
  scene = build_scene(5)
  x0, z0, x1, z1 = scene.rooms[0]
  xz = np.stack(np.meshgrid(np.linspace(x0, x1, 30), np.linspace(z0, z1, 30)), -1).reshape(-1, 2)
  x, z = xz[np.argmax(scene.clearance_xz(xz))]    # the most open spot of the room
  eye = np.array([x, EYE_HEIGHT, z])
  # Look steeply down so most pixels see the floor around the camera's feet.
  pose = geometry.look_at(eye, eye + np.array([0.2, -1.0, 0.0]), up=(0, 1, 0))[None]
  K = geometry.intrinsics_from_fov(40.0, 16, 16)[None]
  _, depths, _ = render_views(scene, K, pose, 16, 16, np.zeros(1))
  d = _world_rays(K[0], pose[0].astype(np.float64), 16, 16)
  floor = EYE_HEIGHT / -d[:, 1]
  hits_floor = np.isclose(depths[0].reshape(-1), floor, rtol=1e-4)
  assert hits_floor.mean() > 0.5           # mostly open floor below the camera
  assert (depths[0].reshape(-1) <= floor * (1 + 1e-4)).all()   # nothing is seen below the floor


# ----------------------------------------------------------------------------- views agree


def _bilinear(img, uv):
  """Samples img (H, W, C) at continuous pixel coordinates uv (N, 2); pixel centres at +0.5."""
  x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  fx, fy = (x - x0)[:, None], (y - y0)[:, None]
  g = lambda yy, xx: img[yy, xx].astype(np.float64)
  return ((g(y0, x0) * (1 - fx) + g(y0, x0 + 1) * fx) * (1 - fy)
          + (g(y0 + 1, x0) * (1 - fx) + g(y0 + 1, x0 + 1) * fx) * fy)


@pytest.mark.parametrize("kind,pairs", [("forward", [(0, 4), (9, 6)]), ("orbit", [(2, 6)])])
def test_reprojected_pixels_keep_their_colour(kind, pairs):
  clip = validate_clip(render_clip(11, 12, 48, 64, trajectory=kind), "render_clip")
  h, w = 48, 64
  for i, j in pairs:
    pts = np.asarray(geometry.unproject_depth(clip["depths"][i], clip["intrinsics"][i],
                                              clip["poses_c2w"][i])).reshape(-1, 3)
    uv, z = geometry.project_points(pts, clip["intrinsics"][j], clip["poses_c2w"][j])
    uv, z = np.asarray(uv, np.float64), np.asarray(z)
    inside = (uv[:, 0] > 1) & (uv[:, 0] < w - 1) & (uv[:, 1] > 1) & (uv[:, 1] < h - 1) & (z > 0)
    uv, z, src = uv[inside], z[inside], clip["frames"][i].reshape(-1, 3)[inside]
    # Depth-consistent (not occluded, not on a depth edge): all 4 bilinear taps agree with z.
    x0, y0 = np.floor(uv[:, 0] - 0.5).astype(int), np.floor(uv[:, 1] - 0.5).astype(int)
    dj = clip["depths"][j]
    taps = np.stack([dj[y0, x0], dj[y0, x0 + 1], dj[y0 + 1, x0], dj[y0 + 1, x0 + 1]], -1)
    ok = (np.abs(taps - z[:, None]) < 0.03 * z[:, None] + 0.02).all(-1)
    assert ok.sum() > 0.3 * h * w, f"too few co-visible pixels between frames {i} and {j}"
    diff = np.abs(_bilinear(clip["frames"][j], uv[ok]) - src[ok]).max(-1)
    assert (diff <= 16).mean() > 0.9, f"frames {i}->{j}: {(diff <= 16).mean():.3f} of pixels match"


# ----------------------------------------------------------------------------- trajectories


def _clearance_3d(scene, p):
  """(T,) distance from points p (T, 3) to the nearest static solid (boxes, pillars)."""
  d = np.maximum(np.maximum(scene.box_lo[None] - p[:, None], p[:, None] - scene.box_hi[None]), 0)
  dist = np.linalg.norm(d, axis=-1).min(1)
  if len(scene.cyl_r):
    dc = np.linalg.norm(p[:, None, [0, 2]] - scene.cyl_xz[None], axis=-1) - scene.cyl_r[None]
    dist = np.minimum(dist, dc.min(1))
  return dist


@pytest.mark.parametrize("kind", TRAJECTORY_KINDS)
def test_trajectories_stay_in_free_space_and_move_moderately(kind):
  for seed in range(3):
    scene = build_scene(seed)
    poses = make_trajectory(np.random.default_rng(seed), scene, kind, 48)
    geometry.check_poses(poses, f"{kind} seed {seed}")
    c = poses[:, :3, 3].astype(np.float64)
    assert (scene.region_at(c[:, [0, 2]]) >= 0).all(), f"{kind} seed {seed}: camera outside the layout"
    assert ((c[:, 1] > 0) & (c[:, 1] < scene.height)).all()
    assert _clearance_3d(scene, c).min() >= MARGIN, f"{kind} seed {seed}: camera too close to a solid"
    dt, dr = (np.asarray(x) for x in geometry.pose_distance(poses[1:], poses[:-1]))
    assert dt.max() <= 0.15 + 1e-3 and np.rad2deg(dr.max()) <= 6.0 + 1e-2
    travelled = dt.sum() + dr.sum()
    assert travelled > 0.5, f"{kind} seed {seed}: the camera hardly moves"
    # Smooth: speed changes gradually (no jumps from rest to full speed).
    assert np.abs(np.diff(dt)).max() < 0.08 and np.rad2deg(np.abs(np.diff(dr)).max()) < 3.0


@pytest.mark.parametrize("num_frames", [40, 128])
def test_loop_returns_to_its_start_and_sees_it_again(num_frames):
  clip = render_clip(2, num_frames, 24, 32, trajectory="loop")
  poses = clip["poses_c2w"]
  dt, dr = (float(x) for x in geometry.pose_distance(poses[0], poses[-1]))
  assert dt < 0.05 and np.rad2deg(dr) < 2.0
  away = np.linalg.norm(poses[:, :3, 3] - poses[0, :3, 3], axis=-1).max()
  assert away > 1.0, "a loop must leave its start"
  frames = clip["frames"].astype(np.int16)
  assert np.abs(frames[-1] - frames[0]).mean() < 1.0
  np.testing.assert_allclose(clip["depths"][-1], clip["depths"][0], rtol=1e-3)
  # In the middle the view differs from the start (it really went somewhere else).
  assert np.abs(frames[num_frames // 2] - frames[0]).mean() > 10


def test_random_trajectory_is_drawn_from_the_seed_and_loops_are_common():
  scene = build_scene(0)
  kinds = []
  for seed in range(12):
    clip = render_clip(seed, 6, 8, 8, trajectory="random")
    d, r = (float(x) for x in geometry.pose_distance(clip["poses_c2w"][0], clip["poses_c2w"][-1]))
    kinds.append(d < 1e-4 and r < 1e-4)
  assert scene is not None and 1 <= sum(kinds) < 12   # some loops (back at start), not only loops


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs():
  a = render_clip(3, 8, 24, 32, trajectory="random", moving_objects=1)
  b = render_clip(3, 8, 24, 32, trajectory="random", moving_objects=1)
  assert a.keys() == b.keys()
  for key in a:
    assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key
  c = render_clip(4, 8, 24, 32, trajectory="random", moving_objects=1)
  assert not np.array_equal(a["frames"], c["frames"])
  assert a["caption"] != c["caption"]  # the caption says what differs


def test_caption_describes_the_scene():
  """The caption is made from the scene's own parameters: its path, rooms, the starting
  room's wall colour, and each moving object (kind and colour)."""
  from data_pipelines.procedural import clips  # pylint: disable=g-import-not-at-top
  clip = validate_clip(render_clip(0, 12, 8, 8, trajectory="forward", moving_objects=2), "clip")
  scene = clips.build_scene(0)
  text = clip["caption"]
  assert text.startswith("A camera moves forward through an indoor scene of "
                         f"{len(scene.rooms)} room"), text
  assert text.endswith(" move across the view.") and text.count(" and a ") >= 1, text
  still = render_clip(0, 2, 8, 8, trajectory="pan")["caption"]
  assert "pans around" in still and "across the view" not in still
  assert clips.colour_name((1.0, 0.0, 0.0)) == "red"
  assert clips.colour_name((0.1, 0.1, 0.4)) == "dark blue"
  assert clips.colour_name((0.9, 0.9, 0.9)) == "white"


def test_bad_arguments_raise_input_error():
  with pytest.raises(InputError, match="trajectory"):
    render_clip(0, 4, 8, 8, trajectory="spiral")
  with pytest.raises(InputError, match="num_frames"):
    render_clip(0, 1, 8, 8)


# ----------------------------------------------------------------------------- moving objects


def test_moving_objects_masks_tracks_and_static_pixels():
  static = render_clip(0, 48, 24, 32, trajectory="forward")
  clip = validate_clip(render_clip(0, 48, 24, 32, trajectory="forward", moving_objects=2), "clip")
  masks, tracks = clip["dynamic_masks"], clip["object_tracks"]
  assert tracks.shape == (2, 48, 3) and set(np.unique(masks)) <= {0, 1, 2}
  np.testing.assert_array_equal(clip["poses_c2w"], static["poses_c2w"])
  # Static pixels are untouched by the objects; object pixels are in front of the static scene.
  free = masks == 0
  np.testing.assert_array_equal(clip["frames"][free], static["frames"][free])
  np.testing.assert_array_equal(clip["depths"][free], static["depths"][free])
  assert (clip["depths"][~free] < static["depths"][~free]).all()

  seen_exit_and_return = False
  for k in (1, 2):
    present = (masks == k).any((1, 2))
    assert present.sum() >= 2, f"object {k} is never seen"
    assert np.linalg.norm(np.diff(tracks[k - 1], axis=0), axis=-1).sum() > 0.5, f"object {k} does not move"
    shown = np.flatnonzero(present)
    assert any(not np.array_equal(masks[a] == k, masks[b] == k) for a, b in zip(shown[:-1], shown[1:]))
    # Where its centre projects in front of the static scene, the pixel belongs to the object.
    uv, z = geometry.project_points(tracks[k - 1][:, None], clip["intrinsics"], clip["poses_c2w"])
    uv, z = np.asarray(uv)[:, 0], np.asarray(z)[:, 0]
    u, v = np.floor(uv).astype(int).T
    inside = (z > 0) & (u >= 0) & (u < 32) & (v >= 0) & (v < 24)
    f = np.flatnonzero(inside)
    in_front = z[f] < static["depths"][f, v[f], u[f]] - 0.3
    assert in_front.any()
    assert (masks[f, v[f], u[f]][in_front] > 0).all()
    # Exit and re-entry: seen, then out of view for a while, then seen again.
    gaps = np.diff(shown)
    seen_exit_and_return |= bool((gaps > 1).any())
  assert seen_exit_and_return
