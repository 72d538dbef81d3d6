"""Memory scaling benchmark: mirage's append-only latent cloud vs our voxel cache.

A camera loops around the inside of a box room (each lap 128 frames, later laps on a
slightly different radius and height, so places are revisited from new poses). Latents are
a smooth function of the world point each latent pixel sees, so a read at a pose can be
scored against the latents that pose would really see. For each trajectory length the
backends write chunk after chunk; each chunk also reads the next chunk's cameras.

Reported per backend and length: live bytes at the end, allocated bytes, wall time of one
chunk's write + read (compiled, blocked; the whole trajectory timed, divided by its chunks),
and on the last chunk's read the coverage and mean absolute latent error over covered
cells. The two backends' trajectories run interleaved (``benchmarks/timing.py``: ``--warmup``
discarded rounds, the first compiles; ``--pairs`` kept), so the time per chunk is a median and
the ratio mirage / voxel comes with its IQR. A second table sweeps the voxel footprint radius
(the three radii interleaved the same way).

  python benchmarks/bench_memory.py [--lengths=64,128,256,512,1024] [--latent=16] [--chunk=32]
      [--pairs=7]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mirage_jax import geometry
from mirage_jax.errors import InputError, run_cli
from mirage_jax.memory import MemoryConfig, get_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["64", "128", "256", "512", "1024"], "Trajectory lengths in frames.")
flags.DEFINE_integer("latent", 16, "Latent height and width.")
flags.DEFINE_integer("channels", 16, "Latent channels.")
flags.DEFINE_integer("chunk", 32, "Frames written (and read) per chunk.")
flags.DEFINE_integer("voxel_capacity", 16384, "Voxel slots.")
flags.DEFINE_float("voxel_size", 0.1, "Voxel edge (m).")
_PAIRS, _WARMUP = timing.define_absl_flags(pairs=7, warmup=1)

HALF = np.array([2.0, 1.5, 2.5])  # box room half extents (m)
LAP = 128


def box_room_depth(c2w: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
  """(size, size) z-depth inside the box room by ray-plane intersection."""
  v, u = np.mgrid[0:size, 0:size] + 0.5
  rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
  d = rays @ c2w[:3, :3].T
  with np.errstate(divide="ignore", invalid="ignore"):
    t = (np.sign(d) * HALF - c2w[:3, 3]) / d
  return np.where(np.abs(d) < 1e-9, np.inf, t).min(-1).astype(np.float32)


def trajectory(n: int) -> np.ndarray:
  """(n, 4, 4) c2w: laps around the room looking outward, radius/height varying per lap."""
  poses = []
  for i in range(n):
    lap, a = divmod(i, LAP)
    angle = 2 * np.pi * a / LAP + 0.3 * lap
    radius, height = 0.6 + 0.15 * (lap % 3), 0.2 - 0.1 * (lap % 2)
    eye = np.array([radius * np.sin(angle), height, radius * np.cos(angle)])
    poses.append(geometry.look_at(eye, eye + np.array([np.sin(angle), 0.1, np.cos(angle)])))
  return np.stack(poses)


def scene(n: int, latent: int, channels: int):
  """Frames for the whole trajectory: image 2x the latent size, smooth world-space latents."""
  size = 2 * latent
  K = geometry.intrinsics_from_fov(60.0, size, size)
  c2w = trajectory(n)
  depth = np.stack([box_room_depth(p, K, size) for p in c2w])
  K_lat = np.asarray(geometry.scale_intrinsics(K, 0.5, 0.5))
  lat_depth = np.stack([box_room_depth(p, K_lat, latent) for p in c2w])
  pts = np.asarray(geometry.unproject_depth(lat_depth, K_lat, c2w))
  proj = np.random.default_rng(0).normal(size=(3, channels)) * 3.0
  latents = np.sin(pts @ proj).astype(np.float32)
  return dict(latents=latents, depth=depth, intrinsics=np.broadcast_to(K, (n, 3, 3)).copy(),
              c2w=c2w, static_mask=np.ones((n, size, size), bool),
              frame_index=np.arange(n, dtype=np.int32))


def trajectory_fn(name: str, cfg: MemoryConfig, frames: dict, chunk: int):
  """A zero-argument callable writing the whole trajectory chunk by chunk (reading the next
  chunk's cameras each time) into a fresh memory; returns (state, last read, its target)."""
  be = get_backend(name)

  @jax.jit
  def step(state, fr, next_K, next_c2w):
    state = be.write(state, **fr)
    return state, be.read(state, next_K, next_c2w)

  n = frames["c2w"].shape[0]
  sl = lambda s: {k: jnp.asarray(v[s]) for k, v in frames.items()}
  chunks = []
  for start in range(0, n, chunk):
    nxt = slice(min(start + chunk, n - chunk), min(start + 2 * chunk, n))
    chunks.append((sl(slice(start, start + chunk)), sl(nxt)))

  def run():
    state = be.init(cfg)
    for fr, tgt in chunks:
      state, read = jax.block_until_ready(step(state, fr, tgt["intrinsics"], tgt["c2w"]))
    return state, read, tgt
  return run


def summary(name: str, out) -> tuple[int, int, float, float]:
  """(live bytes, allocated bytes, coverage, mean abs error over covered cells) of a run."""
  be = get_backend(name)
  state, (lat, cov), tgt = out
  cov = np.asarray(cov)
  err = np.abs(np.asarray(lat, np.float32) - np.asarray(tgt["latents"]))[cov].mean() if cov.any() else np.nan
  return be.nbytes(state), be.capacity_bytes(state), cov.mean(), err


def main(argv):
  del argv
  try:
    lengths = [int(x) for x in FLAGS.lengths]
  except ValueError:
    raise InputError("--lengths", "lengths", f"expected integers, got {FLAGS.lengths}") from None
  if any(n < 2 * FLAGS.chunk or n % FLAGS.chunk for n in lengths):
    raise InputError("--lengths", "lengths", f"each must be a multiple of --chunk={FLAGS.chunk}, at least two chunks")
  h, c = FLAGS.latent, FLAGS.channels
  base = dict(image_height=2 * h, image_width=2 * h, latent_height=h, latent_width=h,
              latent_channels=c, feature_dtype="bfloat16", voxel_size=FLAGS.voxel_size)
  print(f"device: {jax.devices()[0].device_kind}  latent {h}x{h}x{c}  chunk {FLAGS.chunk}  "
        f"voxel {FLAGS.voxel_size} m, {FLAGS.voxel_capacity} slots  features bf16")
  print(f"{'backend':8s} {'frames':>6s} {'live MB':>9s} {'alloc MB':>9s} {'ms/chunk':>9s} "
        f"{'coverage':>8s} {'abs err':>8s}")
  results = []
  for n in lengths:
    frames = scene(n, h, c)
    caps = {"mirage": n * h * h, "voxel": FLAGS.voxel_capacity}
    result = timing.compare(
        {name: trajectory_fn(name, MemoryConfig(capacity=cap, **base), frames, FLAGS.chunk)
         for name, cap in caps.items()}, pairs=_PAIRS.value, warmup=_WARMUP.value,
        label=f"{n} frames, per trajectory ({n // FLAGS.chunk} chunks)")
    results.append(result)
    for name in caps:
      live, alloc, cov, err = summary(name, result.outputs[name])
      ms = 1e3 * result.median_s(name) / (n // FLAGS.chunk)
      print(f"{name:8s} {n:6d} {live / 2**20:9.3f} {alloc / 2**20:9.3f} {ms:9.1f} {cov:8.3f} {err:8.4f}")
  print("\ntime per chunk, side by side")
  for result in results:
    print(result.format())

  n = lengths[-1]
  frames = scene(n, h, c)
  print(f"\nvoxel footprint sweep ({n} frames)")
  print(f"{'radius':>6s} {'ms/chunk':>9s} {'coverage':>8s} {'abs err':>8s}")
  result = timing.compare(
      {f"radius {r}": trajectory_fn("voxel", MemoryConfig(capacity=FLAGS.voxel_capacity,
                                                        splat_radius=r, **base), frames, FLAGS.chunk)
       for r in (0, 1, 2)}, pairs=_PAIRS.value, warmup=_WARMUP.value, baseline="radius 0",
      label=f"voxel footprint, {n} frames, per trajectory")
  for radius in (0, 1, 2):
    _, _, cov, err = summary("voxel", result.outputs[f"radius {radius}"])
    ms = 1e3 * result.median_s(f"radius {radius}") / (n // FLAGS.chunk)
    print(f"{radius:6d} {ms:9.1f} {cov:8.3f} {err:8.4f}")
  print(result.format())


if __name__ == "__main__":
  app.run(lambda argv: run_cli(lambda: main(argv)))
