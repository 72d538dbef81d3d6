"""Rollout: chunked generation with memory read/denoise/write, static shapes."""

import numpy as np
import pytest
from flax import nnx

from experiments import tiny_cpu
from mirage_jax import geometry, rollout
from mirage_jax.families.small import conditioning as small_conditioning
from mirage_jax import families
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser


@pytest.fixture(scope="module")
def models():
  config = tiny_cpu.get_config("denoiser")
  ae = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))
  dn = denoiser.Denoiser(config.denoiser.model, nnx.Rngs(1))
  return config, ae, dn


def _trajectory(n, h, w):
  """Out along +x and back: frame n-1 has frame 0's pose."""
  K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], n, 0)
  xs = np.concatenate([np.linspace(0, 0.6, n // 2), np.linspace(0.6, 0, n - n // 2)])
  poses = np.stack([geometry.look_at([x, 1.5, 0], [x, 1.5, 3], up=(0, 1, 0)) for x in xs])
  return K, poses


@pytest.mark.parametrize("backend", ["voxel", "mirage", "none"])
def test_rollout_generates_and_revisit_reads_memory(models, backend):
  config, ae, dn = models
  h, w = config.data.resolution
  r = rollout.make_rollout(config, ae, dn, backend=backend, capacity=4096)
  K, poses = _trajectory(7, h, w)
  frame0 = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
  depth0 = np.full((h, w), 3.0, np.float32)
  out = r.generate(frame0, depth0, K, poses, progress=False)
  assert out["frames"].shape == (7, h, w, 3) and out["frames"].dtype == np.uint8
  assert out["depths"].shape == (7, h, w) and np.all(out["depths"] > 0)
  assert out["timings"] == [] and out["chunk_seconds"] > 0  # untimed: no sync per chunk
  # The last camera is the first camera: memory written from frame 0 covers it.
  if backend == "none":
    assert out["coverage"][1:].max() == 0 and out["cache_bytes"] == 0
  else:
    assert out["coverage"][-1].mean() > 0.8
    assert out["cache_bytes"] > 0


def test_trajectory_length_does_not_recompile(models):
  config, ae, dn = models
  h, w = config.data.resolution
  r = rollout.make_rollout(config, ae, dn, backend="voxel")
  frame0 = np.zeros((h, w, 3), np.uint8)
  depth0 = np.full((h, w), 2.0, np.float32)
  sizes = []
  for n in (4, 9):  # a longer trajectory reuses every compiled function
    K, poses = _trajectory(n, h, w)
    r.generate(frame0, depth0, K, poses, progress=False)
    (fns,) = r._per_mesh.values()  # one trajectory: a one-device mesh
    sizes.append([fns["start"]._cache_size(), fns["step"][False]._cache_size()])
  assert sizes[0] == sizes[1] == [1, 1]


def test_bad_first_frame_is_rejected(models):
  config, ae, dn = models
  r = rollout.make_rollout(config, ae, dn, backend="voxel")
  K, poses = _trajectory(4, 8, 8)
  with pytest.raises(Exception, match="first_frame"):
    r.generate(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.float32), K, poses, progress=False)


def test_write_new_only_leaves_covered_cells_unwritten(models):
  """Standing still: every generated cell is covered by frame 0, so nothing new is written."""
  config, ae, dn = models
  h, w = config.data.resolution
  K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], 5, 0)
  poses = np.repeat(geometry.look_at([0, 1.5, 0], [0, 1.5, 3], up=(0, 1, 0))[None], 5, 0)
  frame0 = np.zeros((h, w, 3), np.uint8)
  depth0 = np.full((h, w), 2.0, np.float32)
  bytes_after = {}
  for new_only in ((), ("mirage",)):
    c = config.copy_and_resolve_references()
    c.memory.write_new_only = new_only
    out = rollout.make_rollout(c, ae, dn, backend="mirage", capacity=4096).generate(
        frame0, depth0, K, poses, progress=False)
    bytes_after[new_only] = out["cache_bytes"]
  one_frame = bytes_after[()] // 5  # append-only: five frames written without the option
  assert bytes_after[("mirage",)] == one_frame


def test_depth_holes_are_never_lifted_into_memory(models):
  """Frame 0 and the oracle's ground-truth frames, all with a depth hole (the left half)
  holding a placeholder that would lift like any depth: a standing camera's reads find nothing
  there, in the chunk after frame 0 and in the one after the oracle frames; without the
  mask the same frames cover it."""
  config, ae, dn = models
  h, w = config.data.resolution
  n = 5  # frame 0, then two chunks of two
  K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], n, 0)
  poses = np.repeat(geometry.look_at([0, 1.5, 0], [0, 1.5, 3], up=(0, 1, 0))[None], n, 0)
  frames = np.random.default_rng(0).integers(0, 255, (n, h, w, 3), dtype=np.uint8)
  valid = np.ones((n, h, w), bool)
  valid[:, :, :w // 2] = False
  depths = np.where(valid, 3.0, 1.0).astype(np.float32)  # 1.0: the datasets' placeholder
  r = rollout.make_rollout(config, ae, dn, backend="voxel")
  cov = {name: r.generate(frames[0], depths[0], K, poses, progress=False,
                          oracle_frames=(frames, depths), depth_valid=mask)["coverage"]
         for name, mask in (("holes", valid), ("dense", None))}
  lw = cov["holes"].shape[2]
  left, right = slice(0, lw // 2 - 1), slice(lw // 2 + 1, lw)  # a cell of margin: splat fill
  assert cov["holes"][1:, :, left].max() == 0
  assert cov["holes"][1:, :, right].mean() > 0.8
  assert cov["dense"][1:, :, left].mean() > 0.8


def _with_dynamic_head(ae, logit: float):
  """A copy of ``ae`` whose dynamic head says ``logit`` for every cell."""
  ae = nnx.clone(ae)
  ae.dynamic[-1].bias.value = ae.dynamic[-1].bias.value * 0 + logit
  return ae


def test_cells_marked_moving_never_enter_the_static_memory(models):
  config, ae, dn = models
  h, w = config.data.resolution
  K, poses = _trajectory(5, h, w)
  frame0 = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
  depth0 = np.full((h, w), 3.0, np.float32)
  moving = _with_dynamic_head(ae, 10.0)
  out = rollout.make_rollout(config, moving, dn, "voxel", object_slots=False).generate(
      frame0, depth0, K, poses, progress=False)
  assert out["dynamic"].shape == (5,) + out["coverage"].shape[1:] and out["dynamic"].min() > 0.5
  assert out["cache_bytes"] == 0  # every cell moves: nothing is static
  assert out["object_positions"].shape == (5, 0, 3)
  # The reference's behaviour: everything written, moving or not.
  ref = rollout.make_rollout(config, moving, dn, "voxel", mask_dynamic=False, object_slots=False).generate(
      frame0, depth0, K, poses, progress=False)
  assert ref["cache_bytes"] > 0 and ref["dynamic"].min() > 0.5  # predicted, not used


def test_object_slots_carry_moving_content_into_later_chunks(models):
  """A moving region in the first frame becomes a slot that conditions the next chunk."""
  config, ae, dn = models
  h, w = config.data.resolution
  K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], 5, 0)
  poses = np.repeat(geometry.look_at([0, 1.5, 0], [0, 1.5, 3], up=(0, 1, 0))[None], 5, 0)
  frame0 = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
  depth0 = np.full((h, w), 3.0, np.float32)
  # Everything moves, so the static memory stays empty and only a slot can cover frame 1.
  out = rollout.make_rollout(config, _with_dynamic_head(ae, 10.0), dn, "voxel",
                        object_slots=True).generate(frame0, depth0, K, poses, progress=False)
  assert out["cache_bytes"] == 0 and out["object_bytes"] > 0
  assert (out["object_idents"][1] >= 0).sum() == 1  # one object, the whole frame
  np.testing.assert_allclose(out["object_positions"][1][out["object_idents"][1] >= 0][0],
                             [0.0, 1.5, 3.0], atol=0.3)
  assert out["coverage"][1].mean() > 0.9
  none = rollout.make_rollout(config, _with_dynamic_head(ae, 10.0), dn, "voxel",
                         object_slots=False).generate(frame0, depth0, K, poses, progress=False)
  assert none["coverage"][1].max() == 0


def test_anchor_depth_takes_the_memory_depth_and_rescales_the_rest():
  """Generated depth twice the truth; the memory holds the truth on the left half."""
  rng = np.random.default_rng(0)
  truth = rng.uniform(1.0, 4.0, (2, 4, 4)).astype(np.float32)  # latent cells
  coverage = np.zeros((2, 4, 4), bool)
  coverage[0, :, :2] = True  # frame 0: 8 covered cells; frame 1: none
  memory_depth = np.where(coverage, truth, 0.0)
  generated = np.repeat(np.repeat(2.0 * truth, 2, 1), 2, 2)  # image: 2x2 pixels per cell
  up = lambda x: np.repeat(np.repeat(x, 2, 1), 2, 2)
  out = np.asarray(small_conditioning.anchor_depth(generated, memory_depth, coverage, min_cells=8))
  np.testing.assert_allclose(out[0], up(truth)[0], rtol=1e-5)  # covered: memory; rest: x 0.5
  np.testing.assert_allclose(out[1], generated[1], rtol=1e-6)  # nothing covered: unchanged
  kept = np.asarray(small_conditioning.anchor_depth(generated, memory_depth, coverage, rescale=False))
  np.testing.assert_allclose(kept[0], np.where(up(coverage)[0], up(truth)[0], generated[0]),
                             rtol=1e-5)
  few = np.asarray(small_conditioning.anchor_depth(generated, memory_depth, coverage, min_cells=9))
  np.testing.assert_allclose(few, kept, rtol=1e-6)  # too few covered cells: no rescale


def test_depth_from_memory_writes_at_the_memory_depth(models):
  """Standing still in front of a wall at 2 m: the memory covers every generated frame, so
  with ``depth_from_memory`` their depth is the memory's 2 m, not the untrained model's."""
  config, ae, dn = models
  h, w = config.data.resolution
  K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], 3, 0)
  poses = np.repeat(geometry.look_at([0, 1.5, 0], [0, 1.5, 3], up=(0, 1, 0))[None], 3, 0)
  frame0 = np.zeros((h, w, 3), np.uint8)
  depth0 = np.full((h, w), 2.0, np.float32)
  depths = {}
  for on in ((), ("voxel",)):
    c = config.copy_and_resolve_references()
    c.memory.depth_from_memory = on
    out = rollout.make_rollout(c, ae, dn, backend="voxel").generate(frame0, depth0, K, poses,
                                                               progress=False)
    assert out["coverage"][1:].min() == 1.0
    depths[on] = out["depths"][1:]
  np.testing.assert_allclose(depths[("voxel",)], 2.0, rtol=0.03)
  assert np.abs(depths[()] - 2.0).mean() > 0.1  # the untrained model's own depth is elsewhere
  c = config.copy_and_resolve_references()
  c.memory.depth_from_memory = ("mirage",)
  with pytest.raises(Exception, match="depth_from_memory"):
    rollout.make_rollout(c, ae, dn, backend="mirage")


def test_reencode_latents_changes_the_context_not_the_frames_shown(models):
  """Chunk 1 shows the same frames either way (its first decoding); chunk 2 is conditioned on
  re-encoded latents, so it differs."""
  config, ae, dn = models
  h, w = config.data.resolution
  K, poses = _trajectory(5, h, w)  # chunks of 2: frames 1-2, then 3-4
  frame0 = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
  depth0 = np.full((h, w), 2.0, np.float32)
  frames = {}
  for on in (False, True):
    c = config.copy_and_resolve_references()
    c.sampler.reencode_latents = on
    frames[on] = rollout.make_rollout(c, ae, dn, backend="voxel").generate(
        frame0, depth0, K, poses, progress=False)["frames"].astype(int)
  np.testing.assert_array_equal(frames[True][:3], frames[False][:3])
  assert np.abs(frames[True][3:] - frames[False][3:]).mean() > 0.5
