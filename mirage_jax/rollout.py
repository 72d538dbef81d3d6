"""The one rollout driver: first frame + camera trajectory -> frames, for every family.

A family's ``WorldModel`` (``mirage_jax.world_model``; ``mirage_jax.families.<name>``) says
how a trajectory splits into chunks and what ONE chunk step does (read memory ->
objects/references -> the whole sampler -> decode -> write -> next context); this driver does
the rest, the same for every family:

  * checks a batch of trajectories (shapes, poses; the family's own checks on top);
  * pads it: the chunk step is vmapped over trajectories and the trajectory axis sharded over
    the mesh's batch axes (``data``, ``fsdp``); trajectories of different lengths are padded
    to the most chunks, a chunk past a trajectory's end changes nothing of its state and its
    outputs are dropped, so results do not depend on the batch (up to float32 rounding) and a
    batch of any lengths reuses the one compiled step (static shapes, no host sync inside);
  * encodes the oracle row's ground truth outside the step;
  * times: untimed runs sync once, after the first chunk (compilation); ``timed`` (the
    scaling benchmark) blocks after every chunk and times the backend's read + write alone.

:func:`load_world_model` and :func:`make_rollout` pick the family from the export's config
(``mirage_jax.families``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mirage_jax import checkpoint, families, geometry, sharding
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError


def load_world_model(denoiser_export: str, autoencoder_export: str | None = None):
  """(config, autoencoder, denoiser) of a denoiser export (``python -m mirage_jax.export`` or
  ``convert_wan``) by its family's ``WorldModel.load``; the config is upgraded to the current
  schema. The autoencoder comes from ``autoencoder_export`` or else the one the denoiser was
  trained with."""
  config = checkpoint.export_config(denoiser_export)
  if config.stage != "denoiser":
    raise InputError(denoiser_export, "stage", f"expected a denoiser export, got {config.stage!r}")
  return families.world_model(config).load(denoiser_export, autoencoder_export)


def make_rollout(config: ml_collections.ConfigDict, ae, dn, backend: str | None = None, *,
                 sampling_options: dict | None = None, **kwargs) -> "Rollout":
  """The driver over the export's family's ``WorldModel``.

  ``sampling_options``: the family's (``WorldModel.sampling_options``: the Wan family's text,
  empty_text, guidance_scale); ``kwargs``: the memory overrides and mask_dynamic /
  object_slots. A family refuses the options it does not take, and guidance for a model
  trained without conditioning dropout is refused (:func:`check_guidance`).
  """
  options = dict(sampling_options or {})
  cls = families.world_model(config)
  cls.check_guidance(config, options.get("guidance_scale"))  # before the (slow) model setup
  return Rollout(cls(config, ae, dn, backend, **options, **kwargs))


def check_guidance(config: ml_collections.ConfigDict, scale: float | None = None) -> None:
  """Refuses classifier-free guidance when training never trained its unconditional branch.

  ``scale``: the ``--guidance_scale`` flag, or None for the export's
  ``config.sampler.guidance_scale`` (the family's ``WorldModel.check_guidance``: the small
  family's ``denoiser.cond_dropout``, a Wan fine-tune's ``denoiser.caption_dropout``).
  """
  families.world_model(config).check_guidance(config, scale)


@dataclasses.dataclass
class ChunkTiming:
  memory_seconds: float  # read + write
  chunk_seconds: float  # read + denoise + decode + write
  cache_bytes: int


class Rollout:
  """Generates along trajectories with one world model (a family's ``WorldModel``).

  Attributes: ``model`` the world model; ``config``, ``backend``, ``backend_name``,
  ``memory_cfg``, ``image_hw``, ``latent_hw``, ``chunk`` are the model's.
  """

  def __init__(self, model):
    self.model = model
    self._per_mesh: dict[Mesh, dict[str, Any]] = {}  # jitted functions (see _functions)

  config = property(lambda self: self.model.config)
  backend = property(lambda self: self.model.backend)
  backend_name = property(lambda self: self.model.backend_name)
  memory_cfg = property(lambda self: self.model.memory_cfg)
  image_hw = property(lambda self: self.model.image_hw)
  latent_hw = property(lambda self: self.model.latent_hw)
  chunk = property(lambda self: self.model.chunk)

  def _functions(self, mesh: Mesh) -> dict[str, Any]:
    """The jitted, trajectory-batched (vmapped) functions on ``mesh`` (built once per mesh).

    The trajectory axis is sharded over the mesh's batch axes (``data``, ``fsdp``), the
    parameters are replicated: trajectories are independent, so no collective runs.
    """
    if mesh not in self._per_mesh:
      m = self.model
      rep, bat = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)
      step = lambda oracle: jax.jit(
          jax.vmap(functools.partial(m.step, oracle=oracle), in_axes=(None, 0, 0)),
          in_shardings=(rep, bat, bat), out_shardings=bat)
      write = lambda s, lat, d, K, c2w, st, f, rgb: m.backend.write(s, lat, d, K, c2w, st, f, rgb=rgb)
      self._per_mesh[mesh] = dict(
          params=jax.device_put(m.params(), rep),
          start=jax.jit(jax.vmap(m.start, in_axes=(None,) + (0,) * 7),
                        in_shardings=(rep,) + (bat,) * 7, out_shardings=bat),
          step={False: step(False), True: step(True)},
          encode=jax.jit(jax.vmap(m.encode_oracle, in_axes=(None, 0)),
                         in_shardings=(rep, bat), out_shardings=bat),
          # Timed runs only (the scaling benchmark): the memory's share of a chunk.
          read=jax.jit(jax.vmap(m.backend.read), in_shardings=bat, out_shardings=bat),
          write=jax.jit(jax.vmap(write), in_shardings=bat, out_shardings=bat))
    return self._per_mesh[mesh]

  def set_text(self, embedding: np.ndarray) -> None:
    """Conditions the next trajectories on the text embedding (Lt, text_dim)
    (``WorldModel.set_text``, a family with text): the compiled steps are kept, the text
    being one of their parameters."""
    self.model.set_text(embedding)
    for mesh, functions in self._per_mesh.items():
      functions["params"] = jax.device_put(self.model.params(), NamedSharding(mesh, PartitionSpec()))

  def generate(self, first_frame: np.ndarray, first_depth: np.ndarray, intrinsics: np.ndarray,
               poses_c2w: np.ndarray, *, depths: np.ndarray | None = None, seed: int = 0,
               progress: bool = True, oracle_frames: tuple[np.ndarray, np.ndarray] | None = None,
               depth_valid: np.ndarray | None = None, initial_memory: Any = None,
               timed: bool = False) -> dict[str, Any]:
    """Generates frames 1..T-1 of a trajectory whose frame 0 is given.

    One trajectory of :meth:`generate_batch` (the same compiled chunk step, batch 1 on one
    device).

    Args:
      first_frame: (H, W, 3) uint8 or float in [-1, 1].
      first_depth: (H, W) metric depth of the first frame (> 0), or None (estimated by a
        model that can: not ``model.needs_first_depth``).
      intrinsics: (T, 3, 3) at the model's image resolution. poses_c2w: (T, 4, 4) OpenCV.
      depths: (T, H, W) metric z-depth of every frame, for a model that writes each new
        latent with its frame's given depth (``model.needs_depths``: the Wan family).
      seed: sampling seed.
      oracle_frames: optional ground truth ``(frames (N, H, W, 3) uint8, depths (N, H, W))``,
        N <= T: frames ``< N`` are written to memory encoded from these instead of the
        generated ones (evaluation bounds); their encoding is outside the chunk step.
      depth_valid: optional (T, H, W) bool/0-1: where the given depth (``first_depth``,
        ``depths``, ``oracle_frames``' depths) was observed; elsewhere (a depth hole holding
        a placeholder, ``data_pipelines.clip``) nothing is lifted from it into memory (the
        memory, object slots, reference bank). Default: all observed.
      initial_memory: optional memory state of this backend to start from instead of an
        empty one (the scaling benchmark pre-fills it); frame 0 is written into it.
      timed: block after every chunk and time it (the scaling benchmark); see
        :meth:`generate_batch`.
    Returns:
      dict with, for every family: frames (T, H, W, 3) uint8 (frame 0 = the decoded first
      frame), depths (T, H, W) float32 (None for a model without a depth head), coverage
      (T, h, w) float32 (memory coverage of each generated frame; frame 0: 1), chunk_seconds
      (wall seconds per chunk after the first, without a sync per chunk), timings: list of
      ChunkTiming (``timed`` only, else empty), cache_bytes (after the last chunk),
      reference_bytes (bytes of the frames in the reference bank after the last chunk; 0
      without references), dynamic (T, h, w) float32 the probability that a cell moves
      (zeros without a dynamic head), object_positions (T, S, 3) float32 and object_idents
      (T, S) int32 (-1 = empty) the slots at each frame (S = 0 without object slots),
      object_bytes; and the family's own (``WorldModel.trajectory_result``): the small
      family's references (chunks, k) int32 (the frame index of each chunk's retrieved
      references, -1: the newest banked frame stood in), the Wan family's num_references
      (per chunk) and latent_frames (the video frame of every generated latent written).
    """
    return self.generate_batch([first_frame], [first_depth], [intrinsics], [poses_c2w],
                               depths=None if depths is None else [depths], seeds=[seed],
                               progress=progress, oracle_frames=[oracle_frames],
                               depth_valid=None if depth_valid is None else [depth_valid],
                               initial_memory=initial_memory, timed=timed)[0]

  def _check_trajectory(self, where: str, first_frame, first_depth, intrinsics, poses_c2w,
                        depths, oracle_frames, depth_valid=None) -> None:
    h, w = self.image_hw
    T = poses_c2w.shape[0]
    if first_depth is None and self.model.needs_first_depth:
      raise InputError(where, "depth", "frame 0 has no depth: give it (the geometry file's "
                       "depth), or estimate it with a metric --depth_model")
    depth_shape = (h, w) if first_depth is None else np.shape(first_depth)
    if first_frame.shape[:2] != (h, w) or depth_shape != (h, w):
      raise InputError(where, "first_frame", f"expected ({h}, {w}) to match the model, got "
                       f"{first_frame.shape[:2]} and depth {depth_shape}")
    if intrinsics.shape != (T, 3, 3):
      raise InputError(where, "intrinsics", f"expected ({T}, 3, 3), got {intrinsics.shape}")
    geometry.check_poses(poses_c2w, where)
    if oracle_frames is not None:
      gt_rgb, gt_depth = (np.asarray(a) for a in oracle_frames)
      if gt_rgb.shape[1:] != (h, w, 3) or gt_depth.shape != gt_rgb.shape[:3] or len(gt_rgb) > T:
        raise InputError(where, "oracle_frames", f"expected (N <= {T}, {h}, {w}, 3) frames and "
                         f"(N, {h}, {w}) depths, got {gt_rgb.shape} and {gt_depth.shape}")
    if depth_valid is not None and np.shape(depth_valid) != (T, h, w):
      raise InputError(where, "depth_valid", f"expected ({T}, {h}, {w}), got {np.shape(depth_valid)}")
    self.model.check_trajectory(where, first_frame, first_depth, intrinsics, poses_c2w, depths,
                                oracle_frames)

  def generate_batch(self, first_frames, first_depths, intrinsics, poses_c2w, *, depths=None,
                     seeds: int | list[int] = 0, progress: bool = True, oracle_frames=None,
                     depth_valid=None, initial_memory: Any = None, mesh: Mesh | None = None,
                     timed: bool = False, given_frames=None) -> list[dict[str, Any]]:
    """Generates B trajectories at once: the chunk step vmapped over them, sharded on a mesh.

    Per chunk, ONE jitted call advances every trajectory (memory read, references, the whole
    sampler, decode, memory write) with no host sync inside.

    Args:
      first_frames: B arrays (H, W, 3) uint8 or float in [-1, 1]. first_depths: B (H, W),
        or None entries where frame 0's depth is not known (a model with a metric depth
        estimator estimates it: not ``needs_first_depth``).
      intrinsics: B arrays (T_b, 3, 3). poses_c2w: B arrays (T_b, 4, 4).
      depths: None, or B arrays (T_b, H, W) the given depth of every frame (required by a
        model with ``needs_depths``; frame 0 is written with ``first_depths``).
      seeds: the sampling seed of each trajectory (an int: the same for all).
      oracle_frames: None, or B entries each None or ``(frames (N_b, H, W, 3) uint8,
        depths (N_b, H, W))`` (see :meth:`generate`).
      depth_valid: None, or B entries each None or (T_b, H, W): where trajectory b's given
        depth was observed (see :meth:`generate`).
      given_frames: None, or B ints G_b <= N_b: frames ``< G_b`` are *given* (a protocol's
        context): besides memory, they are the clean context of the chunks after them, as
        encoded from ``oracle_frames`` (a model with ``given_context``; otherwise the
        context is always the generated latents).
      initial_memory: one memory state every trajectory starts from (see :meth:`generate`).
      mesh: the trajectory axis is sharded over its batch axes (``data``, ``fsdp``; padded
        with empty trajectories to a multiple of their size); default: a ``data`` mesh of
        min(B, local devices) local devices (:func:`trajectory_mesh`).
      timed: block after every chunk step and time it, then time the backend's read + write
        of the chunk separately on the same state (the scaling benchmark): ``timings``.
        Otherwise nothing blocks before the last chunk but one sync after the first chunk
        (compilation), which ``chunk_seconds`` starts from.
    Returns:
      B dicts as :meth:`generate` returns.
    """
    m = self.model
    if not m.given_context and given_frames is not None and any(int(g) for g in given_frames):
      raise InputError("generate", "given_frames", f"the {m.name} family does not take "
                       "ground-truth frames as clean context (they can be written into "
                       "memory: oracle_frames)")
    B = len(poses_c2w)
    seeds = [int(seeds)] * B if np.isscalar(seeds) else [int(s) for s in seeds]
    oracle_frames = [None] * B if oracle_frames is None else list(oracle_frames)
    depths = [None] * B if depths is None else list(depths)
    valids = [None] * B if depth_valid is None else list(depth_valid)
    if not (len(first_frames) == len(first_depths) == len(intrinsics) == len(seeds)
            == len(oracle_frames) == len(depths) == len(valids) == B >= 1):
      raise InputError("generate", "trajectories", "need as many first frames, depths, "
                       "intrinsics, poses, seeds, oracle and depth_valid entries (at least one)")
    frames0, depths0, valids0, Ks, poses = [], [], [], [], []
    for b in range(B):
      self._check_trajectory("generate" if B == 1 else f"generate[{b}]", first_frames[b],
                             first_depths[b], intrinsics[b], poses_c2w[b], depths[b],
                             oracle_frames[b], valids[b])
      f0 = np.asarray(first_frames[b])
      frames0.append(f0.astype(np.float32) / 127.5 - 1.0 if f0.dtype == np.uint8
                     else f0.astype(np.float32))
      # Unknown depth goes in as zeros: the model's start estimates it there.
      depths0.append(np.zeros(m.image_hw, np.float32) if first_depths[b] is None
                     else np.asarray(first_depths[b], np.float32))
      if valids[b] is not None:
        valids[b] = np.asarray(valids[b]) != 0
      valids0.append(np.ones(m.image_hw, bool) if valids[b] is None else valids[b][0])
      Ks.append(np.asarray(intrinsics[b], np.float32))
      poses.append(np.asarray(poses_c2w[b], np.float32))
      if depths[b] is not None:  # frame 0 is written with first_depth
        depths[b] = np.asarray(depths[b], np.float32).copy()
        depths[b][0] = depths0[b]
    # (frames, depths, observed depth or None): the families' oracle_chunk reads all three.
    gts = [None if o is None else (*(np.asarray(a) for a in o),
                                   None if v is None else v[:len(o[0])])
           for o, v in zip(oracle_frames, valids)]
    given = np.array([0 if g is None else len(g[0]) for g in gts])
    ctx_given = np.zeros(B, int) if given_frames is None else np.asarray(given_frames, int)
    if ctx_given.shape != (B,) or (ctx_given < 0).any() or (ctx_given > given).any():
      raise InputError("generate", "given_frames", f"expected {B} counts in [0, oracle "
                       f"frames {given.tolist()}], got {given_frames!r}")

    mesh = trajectory_mesh(B) if mesh is None else mesh
    pad = -B % batch_shards(mesh)  # empty trajectories: length 1, no chunk of theirs is active
    order = list(range(B)) + [0] * pad
    lengths = np.array([len(p) for p in poses] + [1] * pad)
    num_chunks = np.array([m.num_chunks(len(p)) for p in poses] + [0] * pad)
    given = np.concatenate([given, np.zeros(pad, int)])
    ctx_given = np.concatenate([ctx_given, np.zeros(pad, int)])
    rows = lambda xs: [xs[b] for b in order]
    fns = self._functions(mesh)
    put = lambda x: jax.device_put(x, batch_sharding(mesh))
    params = fns["params"]
    Bp = B + pad

    if initial_memory is None:
      state = memory_lib.init_batch(m.backend, m.memory_cfg, Bp)
    else:
      state = jax.tree.map(lambda x: jnp.broadcast_to(x, (Bp,) + x.shape), initial_memory)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(seeds[b]))) for b in order])
    carry, first = fns["start"](
        params, put(state), put(np.stack(rows(frames0))), put(np.stack(rows(depths0))),
        put(np.stack(rows(valids0))), put(np.stack([Ks[b][0] for b in order])),
        put(np.stack([poses[b][0] for b in order])), put(keys))

    has_oracle = bool(given.any())
    encode = lambda arrays: fns["encode"](params, tuple(put(a) for a in arrays))
    outs, plans, timings = [], [], [[] for _ in range(Bp)]
    t_first = t_start = time.perf_counter()
    for c in tqdm(range(int(num_chunks.max())), desc=f"generate {m.name} [{m.backend_name}] x{B}",
                  disable=not progress, unit="chunk"):
      chunk, plan = m.chunk_inputs(c, lengths, num_chunks, rows(Ks), rows(poses),
                                   None if depths[0] is None else rows(depths), rows(valids))
      if has_oracle:
        chunk.update(m.oracle_chunk(encode, gts, order, plan, given, ctx_given))
      chunk = {k: put(v) for k, v in chunk.items()}
      carry, out, synced = run_chunk_step(
          functools.partial(fns["step"][has_oracle], params), carry, chunk,
          timed=timed, first=c == 0, timings=timings, nbytes=m.backend.nbytes,
          time_memory=functools.partial(self._time_memory, fns))
      t_first = synced or t_first
      outs.append(out)
      plans.append(plan)
    first, outs, carry = jax.device_get((first, outs, carry))
    t_end = time.perf_counter()
    steady = (t_end - t_first) / (len(outs) - 1) if len(outs) > 1 else t_end - t_start

    results = []
    for b in range(B):
      take = lambda x, b=b: x[b]
      bank = jax.tree.map(take, carry["bank"]) if "bank" in carry else None
      results.append(dict(
          timings=timings[b],
          chunk_seconds=float(steady),
          cache_bytes=int(m.backend.nbytes(jax.tree.map(take, carry["memory"]))),
          reference_bytes=0 if bank is None else memory_lib.frame_bank.nbytes(bank),
          **m.trajectory_result(b, int(lengths[b]), first, outs, plans, carry)))
    return results

  def _time_memory(self, fns, state, chunk, out) -> float:
    """Seconds of the backend's read + write of one chunk on ``state`` (blocked; the chunk
    step fuses them with the sampler, so they are timed again on their own)."""
    *written, rgb = self.model.written(chunk, out)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    jax.block_until_ready(fns["read"](state, *self.model.read_cameras(chunk)))
    jax.block_until_ready(fns["write"](state, *written, rgb))
    return time.perf_counter() - t0


def run_chunk_step(step, carry, chunk, *, timed: bool, first: bool, timings, nbytes,
                   time_memory):
  """One chunk step of a trajectory batch, as both families' ``generate_batch`` run it.

  Args:
    step: ``(carry, chunk) -> (carry, out)``, the jitted batched chunk step (its params
      bound); ``out`` holds ``latents`` (dropped here: only the timing needs them).
    timed: block before and after the step and time it, then ``time_memory(pre-step
      memory, chunk, out)`` (the backend's read + write alone); append a ``ChunkTiming``
      per trajectory to ``timings`` (cache bytes by ``nbytes`` of its memory).
    first: the first chunk of the batch: untimed runs block once after it (compilation)
      and nowhere else.
  Returns:
    (carry, out, the time of that one sync or None).
  """
  pre, synced = carry["memory"], None
  if timed:
    jax.block_until_ready(carry)
    t0 = time.perf_counter()
  carry, out = step(carry, chunk)
  if timed:
    jax.block_until_ready((carry, out))
    chunk_seconds = time.perf_counter() - t0
    memory_seconds = time_memory(pre, chunk, out)
    per_traj = jax.device_get(carry["memory"])
    for b, row in enumerate(timings):
      row.append(ChunkTiming(memory_seconds, chunk_seconds,
                             int(nbytes(jax.tree.map(lambda x, b=b: x[b], per_traj)))))
  elif first:  # one sync: the first chunk compiles, the others are timed together
    jax.block_until_ready(carry)
    synced = time.perf_counter()
  out.pop("latents")
  return carry, out, synced


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (trajectory) axis over the mesh's batch axes (the ``batch`` logical rule)."""
  return NamedSharding(mesh, PartitionSpec(sharding.logical_to_spec(("batch",), None, mesh)[0]))


def batch_shards(mesh: Mesh) -> int:
  """How many ways :func:`batch_sharding` splits the trajectory axis."""
  axes = sharding.logical_to_spec(("batch",), None, mesh)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def trajectory_mesh(batch: int, devices=None) -> Mesh:
  """A ``data`` mesh of min(batch, len(devices)) devices (default: this process's own).

  Trajectories are independent, so a process batches its own over its own devices; several
  processes split the trajectories between them (``mirage_jax.evaluate``).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  n = max(1, min(int(batch), len(devices)))
  return sharding.make_mesh({"data": n}, devices[:n], where="trajectory batch")
