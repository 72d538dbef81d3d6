"""Tests of the Grain input pipeline on small in-memory clips."""

import itertools

import grain
import numpy as np
import pytest

from data_pipelines import pipeline
from mirage_jax import geometry
from mirage_jax.errors import InputError


def make_clip(eyes, targets, height=24, width=32, seed=0, frames=None):
  """A clip dict with random frames, positive depth and look_at poses through ``eyes``."""
  t = len(eyes)
  rng = np.random.default_rng(seed)
  if frames is None:
    frames = rng.integers(0, 256, (t, height, width, 3), dtype=np.uint8)
  return dict(
      frames=frames,
      depths=rng.uniform(0.5, 8.0, (t, height, width)).astype(np.float32),
      intrinsics=np.stack([geometry.intrinsics_from_fov(60.0, height, width)] * t),
      poses_c2w=np.stack([geometry.look_at(e, g) for e, g in zip(eyes, targets)]),
      fps=np.float32(10.0),
      dynamic_masks=rng.integers(0, 3, (t, height, width), dtype=np.uint8))


def straight_clip(t=24, seed=0, step=0.3):
  """Camera walking forward along +z, never coming back."""
  eyes = [(0.0, 0.0, step * i) for i in range(t)]
  return make_clip(eyes, [(0.0, 0.0, e[2] + 1.0) for e in eyes], seed=seed)


def out_and_back_clip(t=24, seed=0):
  """Camera sliding 3 m along x and back every 8 frames, always looking along +z."""
  xs = [3.0 * (1 - abs((i % 8) - 4) / 4) for i in range(t)]
  return make_clip([(x, 0.0, 0.0) for x in xs], [(x, 0.0, 1.0) for x in xs], seed=seed)


@pytest.fixture(scope="module")
def clips():
  return [straight_clip(seed=i) if i % 2 else out_and_back_clip(seed=i) for i in range(8)]


BASE = dict(num_frames=4, stride=2, resolution=(16, 16), batch_size=2, shard_index=0,
            shard_count=1, read_threads=0)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("src_hw,resolution,crop", [
    ((48, 64), (24, 24), "center"),   # exact 1/2, centre crop of the width
    ((40, 60), (16, 16), "random"),   # 1/2.5, random crop
    ((30, 30), (16, 20), "random"),   # 2/3, crop of the height
    ((12, 12), (16, 20), "random"),   # upsampling 5/3
    ((40, 60), (16, 16), "random_native"),  # no resize, random crop
    ((12, 12), (16, 20), "random_native"),  # too small: upsampled to cover, as "random"
])
def test_adjusted_intrinsics_project_onto_the_moved_content(src_hw, resolution, crop):
  # Red encodes the source column and green the source row, linearly: resampling reproduces a
  # linear ramp exactly, so every output pixel says which source position it shows.
  h, w = src_hw
  t, ramp = 3, 4
  frames = np.zeros((t, h, w, 3), np.uint8)
  frames[..., 0] = ramp * np.arange(w)[None, None, :] + 2
  frames[..., 1] = ramp * np.arange(h)[None, :, None] + 2
  clip = make_clip([(0.0, 0.0, 0.1 * i) for i in range(t)],
                   [(0.2, 0.1, 2.0 + 0.1 * i) for i in range(t)], height=h, width=w,
                   frames=frames)
  clip["depths"][:] = 3.0
  for seed in range(3):
    batch = next(pipeline.make_iterator(
        [clip], num_frames=t, stride=1, resolution=resolution, batch_size=1, seed=seed,
        crop=crop, shard_index=0, shard_count=1))
    values = (batch["frames"][0] + 1.0) * 127.5  # (T, H', W', 3) in [0, 255]
    src_xy = (values[..., :2] - 2.0) / ramp + 0.5  # continuous source (x, y) of each pixel
    # World point of that source position on the depth-3 plane: d * K^-1 (x, y, 1), to world.
    rays = np.concatenate([src_xy, np.ones_like(src_xy[..., :1])], -1)
    cam = 3.0 * np.einsum("tij,thwj->thwi", np.linalg.inv(clip["intrinsics"]), rays)
    world = (np.einsum("tij,thwj->thwi", clip["poses_c2w"][:, :3, :3], cam)
             + clip["poses_c2w"][:, None, None, :3, 3])
    uv, z = geometry.project_points(world.reshape(t, -1, 3), batch["intrinsics"][0],
                                    batch["poses_c2w"][0])
    centres = np.asarray(geometry.pixel_grid(*resolution)).reshape(-1, 2)
    # Bilinear upsampling clamps at the border; there the content is not a ramp.
    inside = ((src_xy > 0.5 + 1e-3) & (src_xy < np.array([w, h]) - 0.5 - 1e-3)).all(-1)
    inside = inside.reshape(t, -1)
    assert inside.mean() > 0.5
    # Tolerance: area averaging over partly covered source pixels moves a ramp by a few
    # hundredths of a pixel (< 0.06 here); an intrinsics error of half a source or output
    # pixel is >= 0.2.
    np.testing.assert_allclose(np.asarray(uv)[inside], np.broadcast_to(centres, uv.shape)[inside],
                               atol=0.1)
    np.testing.assert_allclose(np.asarray(z), 3.0, rtol=1e-4)


def test_native_crops_are_pixels_of_the_source():
  """crop='random_native': each output frame is a block of the source frame, unresized, at
  offsets that vary with the seed."""
  t, h, w = 2, 40, 60
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
  clip = make_clip([(0.0, 0.0, 0.0)] * t, [(0.0, 0.0, 2.0)] * t, height=h, width=w,
                   frames=frames)
  offsets = set()
  for seed in range(6):
    batch = next(pipeline.make_iterator(
        [clip], num_frames=t, stride=1, resolution=(16, 24), batch_size=1, seed=seed,
        crop="random_native", shard_index=0, shard_count=1, frames_dtype="uint8"))
    out = np.asarray(batch["frames"][0])
    found = [(y, x) for y in range(h - 15) for x in range(w - 23)
             if np.array_equal(frames[:, y:y + 16, x:x + 24], out)]
    assert len(found) == 1, seed
    offsets.add(found[0])
  assert len(offsets) > 1


def test_depth_and_masks_are_resampled_nearest():
  clip = straight_clip(t=4)
  batch = next(pipeline.make_iterator([clip], **dict(BASE, num_frames=2, stride=1,
                                                     batch_size=1, seed=0)))
  for key in ("depths", "dynamic_masks"):
    # Every output value is a value of the source window (no blending).
    assert np.isin(batch[key], clip[key]).all(), key
  assert batch["dynamic_masks"].dtype == np.uint8


def test_output_types_and_ranges(clips):
  it = pipeline.make_iterator(clips, **BASE, seed=0)
  for batch in take(it, 4):
    assert batch["frames"].shape == (2, 4, 16, 16, 3) and batch["frames"].dtype == np.float32
    assert batch["depths"].shape == (2, 4, 16, 16) and batch["depths"].dtype == np.float32
    assert batch["intrinsics"].shape == (2, 4, 3, 3)
    assert batch["poses_c2w"].shape == (2, 4, 4, 4)
    assert batch["dynamic_masks"].shape == (2, 4, 16, 16)
    assert batch["is_revisit"].shape == (2,) and batch["is_revisit"].dtype == bool
    assert batch["frames"].min() >= -1.0 and batch["frames"].max() <= 1.0
    assert (batch["depths"] > 0).all()


def test_black_and_white_map_to_minus_one_and_one():
  clip = straight_clip(t=4)
  clip["frames"][:] = 0
  clip["frames"][:, :, 16:] = 255
  frames = next(pipeline.make_iterator([clip], **dict(BASE, num_frames=2, batch_size=1),
                                       seed=0))["frames"]
  np.testing.assert_allclose(frames[..., :4, :], -1.0, atol=1e-6)
  np.testing.assert_allclose(frames[..., -4:, :], 1.0, atol=1e-6)


def test_window_follows_stride_and_source_poses():
  clips = [straight_clip(seed=i) for i in range(2)]  # every pose differs
  batch = next(pipeline.make_iterator(clips, **BASE, seed=3))
  for b in range(2):
    poses = clips[batch["clip_index"][b]]["poses_c2w"]
    matches = [np.flatnonzero(np.all(np.isclose(poses, p), axis=(1, 2)))[0]
               for p in batch["poses_c2w"][b]]
    np.testing.assert_array_equal(np.diff(matches), 2)


# ----------------------------------------------------------------------------- revisits


def has_revisit_pair(poses, distance, angle_deg, gap):
  """Brute-force check: a pair (a, b), b - a >= gap, close, with a far frame in between."""
  def close(i, j):
    d = np.linalg.norm(poses[i, :3, 3] - poses[j, :3, 3])
    cos = np.clip(poses[i, :3, 2] @ poses[j, :3, 2], -1.0, 1.0)
    return d <= distance and np.degrees(np.arccos(cos)) <= angle_deg
  return any(close(a, b) and any(not close(a, k) for k in range(a + 1, b))
             for a, b in itertools.combinations(range(len(poses)), 2) if b - a >= gap)


def test_require_revisit_windows_contain_a_revisit_pair():
  clips = [out_and_back_clip(seed=i) for i in range(4)]
  kwargs = dict(BASE, num_frames=6, stride=1, require_revisit=True, revisit_distance=0.5,
                revisit_angle_deg=10.0, min_revisit_gap=3)
  it = pipeline.make_iterator(clips, **kwargs, seed=0)
  for batch in take(it, 6):
    assert batch["is_revisit"].all()
    for poses in batch["poses_c2w"]:
      assert has_revisit_pair(poses, 0.5, 10.0, 3)
  # Without require_revisit, some windows of the same clips hold no revisit, and the flag says so.
  it = pipeline.make_iterator(clips, **dict(kwargs, require_revisit=False), seed=0)
  flags = [(bool(f), has_revisit_pair(p, 0.5, 10.0, 3))
           for batch in take(it, 8) for f, p in zip(batch["is_revisit"], batch["poses_c2w"])]
  assert all(f == truth for f, truth in flags)
  assert {f for f, _ in flags} == {True, False}


def test_require_revisit_falls_back_when_no_window_qualifies():
  standing = make_clip([(0.0, 0.0, 0.0)] * 12, [(0.0, 0.0, 1.0)] * 12)  # never leaves
  clips = [straight_clip(), standing]
  it = pipeline.make_iterator(clips, **dict(BASE, num_frames=6, stride=1, require_revisit=True,
                                            min_revisit_gap=3, shuffle=False), seed=0)
  batch = next(it)
  assert not batch["is_revisit"].any()
  assert (batch["depths"] > 0).all()


# ----------------------------------------------------------------------------- order & state


def test_same_seed_same_batches_different_seed_different(clips):
  a = take(pipeline.make_iterator(clips, **BASE, crop="random", seed=1), 5)
  b = take(pipeline.make_iterator(clips, **BASE, crop="random", seed=1), 5)
  c = take(pipeline.make_iterator(clips, **BASE, crop="random", seed=2), 5)
  assert_batches_equal(a, b)
  assert not all(np.array_equal(x["frames"], y["frames"]) for x, y in zip(a, c))


def test_epochs_are_finite_cover_the_data_and_reshuffle(clips):
  batches = list(pipeline.make_iterator(clips, **BASE, seed=0, num_epochs=2))
  assert len(batches) == 8  # 2 epochs x 8 clips / batch 2
  order = np.concatenate([b["clip_index"] for b in batches])
  assert sorted(order[:8]) == sorted(order[8:]) == list(range(8))
  assert list(order[:8]) != list(order[8:])
  unshuffled = list(pipeline.make_iterator(clips, **BASE, seed=0, num_epochs=1, shuffle=False))
  assert list(np.concatenate([b["clip_index"] for b in unshuffled])) == list(range(8))


def test_shards_are_disjoint_and_cover_the_epoch(clips):
  seen = []
  for shard in range(2):
    it = pipeline.make_iterator(clips, **dict(BASE, batch_size=4, shard_index=shard,
                                              shard_count=2), seed=0, num_epochs=1)
    batches = list(it)
    assert len(batches) == 2 and all(b["frames"].shape[0] == 2 for b in batches)
    seen.append({int(i) for b in batches for i in b["clip_index"]})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(8))


def test_resume_from_state_gives_the_same_next_batches(clips):
  kwargs = dict(BASE, crop="random", seed=5)
  it = pipeline.make_iterator(clips, **kwargs)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  resumed = pipeline.make_iterator(clips, **kwargs)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)


def test_worker_processes_give_the_same_batches_and_resume(clips):
  kwargs = dict(BASE, crop="random", seed=5, require_revisit=True, min_revisit_gap=2)
  in_process = take(pipeline.make_iterator(clips, **kwargs), 5)
  it = pipeline.make_iterator(clips, **kwargs, worker_count=2)
  try:
    assert_batches_equal(take(it, 2), in_process[:2])
    state = it.get_state()
  finally:
    it.close()
  resumed = pipeline.make_iterator(clips, **kwargs, worker_count=2)
  try:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), in_process[2:])
  finally:
    resumed.close()


def test_orbax_checkpoint_round_trip(clips, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  kwargs = dict(BASE, seed=7)
  it = pipeline.make_iterator(clips, **kwargs)
  take(it, 2)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 2)
    resumed = pipeline.make_iterator(clips, **kwargs)
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_batches_equal(take(resumed, 2), expected)


# ----------------------------------------------------------------------------- config & errors


def test_from_config_matches_make_dataset(clips):
  config = pipeline.default_config()
  config.update(dict(BASE, seed=4, crop="random"))
  config.dataset = "ignored extra field"
  a = take(iter(pipeline.from_config(clips, config)), 2)
  b = take(pipeline.make_iterator(clips, **BASE, seed=4, crop="random"), 2)
  assert_batches_equal(a, b)
  del config.crop
  with pytest.raises(InputError, match="'crop'"):
    pipeline.from_config(clips, config)


@pytest.mark.parametrize("override,field", [
    (dict(resolution=(16,)), "resolution"),
    (dict(crop="left"), "crop"),
    (dict(batch_size=3, shard_count=2), "batch_size"),
    (dict(shard_index=1), "shard_index"),
    (dict(require_revisit=True, min_revisit_gap=4), "min_revisit_gap"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
])
def test_bad_arguments_name_the_field(clips, override, field):
  kwargs = dict(BASE, seed=0)
  kwargs.update(override)
  with pytest.raises(InputError, match=f"'{field}'"):
    pipeline.make_dataset(clips, **kwargs)


def test_clip_too_short_for_the_window_names_the_record():
  it = pipeline.make_iterator([straight_clip(t=5)], **dict(BASE, batch_size=1), seed=0)
  with pytest.raises(InputError, match="record 0.*'frames'"):
    next(it)
