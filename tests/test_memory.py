"""Behaviour of the latent spatial memories (mirage_jax.memory) on a synthetic box room."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.memory import (BACKEND_NAMES, MemoryConfig, get_backend, init_batch, memory_config,
                               retrieval)
from mirage_jax.memory import frame_bank, splatting

H, W, LH, LW, C = 16, 16, 8, 8, 4
HALF = np.array([2.0, 1.5, 2.5])  # box room half extents (x, y, z), centred at the origin
K_IMG = geometry.intrinsics_from_fov(60.0, H, W)


def box_room_depth(c2w, K=K_IMG, height=H, width=W):
  """(height, width) z-depth of the inside of the box room, by ray-plane intersection."""
  v, u = np.mgrid[0:height, 0:width] + 0.5
  rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
  d = rays @ c2w[:3, :3].T  # world directions whose camera z is 1, so ray t = z-depth
  o = c2w[:3, 3]
  with np.errstate(divide="ignore"):
    t = (np.sign(d) * HALF - o) / d
  t = np.where(np.abs(d) < 1e-9, np.inf, t)
  return t.min(-1).astype(np.float32)


def orbit_pose(angle, radius=0.6):
  """Camera on a circle around the room centre, looking outward."""
  eye = np.array([radius * np.sin(angle), 0.2, radius * np.cos(angle)])
  return geometry.look_at(eye, eye + np.array([np.sin(angle), 0.0, np.cos(angle)]))


def make_frames(angles, seed=0, first_index=0):
  """Dict of write() arguments for cameras at the given orbit angles, random latents."""
  c2w = np.stack([orbit_pose(a) for a in angles])
  f = len(angles)
  rng = np.random.default_rng(seed)
  return dict(latents=jnp.asarray(rng.normal(size=(f, LH, LW, C)), jnp.float32),
              depth=jnp.asarray(np.stack([box_room_depth(p) for p in c2w])),
              intrinsics=jnp.asarray(np.broadcast_to(K_IMG, (f, 3, 3))),
              c2w=jnp.asarray(c2w), static_mask=jnp.ones((f, H, W), bool),
              frame_index=jnp.arange(first_index, first_index + f, dtype=jnp.int32),
              rgb=jnp.asarray(rng.uniform(size=(f, H, W, 3)), jnp.float32))


def encode(rgb):
  """Stand-in encoder for rgb_points: average-pool to the latent grid, fixed linear map to C."""
  f = rgb.shape[0]
  pooled = rgb.reshape(f, LH, H // LH, LW, W // LW, 3).mean(axis=(2, 4))
  return pooled @ jnp.arange(3 * C, dtype=jnp.float32).reshape(3, C) / (3 * C)


def config(**kw):
  base = dict(image_height=H, image_width=W, latent_height=LH, latent_width=LW, latent_channels=C,
              capacity=4096, feature_dtype="float32", voxel_size=0.05)
  base.update(kw)
  return MemoryConfig(**base)


@functools.lru_cache(maxsize=None)
def backend(name):
  """The backend with jitted write and read (one compile per shape for the whole file)."""
  be = get_backend(name, encode_fn=encode if name == "rgb_points" else None)
  return be._replace(write=jax.jit(be.write), read=jax.jit(be.read))


def capacity_for(name):
  return {"frame_bank": 16, "rgb_points": 8 * H * W}.get(name, 4096)


# ----------------------------------------------------------------------------- write / read


def test_mirage_reads_back_exactly_at_the_written_pose():
  be = backend("mirage")
  fr = make_frames([0.3])
  state = be.write(be.init(config()), **fr)
  lat, cov = be.read(state, fr["intrinsics"], fr["c2w"])
  assert cov.mean() == 1.0
  np.testing.assert_array_equal(np.asarray(lat), np.asarray(fr["latents"]))


def test_voxel_reads_back_closely_at_the_written_pose():
  be = backend("voxel")
  fr = make_frames([0.3])
  state = be.write(be.init(config(feature_dtype="bfloat16")), **fr)
  lat, cov = be.read(state, fr["intrinsics"], fr["c2w"])
  assert cov.mean() >= 0.95
  err = np.abs(np.asarray(lat, np.float32) - np.asarray(fr["latents"]))[np.asarray(cov)]
  assert np.median(err) < 0.02 and err.mean() < 0.1


def test_voxel_merge_prefers_the_newest_view():
  fr_a, fr_b = make_frames([0.3], seed=1), make_frames([0.3], seed=2, first_index=1)
  for decay, expect in [(0.0, fr_b["latents"]), (1.0, 0.5 * (fr_a["latents"] + fr_b["latents"]))]:
    be = backend("voxel")
    state = be.write(be.write(be.init(config(recency_decay=decay)), **fr_a), **fr_b)
    lat, cov = be.read(state, fr_b["intrinsics"], fr_b["c2w"])
    np.testing.assert_allclose(np.asarray(lat)[np.asarray(cov)], np.asarray(expect)[np.asarray(cov)], atol=1e-5)
    assert int(state.count.max()) == 2


def test_voxel_footprint_fills_holes_near_a_wall():
  # Written from the room centre, read 0.6 m from the wall: the written samples are sparse
  # there, and voxels projecting larger than a latent pixel fill the gaps only with a footprint.
  fr = make_frames(np.linspace(-0.3, 0.3, 7))
  eye = np.array([0.0, 0.2, 1.9])
  close = jnp.asarray(geometry.look_at(eye, eye + np.array([0.0, 0.0, 1.0])))[None]
  be = backend("voxel")
  cov = {}
  for r in (0, 1):
    state = be.write(be.init(config(voxel_size=0.3, splat_radius=r)), **fr)
    cov[r] = float(be.read(state, fr["intrinsics"][:1], close)[1].mean())
  mirage = backend("mirage")
  cov_mirage = float(mirage.read(mirage.write(mirage.init(config()), **fr), fr["intrinsics"][:1], close)[1].mean())
  assert cov[1] >= cov[0] + 0.3 and cov[1] > cov_mirage + 0.3


def test_dynamic_pixels_stay_out():
  fr = make_frames([0.3])
  fr["static_mask"] = fr["static_mask"].at[:, :, : W // 2].set(False)
  for name in ("mirage", "voxel"):
    be = backend(name)
    _, cov = be.read(be.write(be.init(config()), **fr), fr["intrinsics"], fr["c2w"])
    assert not np.asarray(cov)[:, :, : LW // 2].any() and np.asarray(cov)[:, :, LW // 2:].mean() > 0.9


# ----------------------------------------------------------------------------- growth


def test_voxel_bytes_stop_growing_on_a_loop_while_mirage_grows_linearly():
  # 200 frames: two laps of the same orbit, the second lap offset by half a step. Voxels
  # about the size of a latent pixel's footprint (~0.2-0.4 m here) saturate in one lap.
  angles = np.concatenate([np.linspace(0, 2 * np.pi, 100, endpoint=False)] * 2)
  angles[100:] += np.pi / 100
  cfgs = {"voxel": config(capacity=4096, voxel_size=0.2, feature_dtype="bfloat16"),
          "mirage": config(capacity=200 * LH * LW, feature_dtype="bfloat16")}
  sizes = {}
  for name, cfg in cfgs.items():
    be = backend(name)
    write = be.write
    state = be.init(cfg)
    sizes[name] = []
    for start in range(0, 200, 20):
      fr = make_frames(angles[start:start + 20], seed=start, first_index=start)
      state = write(state, **fr)
      sizes[name].append(be.nbytes(state))
  vox, mir = np.array(sizes["voxel"]), np.array(sizes["mirage"])
  np.testing.assert_array_equal(np.diff(mir), mir[0])  # linear: same bytes per chunk
  assert vox[-1] <= 1.05 * vox[4]  # second lap adds (almost) nothing
  assert vox[-1] < 0.5 * mir[-1]
  assert vox[-1] < get_backend("voxel").capacity_bytes(state)


# ----------------------------------------------------------------------------- retrieval


def _history(angles):
  """Latent-resolution world points (S, h*w, 3) of cameras at the orbit angles."""
  c2w = np.stack([orbit_pose(a) for a in angles])
  K_lat = np.asarray(geometry.scale_intrinsics(K_IMG, LW / W, LH / H))
  depth = np.stack([box_room_depth(p, K_lat, LH, LW) for p in c2w])
  pts = np.asarray(jax.jit(geometry.unproject_depth)(depth, K_lat, c2w)).reshape(len(angles), -1, 3)
  return jnp.asarray(pts), jnp.ones(pts.shape[:2], bool), K_lat


def test_voxel_iou_retrieval_picks_the_frames_that_saw_the_target():
  angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)  # 30 degrees apart
  pts, valid, K_lat = _history(angles)
  ids = jnp.arange(100, 112, dtype=jnp.int32)
  t_pts, t_valid, _ = _history([angles[5] + 0.1])
  select = jax.jit(retrieval.select_reference_frames)
  idx, scores = select(t_pts[0], t_valid[0], pts, valid, ids)
  idx, scores = np.asarray(idx), np.asarray(scores)
  assert idx[0] == 105
  assert set(idx[idx >= 0]) <= {104, 105, 106}
  assert np.all(np.diff(scores) <= 0)
  assert np.all((idx >= 0) == (scores >= retrieval.IOU_THRESHOLD))
  # The target's visible set can also come from memory points inside its frustum.
  flat = pts.reshape(-1, 3)
  vis = jax.jit(retrieval.visible_points, static_argnums=(4, 5))(
      flat, jnp.ones(flat.shape[0], bool), jnp.asarray(K_lat), jnp.asarray(orbit_pose(angles[5] + 0.1)), LH, LW)
  idx2, _ = jax.jit(retrieval.select_reference_frames)(flat, vis, pts, valid, ids)
  assert int(idx2[0]) == 105


def test_iou_of_identical_sets_is_one_and_disjoint_is_zero():
  pts, valid, _ = _history([0.0, np.pi])
  voxel_iou = jax.jit(retrieval.voxel_iou)
  iou = np.asarray(voxel_iou(pts[0], valid[0], pts, valid))
  np.testing.assert_allclose(iou, [1.0, 0.0])
  iou = np.asarray(voxel_iou(pts[0], jnp.zeros_like(valid[0]), pts, valid))
  np.testing.assert_array_equal(iou, [0.0, 0.0])


def test_frame_bank_retrieves_by_frustum_overlap():
  be = backend("frame_bank")
  retrieve = jax.jit(frame_bank.retrieve, static_argnums=3)
  angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
  state = be.write(be.init(config(capacity=8)), **make_frames(angles, first_index=10))
  target = jnp.asarray(orbit_pose(angles[3] + 0.05))[None]
  idx, scores, lat = retrieve(state, jnp.asarray(K_IMG)[None], target, 3)
  assert int(idx[0, 0]) == 13 and float(scores[0, 0]) > 0.8
  np.testing.assert_array_equal(np.asarray(lat[0, 0]), np.asarray(state.latents[3]))
  away = jnp.asarray(orbit_pose(angles[3] + np.pi))[None]
  far = be.init(config(capacity=8))
  far = be.write(far, **make_frames([angles[3]], first_index=10))
  idx, _, lat = retrieve(far, jnp.asarray(K_IMG)[None], away, 2)
  np.testing.assert_array_equal(np.asarray(idx), [[-1, -1]])
  assert not np.asarray(lat).any()


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_empty_masked_seen_and_looking_away(name):
  be = backend(name)
  state = be.init(config(capacity=capacity_for(name)))
  fr = make_frames([0.0, 0.05])
  lat, cov = be.read(state, fr["intrinsics"], fr["c2w"])
  assert lat.shape == (2, LH, LW, C) and cov.shape == (2, LH, LW)
  assert not np.asarray(cov).any() and not np.asarray(lat).any()
  masked = be.write(state, **dict(fr, static_mask=jnp.zeros_like(fr["static_mask"])))
  if name != "frame_bank":  # a frame bank stores whole frames, masked or not
    assert be.nbytes(masked) == 0
  assert not np.asarray(be.read(masked, fr["intrinsics"], fr["c2w"])[1]).any()
  state = be.write(state, **fr)
  _, cov = be.read(state, fr["intrinsics"], fr["c2w"])
  assert np.asarray(cov).mean() > 0.5 or name == "none"
  assert (be.nbytes(state) > 0) == (name != "none")
  # Turned 180 degrees: everything in memory is behind the camera.
  away = jnp.asarray(np.stack([orbit_pose(np.pi), orbit_pose(np.pi + 0.05)]))
  lat, cov = be.read(state, fr["intrinsics"], away)
  assert not np.asarray(cov).any() and not np.asarray(lat).any()


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_full_buffer_keeps_the_newest_and_bad_depth_is_skipped(name):
  be = backend(name)
  small = {"frame_bank": 2, "rgb_points": H * W, "voxel": 40, "mirage": LH * LW}.get(name, 8)
  state = be.init(config(capacity=small))
  for i, a in enumerate([2.0, 1.0, 0.0]):
    fr = make_frames([a, a + 0.15], seed=i, first_index=2 * i)
    # Unusable depth in the top 4 rows (the top 2 latent rows).
    fr["depth"] = fr["depth"].at[:, 0].set(jnp.inf).at[:, 1].set(-1.0).at[:, 2].set(0.0).at[:, 3].set(jnp.nan)
    state = be.write(state, **fr)
  assert 0 <= be.nbytes(state) <= be.capacity_bytes(state)
  if name != "none":
    assert be.nbytes(state) > 0
  lat, cov = be.read(state, fr["intrinsics"], fr["c2w"])
  assert np.all(np.isfinite(np.asarray(lat, np.float32)))
  if name in ("mirage", "voxel", "frame_bank"):
    assert not np.asarray(cov)[1, :2].any()  # nothing lifted from the bad rows
  if name in ("mirage", "frame_bank"):  # exact baselines: the newest frame mostly reads back exactly
    c = np.asarray(cov[1])
    same = np.all(np.asarray(lat[1]) == np.asarray(fr["latents"][1]), -1)
    assert c.sum() > 0 and same[c].mean() >= 0.7
  elif name != "none":
    assert np.asarray(cov).any()  # the last frames written are what survives


def test_bad_inputs_raise_input_errors():
  with pytest.raises(InputError, match="capacity"):
    memory_config(ml_collections.ConfigDict(dict(dataclasses.asdict(config()), capacity=0)))
  with pytest.raises(InputError, match="bogus"):
    memory_config(dict(dataclasses.asdict(config()), bogus=1))
  with pytest.raises(InputError, match="unknown memory backend"):
    get_backend("lru")
  with pytest.raises(InputError, match="encode_fn"):
    get_backend("rgb_points")
  be = backend("voxel")
  fr = make_frames([0.0])
  fr["depth"] = fr["depth"][:, :5]
  with pytest.raises(InputError, match="depth"):
    be.write(be.init(config()), **fr)
  assert memory_config(ml_collections.ConfigDict(dataclasses.asdict(config()))) == config()


# ----------------------------------------------------------------------------- batching


def _batch(b):
  """Batched write() arguments: scene i sees the orbit from angle 0.5 * i."""
  frs = [make_frames([0.5 * i, 0.5 * i + 0.05], seed=i) for i in range(b)]
  return jax.tree.map(lambda *x: jnp.stack(x), *frs)


def _step(be, cfg):
  def step(fr, target_c2w):
    state = be.write(be.init(cfg), **fr)
    return be.read(state, fr["intrinsics"], target_c2w)
  return jax.vmap(step)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_jit_vmap_is_batch_order_equivariant(name):
  be, cfg = backend(name), config(capacity=capacity_for(name))
  fr = _batch(3)
  target = jnp.roll(fr["c2w"], 1, axis=1)
  run = jax.jit(_step(be, cfg))
  lat, cov = run(fr, target)
  perm = np.array([2, 0, 1])
  lat_p, cov_p = run(jax.tree.map(lambda x: x[perm], fr), target[perm])
  np.testing.assert_array_equal(np.asarray(lat_p), np.asarray(lat)[perm])
  np.testing.assert_array_equal(np.asarray(cov_p), np.asarray(cov)[perm])
  one = jax.tree.map(lambda x: x[1], fr)
  lat1, _ = be.read(be.write(be.init(cfg), **one), one["intrinsics"], target[1])
  np.testing.assert_allclose(np.asarray(lat1, np.float32), np.asarray(lat[1], np.float32), atol=1e-6)


@pytest.mark.parametrize("name", ["voxel", "mirage"])
def test_runs_sharded_over_eight_devices(name):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  be, cfg = backend(name), config(capacity=capacity_for(name))
  fr = jax.device_put(_batch(8), batch_sharding)
  state = jax.device_put(init_batch(be, cfg, 8), batch_sharding)
  state = jax.jit(jax.vmap(be.write))(state, **fr)
  lat, cov = jax.jit(jax.vmap(be.read))(state, fr["intrinsics"], fr["c2w"])
  for x in jax.tree.leaves(state) + [lat, cov]:  # state and reads stay split over the batch
    assert x.sharding.is_equivalent_to(batch_sharding, x.ndim)
  assert np.asarray(cov).mean() > 0.9
  for i in (0, 5):  # same as one scene at a time, unsharded
    one = jax.tree.map(lambda x: np.asarray(x[i]), fr)
    lat_i, cov_i = be.read(be.write(be.init(cfg), **one), one["intrinsics"], one["c2w"])
    np.testing.assert_array_equal(np.asarray(cov[i]), np.asarray(cov_i))
    np.testing.assert_allclose(np.asarray(lat[i], np.float32), np.asarray(lat_i, np.float32), atol=1e-6)


def test_splat_depth_band_prefers_priority_over_a_hair_closer_point():
  """Two points on one surface in one cell: the exact z-buffer takes the closer, the depth
  band takes the higher priority (the voxel read's most recently seen)."""
  K = np.array([[2.0, 0, 1.0], [0, 2.0, 1.0], [0, 0, 1]], np.float32)  # 2x2 image
  c2w = np.eye(4, dtype=np.float32)
  points = jnp.array([[-0.1, -0.1, 1.00], [-0.1, -0.1, 1.02], [-0.1, -0.1, 2.0]])
  values = jnp.array([[1.0], [2.0], [3.0]])
  valid = jnp.ones(3, bool)
  priority = jnp.array([0, 5, 9], jnp.int32)  # the far point is newest but another surface
  exact, _, _ = splatting.splat(points, values, valid, K, c2w, 2, 2, 1e-3)
  band, covered, depth = splatting.splat(points, values, valid, K, c2w, 2, 2, 1e-3,
                                         priority=priority, depth_tolerance=0.05)
  assert float(exact[0, 0, 0]) == 1.0
  assert float(band[0, 0, 0]) == 2.0 and bool(covered[0, 0])
  assert abs(float(depth[0, 0]) - 1.02) < 1e-5


# ----------------------------------------------------------------------------- rgb_points, video


def test_rgb_points_render_in_steps_equals_one_vmapped_splat(monkeypatch):
  """Rendering frames in bounded steps (``lax.map``) gives exactly the single vmapped splat
  of all frames (the render before steps) for any step size, remainder included."""
  from mirage_jax.memory import rgb_points
  be = get_backend("rgb_points", encode_fn=encode)
  state = be.write(be.init(config(capacity=capacity_for("rgb_points"))),
                   **make_frames([0.0, 0.4, 1.1], seed=3))
  c2w = jnp.asarray(np.stack([orbit_pose(a) for a in [0.1, 0.5, 1.0, np.pi, 0.3]]))
  K = jnp.asarray(np.broadcast_to(K_IMG, (5, 3, 3)))
  cfg = state.cfg

  def old(K1, c2w1):  # one vmapped splat over all target frames
    image, covered, _ = splatting.splat(state.points, state.rgb, state.valid, K1, c2w1,
                                        cfg.image_height, cfg.image_width, cfg.near)
    return image.astype(jnp.float32) / 255.0, covered

  want_rgb, want_cov = jax.jit(jax.vmap(old))(K, c2w)
  assert 0.2 < float(want_cov.mean()) < 1.0  # some frames see the cloud, one does not
  n = state.points.shape[0]
  monkeypatch.setattr(rgb_points, "RENDER_POINT_FRAMES", 2 * n)  # default: 2 frames a step
  assert rgb_points.render_frames_per_step(n, 5) == 2
  assert rgb_points.render_frames_per_step(117_000_000, 33) == 1
  for step in (None, 1, 2, 5):
    rgb, cov = jax.jit(functools.partial(rgb_points.render, frames_per_step=step))(state, K, c2w)
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(want_rgb), err_msg=f"step {step}")
    np.testing.assert_array_equal(np.asarray(cov), np.asarray(want_cov), err_msg=f"step {step}")
  with pytest.raises(InputError, match="frames_per_step"):
    rgb_points.render(state, K, c2w, frames_per_step=-1)


def test_rgb_points_video_read_pools_coverage_over_each_latents_frames():
  """A temporally compressing encoder (a causal video VAE: 1 + 2k frames -> 1 + k latents):
  ``read`` takes every video frame's camera, and a latent's coverage pools its frames."""
  t = 2

  def encode_video(rgb):  # latent 0 <- frame 0; latent j <- frames 2j-1, 2j (their mean)
    per = encode(rgb)
    return jnp.concatenate([per[:1], per[1:].reshape(-1, t, *per.shape[1:]).mean(1)], 0)

  cfg = config(capacity=capacity_for("rgb_points"))
  be = get_backend("rgb_points", encode_fn=encode_video)
  be = be._replace(write=jax.jit(be.write), read=jax.jit(be.read))
  fr = make_frames([0.0])
  state = be.write(be.init(cfg), **fr)
  away = np.asarray(orbit_pose(np.pi))  # faces the other wall: sees none of the points
  # Video frames 0..4 -> latents 0, 1 (frames 1, 2), 2 (frames 3, 4).
  c2w = np.stack([fr["c2w"][0], fr["c2w"][0], away, away, away])
  lat, cov = be.read(state, np.broadcast_to(K_IMG, (5, 3, 3)), c2w)
  assert lat.shape == (3, LH, LW, C) and cov.shape == (3, LH, LW)
  assert cov[0].all() and not cov[2].any()
  # Latent 1 encodes one covered and one empty frame: half its pixels, covered (>= 0.5).
  assert cov[1].all()
  np.testing.assert_allclose(lat[0], encode(fr["rgb"])[0], atol=1e-2)  # uint8 colours
  np.testing.assert_array_equal(lat[2], 0.0)
  odd = get_backend("rgb_points", encode_fn=lambda rgb: encode(rgb)[:3])
  with pytest.raises(InputError, match="encode_fn"):  # 4 frames cannot make 3 latents
    odd.read(state, np.broadcast_to(K_IMG, (4, 3, 3)), c2w[:4])
