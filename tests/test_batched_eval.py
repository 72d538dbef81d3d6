"""Batched evaluation (issue 16): 8 trajectories of different lengths in one jitted chunk step,
sharded over 8 (fake CPU) devices, give what one-at-a-time rollouts give."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import tiny_cpu
from mirage_jax import geometry, rollout
from mirage_jax import families
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser

LENGTHS = (3, 4, 5, 6, 7, 8, 9, 10)  # chunks of 2: the shorter ones end early, 3 and 10 mid-chunk
GIVEN = {2: 4, 5: 3}  # trajectory -> frames written from ground truth (the others: none)


@pytest.fixture(scope="module")
def world():
  config = tiny_cpu.get_config("denoiser")
  config.denoiser.update(reference_frames=1, reference_bank=4)  # the bank is batched too
  ae = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))
  dn = denoiser.Denoiser(config.denoiser.model, nnx.Rngs(1))
  return config, ae, dn


def _trajectories(config, lengths, seed=0):
  """Per trajectory: frame 0, its depth, intrinsics, poses (out along a random direction and
  back), and ground truth for the oracle frames of ``GIVEN``."""
  h, w = config.data.resolution
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], n, 0)
    d = rng.normal(size=3) * [0.4, 0.1, 0.4]
    s = np.concatenate([np.linspace(0, 1, n // 2), np.linspace(1, 0, n - n // 2)])
    poses = np.stack([geometry.look_at([x, 1.5 + y, z], [x, 1.5 + y, z + 3], up=(0, 1, 0))
                      for x, y, z in s[:, None] * d])
    frames = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(2.0, 4.0, (n, h, w)).astype(np.float32)
    out.append((frames, depths, K, poses))
  return out


def _oracle(trajs, b):
  if b not in GIVEN:
    return None
  frames, depths, _, _ = trajs[b]
  return frames[:GIVEN[b]], depths[:GIVEN[b]]


def test_batched_equals_one_at_a_time(world):
  config, ae, dn = world
  r = rollout.make_rollout(config, ae, dn, backend="mirage", capacity=16 * 16 * max(LENGTHS))
  trajs = _trajectories(config, LENGTHS)
  seeds = [10 + b for b in range(len(trajs))]
  batched = r.generate_batch([t[0][0] for t in trajs], [t[1][0] for t in trajs],
                             [t[2] for t in trajs], [t[3] for t in trajs], seeds=seeds,
                             oracle_frames=[_oracle(trajs, b) for b in range(len(trajs))],
                             progress=False)
  # One mesh of all 8 devices, the trajectory axis split over them.
  mesh = rollout.trajectory_mesh(len(trajs))
  assert mesh.devices.size == 8 and rollout.batch_shards(mesh) == 8
  assert set(r._per_mesh) == {mesh}

  for b, (frames, depths, K, poses) in enumerate(trajs):
    one = r.generate(frames[0], depths[0], K, poses, seed=seeds[b], progress=False,
                     oracle_frames=_oracle(trajs, b))
    got = batched[b]
    n = LENGTHS[b]
    assert got["frames"].shape == (n,) + frames.shape[1:] == one["frames"].shape
    # float32: the same program per trajectory, partitioned differently.
    np.testing.assert_allclose(got["depths"], one["depths"], rtol=1e-4, atol=1e-4)
    assert np.abs(got["frames"].astype(int) - one["frames"].astype(int)).max() <= 1
    np.testing.assert_allclose(got["dynamic"], one["dynamic"], atol=1e-5)
    np.testing.assert_array_equal(got["coverage"], one["coverage"])
    np.testing.assert_array_equal(got["references"], one["references"])
    # Chunks past a trajectory's end wrote nothing: the same cache as alone.
    assert got["cache_bytes"] == one["cache_bytes"] > 0
    assert got["reference_bytes"] == one["reference_bytes"]
  # Different seeds sample different frames (the batch does not share noise).
  assert np.abs(batched[6]["frames"][1:3].astype(int) - batched[7]["frames"][1:3].astype(int)).max() > 10


def test_batch_of_other_lengths_reuses_the_step_and_syncs_once(world, monkeypatch):
  config, ae, dn = world
  r = rollout.make_rollout(config, ae, dn, backend="voxel")
  syncs = []
  block = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: syncs.append(1) or block(x))
  for lengths in ((5,) * 8, (9, 2, 7, 4, 3, 8, 6, 5)):
    syncs.clear()
    trajs = _trajectories(config, lengths, seed=1)
    out = r.generate_batch([t[0][0] for t in trajs], [t[1][0] for t in trajs],
                           [t[2] for t in trajs], [t[3] for t in trajs], progress=False)
    assert [len(o["frames"]) for o in out] == list(lengths)
    assert len(syncs) == 1  # after the first chunk (compilation), never per chunk
    assert all(o["timings"] == [] and o["chunk_seconds"] > 0 for o in out)
  (fns,) = r._per_mesh.values()
  assert fns["step"][False]._cache_size() == 1 and fns["start"]._cache_size() == 1


def test_timed_mode_blocks_per_chunk_and_times_memory(world):
  config, ae, dn = world
  r = rollout.make_rollout(config, ae, dn, backend="voxel")
  frames, depths, K, poses = _trajectories(config, (7,))[0]
  out = r.generate(frames[0], depths[0], K, poses, progress=False, timed=True)
  assert len(out["timings"]) == 3  # 6 generated frames in chunks of 2
  for t in out["timings"]:
    assert t.chunk_seconds > 0 and t.memory_seconds > 0
  assert out["timings"][-1].cache_bytes == out["cache_bytes"] > 0
