"""Behaviour of the object slots (mirage_jax.memory.objects) on synthetic billboard scenes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.memory import objects

H, W, LH, LW, C = 32, 32, 16, 16, 4
K_IMG = np.array([[32.0, 0, 16], [0, 32.0, 16], [0, 0, 1]], np.float32)  # latent: f = 16, c = 8
F_LAT = 16.0
BACKGROUND = 10.0  # metres: a fronto-parallel wall behind everything
EYE = np.eye(4, dtype=np.float32)
AWAY = geometry.look_at((0.0, 0.0, 0.0), (0.0, 0.0, -1.0))  # looks the other way
CFG = objects.ObjectConfig(H, W, LH, LW, C)

observe = jax.jit(objects.observe)
render = jax.jit(objects.render)


def scene(objs, c2w=EYE, background=BACKGROUND, seed=0):
  """One latent-resolution frame of camera-facing squares in front of a wall.

  Args:
    objs: list of (centre (3,) world, half extent, value (C,)); the nearest wins a cell.
  Returns:
    latents (LH, LW, C), depth (LH, LW), dynamic (LH, LW) bool, as numpy.
  """
  rng = np.random.default_rng(seed)
  latents = rng.normal(size=(LH, LW, C)).astype(np.float32)
  depth = np.full((LH, LW), background, np.float32)
  dynamic = np.zeros((LH, LW), bool)
  v, u = np.mgrid[0:LH, 0:LW] + 0.5
  w2c = np.linalg.inv(c2w)
  for centre, half, value in objs:
    x, y, z = w2c[:3, :3] @ np.asarray(centre, np.float32) + w2c[:3, 3]
    if z <= 0:
      continue
    cu, cv, reach = F_LAT * x / z + LW / 2, F_LAT * y / z + LH / 2, half * F_LAT / z
    cover = (np.abs(u - cu) <= reach + 1e-6) & (np.abs(v - cv) <= reach + 1e-6) & (z < depth)
    latents[cover] = value
    depth[cover] = z
    dynamic |= cover
  return latents, depth, dynamic


def clip(frames, c2ws=None):
  """observe() arguments for a list of ``scene`` outputs (frame indices 0, 1, ...)."""
  f = len(frames)
  c2ws = [EYE] * f if c2ws is None else c2ws
  lat, dep, dyn = (jnp.asarray(np.stack(x)) for x in zip(*frames))
  return dict(latents=lat, depth=dep, intrinsics=jnp.asarray(np.broadcast_to(K_IMG, (f, 3, 3))),
              c2w=jnp.asarray(np.stack(c2ws)), dynamic=dyn, frame_index=jnp.arange(f, dtype=jnp.int32))


def view(c2w=EYE, t=0):
  """render() arguments for one target view."""
  return (jnp.asarray(K_IMG[None]), jnp.asarray(np.asarray(c2w)[None]), jnp.array([t], jnp.int32))


def value(k):
  return np.full((C,), 3.0 + k, np.float32)


def test_write_read_back_full_resolution_inputs():
  lat, dep, dyn = scene([((0.0, 0.0, 4.0), 0.5, value(0))])  # a 4 x 4 block of cells 6..9
  assert dyn.sum() == 16
  lat[dyn] += np.arange(16 * C, dtype=np.float32).reshape(16, C) / 10  # distinctive per cell
  up = lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1)
  args = clip([(lat, up(dep), up(dyn))])
  det = jax.jit(objects.detect, static_argnums=0)(CFG, args["latents"][0], args["depth"][0], args["intrinsics"][0],
                       args["c2w"][0], args["dynamic"][0])
  assert int(det.valid.sum()) == 1 and int(det.cells[0]) == 16
  np.testing.assert_allclose(det.position[0], [0, 0, 4], atol=1e-5)
  np.testing.assert_allclose(det.radius[0], 0.5, atol=1e-5)

  state = observe(objects.init(CFG), **args)
  assert state.valid.sum() == 1 and int(state.ident[state.valid][0]) == 0
  out, cov, depth, ident = (np.asarray(x[0]) for x in render(state, *view()))
  iou = (cov & dyn).sum() / (cov | dyn).sum()
  assert iou >= 0.99, iou
  np.testing.assert_allclose(out[dyn], lat[dyn], atol=1e-4)
  np.testing.assert_allclose(depth[cov], 4.0, atol=1e-5)
  assert set(np.unique(ident[cov])) == {0} and np.all(ident[~cov] == -1)


def test_velocity_damped_extrapolation():
  frames = [scene([((0.0, 0.0, 4.0), 0.25, value(0))]), scene([]),
            scene([((0.5, 0.0, 4.0), 0.25, value(0))])]
  args = clip(frames)
  args["dynamic"] = args["dynamic"].at[1].set(False)
  args["c2w"] = args["c2w"].at[1].set(jnp.asarray(AWAY))  # frame 1 sees nothing
  state = observe(objects.init(CFG), **args)
  assert int(state.valid.sum()) == 1
  i = int(np.argmax(state.valid))
  v = 0.5 * np.array([0.5, 0, 0]) / 2  # EMA (weight 0.5) of one step estimate from rest
  np.testing.assert_allclose(state.velocity[i], v, atol=1e-5)
  tau = CFG.velocity_horizon
  expect = np.array([0.5, 0, 4]) + v * tau * (1 - np.exp(-4 / tau))
  np.testing.assert_allclose(objects.predict(state, 6)[i], expect, atol=1e-5)
  _, cov, _, _ = (np.asarray(x[0]) for x in render(state, *view(t=6)))
  v_idx, u_idx = np.nonzero(cov)
  centre_u = F_LAT * expect[0] / expect[2] + LW / 2
  assert cov.sum() > 0
  assert abs((u_idx + 0.5).mean() - centre_u) < 0.5 and abs((v_idx + 0.5).mean() - LH / 2) < 0.5
  # Without damping the object would be at 0.5 + 4 * 0.125 = 1.0 m (u = 12): clearly off.
  assert abs((u_idx + 0.5).mean() - 12.0) > 0.3


def test_exit_occlusion_and_reentry_keep_the_slot():
  cfg = dataclasses.replace(CFG, miss_limit=1)  # a single visible miss would retire it
  obj = [((0.0, 0.0, 4.0), 0.5, value(0))]
  seen = observe(objects.init(cfg), **clip([scene(obj), scene(obj)]))
  assert int(seen.valid.sum()) == 1
  # Two frames with a wall at 2 m in front of the slot, two looking away.
  away = clip([scene([], background=2.0), scene([], background=2.0), scene([], AWAY), scene([], AWAY)],
              [EYE, EYE, AWAY, AWAY])
  away["frame_index"] = away["frame_index"] + 2
  kept = observe(seen, **away)
  assert int(kept.valid.sum()) == 1 and int(kept.misses.max()) == 0
  back = clip([scene([((0.25, 0.0, 4.0), 0.5, value(0))])])
  back["frame_index"] = back["frame_index"] + 6
  again = observe(kept, **back)
  assert int(again.valid.sum()) == 1 and int(again.ident[again.valid][0]) == 0
  assert int(again.next_ident) == 1
  np.testing.assert_allclose(again.position[again.valid][0], [0.25, 0, 4], atol=1e-4)


def test_retire_after_visible_misses_and_after_max_unseen():
  obj = [((0.0, 0.0, 4.0), 0.5, value(0))]
  state = observe(objects.init(CFG), **clip([scene(obj)]))
  empty = clip([scene([])])  # same camera, wall at 10 m behind the slot: it should be seen
  compiled = []
  for t, alive in ((1, True), (2, False)):  # miss_limit = 2
    empty["frame_index"] = jnp.array([t], jnp.int32)
    state = observe(state, **empty)
    assert bool(state.valid.any()) == alive
    compiled.append(observe._cache_size())
  assert compiled[0] == compiled[1]  # later frames reuse the compiled step
  assert np.all(np.asarray(state.ident) == -1)

  cfg = dataclasses.replace(CFG, max_unseen=96)
  state = observe(objects.init(cfg), **clip([scene(obj)]))
  away = clip([scene([], AWAY)], [AWAY])
  for t, alive in ((96, True), (97, False)):
    away["frame_index"] = jnp.array([t], jnp.int32)
    state = observe(state, **away)
    assert bool(state.valid.any()) == alive


def test_crossing_objects_keep_their_idents():
  cfg = dataclasses.replace(CFG, match_distance=2.0)  # both objects inside each other's gate
  frames = [scene([((-1 + 0.25 * k, -0.5, 4.0), 0.25, value(0)), ((1 - 0.25 * k, 0.5, 4.0), 0.25, value(1))])
            for k in range(9)]
  args = clip(frames)
  first = observe(objects.init(cfg), **{k: v[:1] for k, v in args.items()})
  ident_a = int(first.ident[np.argmin(np.where(first.valid, first.position[:, 1], np.inf))])
  state = observe(first, **{k: v[1:] for k, v in args.items()})
  assert int(state.valid.sum()) == 2 and int(state.next_ident) == 2
  a = int(np.argmax(np.asarray(state.ident) == ident_a))
  np.testing.assert_allclose(state.position[a], [1.0, -0.5, 4.0], atol=1e-4)
  _, cov, _, ident = (np.asarray(x[0]) for x in render(state, *view(t=8)))
  assert set(np.unique(ident[:LH // 2][cov[:LH // 2]])) == {ident_a}  # A is in the top half


def test_more_objects_than_slots_keeps_the_newest():
  cfg = dataclasses.replace(CFG, slots=2)
  old = [((-1.0, -1.0, 4.0), 0.25, value(0)), ((1.0, -1.0, 4.0), 0.25, value(1))]
  new = [((-1.0, 1.0, 4.0), 0.375, value(2)), ((1.0, 1.0, 4.0), 0.375, value(3)),
         ((0.0, 0.0, 4.0), 0.25, value(4))]  # the smallest one does not fit
  args = clip([scene(old), scene(new)])
  first = observe(objects.init(cfg), **{k: v[:1] for k, v in args.items()})
  state = observe(first, **{k: v[1:] for k, v in args.items()})
  per_slot = 1 + 4 + 12 + 12 + 4 + 4 + 4 + 4 * cfg.patch ** 2 * (C + 1)
  assert objects.nbytes(first) == objects.nbytes(state) == 2 * per_slot
  assert sorted(np.asarray(state.ident).tolist()) == [2, 3]
  got = np.asarray(state.position)[np.argsort(state.ident)]
  np.testing.assert_allclose(got, [[-1, 1, 4], [1, 1, 4]], atol=1e-4)

  # A new object takes the least recently seen slot (A: frame 0) and keeps B (frame 1).
  cfg = dataclasses.replace(cfg, miss_limit=10)
  state = observe(objects.init(cfg), **clip([scene(old), scene(old[1:]), scene(new[:1])]))
  assert sorted(np.asarray(state.ident).tolist()) == [1, 2]


def test_jit_vmap_matches_loop_and_chunking():
  cfg = dataclasses.replace(CFG, slots=4)
  clips = [clip([scene([((-1 + s * k, 0.3 * b, 4.0 + b), 0.3, value(b)),
                        ((1 - s * k, -1.0, 5.0), 0.4, value(b + 1))], seed=b * 10 + k) for k in range(4)])
           for b, s in enumerate((0.1, 0.2, 0.3))]
  batch = jax.tree.map(lambda *x: jnp.stack(x), *clips)
  init = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), objects.init(cfg))
  batched = jax.jit(jax.vmap(objects.observe))(init, **batch)
  views = (jnp.asarray(np.broadcast_to(K_IMG, (2, 3, 3))), jnp.asarray(np.stack([EYE, EYE])),
           jnp.array([3, 7], jnp.int32))
  drawn = jax.jit(jax.vmap(objects.render, in_axes=(0, None, None, None)))(batched, *views)
  for b, args in enumerate(clips):
    state = observe(objects.init(cfg), **args)
    assert int(state.valid.sum()) == 2
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(jax.tree.map(lambda a: a[b], batched))):
      np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(render(state, *views), drawn):
      np.testing.assert_allclose(x, y[b], atol=1e-5)
    halves = observe(observe(objects.init(cfg), **{k: v[:2] for k, v in args.items()}),
                     **{k: v[2:] for k, v in args.items()})
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(halves)):
      np.testing.assert_allclose(x, y, atol=1e-5)


def test_bad_config_and_shapes():
  settings = dict(image_height=H, image_width=W, latent_height=LH, latent_width=LW, latent_channels=C)
  assert objects.object_config(settings) == CFG
  for field, bad in (("slots", 0), ("velocity_smoothing", 1.5), ("match_distance", 0.0), ("bogus", 1)):
    with pytest.raises(InputError, match=field):
      objects.object_config({**settings, field: bad})
  with pytest.raises(InputError, match="dynamic"):
    args = clip([scene([])])
    objects.observe(objects.init(CFG), **{**args, "dynamic": args["dynamic"][:, :5]})


def test_generated_frames_neither_open_nor_retire_slots():
  """observed=False: no miss counted, no slot opened, the observed look kept; the track moves."""
  cfg = dataclasses.replace(CFG, miss_limit=1)
  state = observe(objects.init(cfg), **clip([scene([((0.0, 0.0, 4.0), 0.5, value(0))])]))
  generated = dict(observed=jnp.array([False]))
  # In view but not detected: an observed frame retires the slot, a generated one does not.
  empty = clip([scene([])])
  empty["frame_index"] = jnp.array([1], jnp.int32)
  assert not bool(observe(state, **empty).valid.any())
  assert int(observe(state, **empty, **generated).valid.sum()) == 1
  # The object moved 0.2 m and a second one appeared: only an observed frame opens a slot.
  moved = clip([scene([((0.2, 0.0, 4.0), 0.5, value(5)), ((-1.0, 0.0, 4.0), 0.3, value(1))])])
  moved["frame_index"] = jnp.array([1], jnp.int32)
  assert int(observe(state, **moved).valid.sum()) == 2
  out = observe(state, **moved, **generated)
  assert int(out.valid.sum()) == 1 and int(out.next_ident) == 1
  live = np.asarray(out.valid)
  np.testing.assert_allclose(np.asarray(out.position)[live][0], [0.2, 0.0, 4.0], atol=0.06)  # cells
  np.testing.assert_array_equal(np.asarray(out.appearance)[live], np.asarray(state.appearance)[live])
