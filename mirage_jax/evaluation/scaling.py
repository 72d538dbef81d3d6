"""Cost-scaling benchmark: cache bytes and time per chunk against trajectory length.

For each memory backend and each trajectory length L, one run measures:

  cache_bytes               live bytes of the memory after all L frames are in it;
  memory_seconds_per_chunk  the backend's read + write of one chunk, timed on their own on the
                            chunk's memory state (``ChunkTiming.memory_seconds``);
  chunk_seconds             one whole chunk step: read + denoise + decode + write, one jitted
                            call (``Rollout.generate(timed=True)`` blocks after each chunk;
                            this is the one benchmark that does: quality benchmarks never do).

The camera circles the centre of a closed box room (6 x 3 x 6 m) looking outward, repeating
the same poses every ``period`` frames (a loop path: after one period the whole room has
been seen), so a memory that grows with the scene's extent stops growing while an
append-only one grows with L. Depth is exact (ray-box intersection), so nothing is
rendered. Capacities: append-only backends (``mirage``, ``rgb_points``, ``frame_bank``)
get exactly what L frames need (no eviction, and their per-chunk cost is that of a cloud
of L frames); ``voxel`` keeps its configured, bounded capacity.

To keep long trajectories affordable (4096 frames on a CPU), the first
``L - 1 - (timed_chunks + 1) * chunk`` frames go through the memory *write only* (random
latents: write cost does not depend on their values; frames before the timed segment get
negative frame indices so the segment is the newest); the rest is a real rollout from that
memory (``Rollout.generate(initial_memory=...)``) of one warm-up chunk (compilation, not
reported) and ``timed_chunks`` timed chunks, whose writes use the known geometry
(``oracle_frames``: exact depth and the frames' encoding, encoded outside the timed span),
so cache sizes do not depend on an untrained model's depth. Times are means over the timed
chunks on whatever device runs it, one trajectory per backend, without batching.

The Wan family runs the same protocol with its own chunking: a chunk adds C - 1 = 32 video
frames and the memory is written once per 4 frames (one latent), so the pre-fill writes
every 4th frame. Its ``rgb_points`` chunk renders all C frames and VAE-encodes them inside
the step (``families/wan/world_model.py``), the cost a latent memory avoids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from mirage_jax import geometry, rollout
from mirage_jax import memory as memory_lib
from mirage_jax import families
from mirage_jax.errors import InputError

ROOM_LO = (-3.0, 0.0, -3.0)  # y up, floor at 0, like the procedural scenes
ROOM_HI = (3.0, 3.0, 3.0)


def loop_trajectory(num_frames: int, period: int, height: int, width: int,
                    fov_y_deg: float = 75.0, radius: float = 1.0, eye_height: float = 1.5
                    ) -> tuple[np.ndarray, np.ndarray]:
  """A camera on a circle around the room's centre looking outward, exactly periodic.

  Returns:
    intrinsics (T, 3, 3) and poses_c2w (T, 4, 4) float32; frame k has frame k % period's pose.
  """
  if period < 1 or num_frames < 1:
    raise InputError("--scaling_period", "period", f"period and length must be >= 1, got "
                     f"{period} and {num_frames}")
  loop = []
  for a in 2.0 * np.pi * np.arange(period) / period:
    eye = np.array([radius * np.cos(a), eye_height, radius * np.sin(a)])
    loop.append(geometry.look_at(eye, eye + np.array([np.cos(a), 0.0, np.sin(a)]), up=(0, 1, 0)))
  # Indexing one period (not recomputing angles) makes every lap bit-identical.
  poses = np.stack(loop)[np.arange(num_frames) % period]
  K = np.repeat(geometry.intrinsics_from_fov(fov_y_deg, height, width)[None], num_frames, 0)
  return K, poses.astype(np.float32)


def box_depth(intrinsics: np.ndarray, poses_c2w: np.ndarray, height: int, width: int,
              lo: Sequence[float] = ROOM_LO, hi: Sequence[float] = ROOM_HI) -> np.ndarray:
  """Exact z-depth of the inside of an axis-aligned box seen from cameras inside it.

  Args:
    intrinsics: (T, 3, 3). poses_c2w: (T, 4, 4), camera centres inside the box.
  Returns:
    (T, H, W) float32 z-depth.
  """
  rays = np.asarray(geometry.camera_rays(np.asarray(intrinsics, np.float32), height, width))  # z = 1
  d = np.einsum("tij,thwj->thwi", poses_c2w[:, :3, :3], rays)
  o = poses_c2w[:, None, None, :3, 3]
  with np.errstate(divide="ignore"):
    # The ray parameter of a z = 1 camera ray is its z-depth; the exit wall is the nearest.
    wall = np.where(d > 0, (np.asarray(hi) - o) / d, np.where(d < 0, (np.asarray(lo) - o) / d, np.inf))
  return wall.min(axis=-1).astype(np.float32)


def run_scaling(config, ae, dn, backends: Sequence[str], lengths: Sequence[int], *,
                timed_chunks: int = 2, period: int = 64, prefill_block: int = 32, seed: int = 0,
                progress: bool = False) -> list[dict[str, Any]]:
  """Measures every (backend, length) as described in the module docstring.

  Args:
    config, ae, dn: the world model (``rollout.load_world_model``).
    backends: memory backend names. lengths: trajectory lengths in frames.
    timed_chunks: chunks timed at the end of each trajectory (after one warm-up chunk).
    period: frames per loop of the camera path.
    prefill_block: frames per memory write while pre-filling.
    seed: sampling and random-latent seed.
  Returns:
    entries in the ``scaling.json`` schema (``report.SCALING_FIELDS``), backend-major.
  """
  if timed_chunks < 1:
    raise InputError("--timed_chunks", "timed_chunks", f"must be >= 1, got {timed_chunks}")
  rollouts = {b: rollout.make_rollout(config, ae, dn, backend=b) for b in backends}
  model = next(iter(rollouts.values())).model if rollouts else families.world_model(config)
  chunk = int(getattr(model, "frames_per_chunk", config.denoiser.target_frames))
  stride = int(getattr(model, "frames_per_write", 1))  # video frames per memory write
  generated = 1 + (timed_chunks + 1) * chunk
  short = [n for n in lengths if n < generated]
  if short:
    raise InputError("--lengths", "lengths", f"{short[0]} frames is shorter than the timed segment "
                     f"(1 + {timed_chunks + 1} chunks of {chunk} = {generated} frames)")
  base = families.world_model(config).memory_config(config)
  h, w = base.image_height, base.image_width
  K, poses = loop_trajectory(max(lengths), period, h, w)
  depths = box_depth(K, poses, h, w)
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 256, (period, h, w, 3), dtype=np.uint8)  # one per loop position
  latents = rng.normal(size=(prefill_block, base.latent_height, base.latent_width,
                             base.latent_channels)).astype(np.float32)
  entries = []
  bar = tqdm(total=len(backends) * len(lengths), desc="scaling", disable=not progress)
  for backend in backends:
    r = rollouts[backend]
    write = jax.jit(r.backend.write, donate_argnums=0)  # pre-fill in place
    for n in sorted(lengths):
      cfg = dataclasses.replace(r.memory_cfg, **memory_lib.capacity_for(backend, n, r.memory_cfg))
      state = r.backend.init(cfg)
      start = n - generated
      # The frames the rollout would have written: every ``stride``-th (Wan: one latent per 4).
      prefill = np.arange(0, start, stride)
      for b0 in range(0, len(prefill), prefill_block):
        idx = prefill[b0:b0 + prefill_block]
        state = write(state, latents[:len(idx)], depths[idx], K[idx], poses[idx],
                      np.ones((len(idx), h, w), bool), (idx - start).astype(np.int32),
                      rgb=colours[idx % period].astype(np.float32) / 255.0)
      seg = np.arange(start, n)
      rgb = colours[seg % period]
      out = r.generate(rgb[0], depths[start], K[seg], poses[seg], seed=seed, progress=False,
                       oracle_frames=(rgb, depths[seg]), initial_memory=state, timed=True,
                       depths=depths[seg] if r.model.needs_depths else None)
      timed = out["timings"][1:]
      entries.append(dict(backend=backend, frames=int(n), cache_bytes=int(out["cache_bytes"]),
                          memory_seconds_per_chunk=float(np.mean([t.memory_seconds for t in timed])),
                          chunk_seconds=float(np.mean([t.chunk_seconds for t in timed]))))
      bar.update(1)
  bar.close()
  return entries


def claims(entries: Sequence[Mapping[str, Any]]) -> dict[str, bool]:
  """The project's cost claims on scaling entries (``report`` schema; absent rows: none).

  At the longest length voxel's cache is >= 10x smaller than mirage's, and voxel's time per
  chunk is within 20% of its time at the shortest length.
  """
  cost = {(e["backend"], e["frames"]): e for e in entries}
  lengths = sorted({e["frames"] for e in entries})
  out = {}
  if not lengths:
    return out
  lo, hi = lengths[0], lengths[-1]
  if ("voxel", hi) in cost and ("mirage", hi) in cost:
    out[f"voxel cache >= 10x smaller than mirage at {hi} frames"] = (
        10 * cost["voxel", hi]["cache_bytes"] <= cost["mirage", hi]["cache_bytes"])
  if ("voxel", lo) in cost and ("voxel", hi) in cost and lo != hi:
    out[f"voxel time per chunk at {hi} within 20% of {lo} frames"] = (
        cost["voxel", hi]["chunk_seconds"] <= 1.2 * cost["voxel", lo]["chunk_seconds"])
  return out
