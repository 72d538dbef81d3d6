"""Batched evaluation: 8 trajectories in one jitted chunk step vs one trajectory at a time.

The tiny small-family world model (random weights, ``experiments/tiny_cpu.py``) generates 8
trajectories of different lengths twice: one after another (``Rollout.generate``, batch 1 on
one device), and all at once (``Rollout.generate_batch``: the chunk step vmapped over the 8
trajectories, the trajectory axis sharded over 8 devices, shorter ones padded and masked).
Each way runs once untimed first (compilation), then the two run interleaved, each timed end
to end (frames on the host; ``benchmarks/timing.py``: ``--warmup`` discarded rounds,
``--pairs`` kept). Printed: both median wall times, the median per-round ratio with its IQR and
the machine's load, and the largest difference between the two outputs.

``--family=wan``: the same comparison for the Wan family (``wan_rollout.WanRollout``: tiny
random Wan2.2 DiT + VACE + VAE built in place, 32x32 frames, chunks of ``--wan_chunk`` video
frames, 2 preceding latents, up to 2 references; procedural loops with their depth, which
this family writes its latents with; FlowUniPC).

Without XLA_FLAGS the script asks XLA for 8 host (CPU) devices, as the tests do; on a machine
with 8 accelerators it uses those.

  python -m benchmarks.bench_eval_batched [--backend=voxel] [--steps=8] [--lengths=17,...] [--pairs=7]
  python -m benchmarks.bench_eval_batched --family=wan --backend=mirage --steps=2 --lengths=9,...
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import tiny_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from mirage_jax import families, geometry, rollout  # pylint: disable=g-import-not-at-top,wrong-import-position
from mirage_jax.errors import InputError, run_cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from mirage_jax.memory import capacity_for  # pylint: disable=g-import-not-at-top,wrong-import-position
from mirage_jax.families.small import autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position
from mirage_jax.families.small import denoiser  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

_BACKEND = flags.DEFINE_string("backend", "voxel", "Memory backend.")
_STEPS = flags.DEFINE_integer("steps", 8, "Sampler steps per chunk.")
_LENGTHS = flags.DEFINE_list("lengths", ["17", "21", "25", "29", "33", "37", "41", "48"],
                             "Frames of each trajectory (their count is the batch).")
_FAMILY = flags.DEFINE_enum("family", "small", ["small", "wan"], "Model family.")
_WAN_CHUNK = flags.DEFINE_integer("wan_chunk", 9, "Wan: video frames per chunk (4N+1).")
_PAIRS, _WARMUP = timing.define_absl_flags(pairs=7, warmup=1)


def trajectories(lengths, h: int, w: int, seed: int = 0):
  """Per trajectory (frame 0 uint8, depth 0, intrinsics (T, 3, 3), poses (T, 4, 4)): out
  along a random direction and back."""
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], n, 0)
    d = rng.normal(size=3) * [0.5, 0.1, 0.5]
    s = np.concatenate([np.linspace(0, 1, n // 2), np.linspace(1, 0, n - n // 2)])
    poses = np.stack([geometry.look_at([x, 1.5 + y, z], [x, 1.5 + y, z + 3], up=(0, 1, 0))
                      for x, y, z in s[:, None] * d])
    out.append((rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                rng.uniform(2.0, 4.0, (h, w)).astype(np.float32), K, poses))
  return out


def wan_world(chunk: int):
  """(config, vae, dit): tiny random Wan networks at 32x32, ``chunk`` video frames per chunk,
  2 preceding latents, up to 2 references (bank of 8); the VACE branch's zero after_proj
  made random so the memory reaches the DiT."""
  from experiments import wan22_ti2v_5b  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  config = wan22_ti2v_5b.get_config("denoiser,tiny")
  config.data.resolution = (32, 32)
  config.denoiser.update(target_frames=chunk, preceding_frames=8, reference_frames=2,
                         reference_bank=8)
  vae = wan_vae.WanVAE(config.autoencoder, rngs=nnx.Rngs(0))
  dit = wan_dit.WanDiT(config.denoiser.model, rngs=nnx.Rngs(1))
  proj = dit.vace.blocks.after_proj
  proj.kernel.set_value(0.2 * jax.random.normal(jax.random.key(2), proj.kernel.get_value().shape))
  return config, vae, dit


def loops(lengths, h: int, w: int):
  """Procedural loop clips (frames, depths, intrinsics, poses_c2w) of ``lengths`` frames."""
  from data_pipelines import procedural  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  return [revisit.fit_clip(procedural.render_clip(100001 + i, n, h, w, trajectory="loop"), (h, w))
          for i, n in enumerate(lengths)]


def _main() -> int:
  try:
    lengths = [int(x) for x in _LENGTHS.value]
  except ValueError:
    raise InputError("--lengths", "lengths", f"expected integers, got {_LENGTHS.value}") from None
  if not lengths or min(lengths) < 2:
    raise InputError("--lengths", "lengths", "need trajectories of at least 2 frames")
  wan = _FAMILY.value == "wan"
  config, ae, dn = wan_world(_WAN_CHUNK.value) if wan else (tiny_cpu.get_config("denoiser"), None, None)
  if not wan:
    config.sampler.update(num_steps=_STEPS.value, method="euler", guidance_scale=0.0)
    ae = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))
    dn = denoiser.Denoiser(config.denoiser.model, nnx.Rngs(1))
  else:
    config.sampler.num_steps = _STEPS.value
  r = rollout.make_rollout(config, ae, dn, _BACKEND.value,
                           **capacity_for(_BACKEND.value, max(lengths), families.world_model(config).memory_config(config)))
  h, w = config.data.resolution
  if wan:  # the Wan family writes every latent with its frame's given depth
    clips = loops(lengths, h, w)
    trajs = [(c["frames"][0], c["depths"][0], c["intrinsics"], c["poses_c2w"]) for c in clips]
    each = [dict(depths=c["depths"]) for c in clips]
    extra = dict(depths=[c["depths"] for c in clips])
  else:
    trajs = trajectories(lengths, h, w)
    each, extra = [{} for _ in trajs], {}
  seeds = list(range(len(trajs)))
  args = [list(x) for x in zip(*trajs)]

  def one_at_a_time():
    return [r.generate(*t, seed=s, progress=False, **e) for t, s, e in zip(trajs, seeds, each)]

  def batched():
    return r.generate_batch(*args, seeds=seeds, progress=False, **extra)

  if _PAIRS.value < 1 or _WARMUP.value < 0:
    raise InputError("--pairs/--warmup", "count", "need --pairs >= 1 and --warmup >= 0")
  result = timing.compare({"one at a time": one_at_a_time, "batched": batched},
                          pairs=_PAIRS.value, warmup=_WARMUP.value,
                          label=f"{_FAMILY.value} eval, {len(lengths)} trajectories")
  a, b = result.outputs["one at a time"], result.outputs["batched"]
  frame_diff = max(int(np.abs(x["frames"].astype(int) - y["frames"].astype(int)).max()) for x, y in zip(a, b))
  depth_diff = 0.0 if wan else max(float(np.abs(x["depths"] - y["depths"]).max())
                                   for x, y in zip(a, b))
  per = r.model.num_chunks
  chunks = sum(per(n) for n in lengths)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; family "
        f"{_FAMILY.value}, backend {_BACKEND.value}, {_STEPS.value} sampler steps, "
        f"{len(lengths)} trajectories of {lengths} frames "
        f"({chunks} chunks one at a time, {per(max(lengths))} batched steps)")
  print(result.format())
  print(f"  max |difference|: frames {frame_diff} (uint8)"
        + ("" if wan else f", depth {depth_diff:.2e} m"))
  return 0


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run_cli(_main)


if __name__ == "__main__":
  app.run(main)
