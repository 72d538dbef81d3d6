"""How much of a revisited view the memory alone can give back, per backend and setting.

For held-out procedural loops (the last frame returns to the first frame's pose), encode
every ground-truth frame with a trained autoencoder, write frames 0..T-2 into the memory,
read it into the last camera, decode, and compare with the ground truth (PSNR, dB). This is
the ceiling of the oracle rows of the revisit benchmark, without the denoiser.

  python benchmarks/bench_memory_fidelity.py --autoencoder=EXPORT [--seeds=100000:100003]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from data_pipelines import procedural
from experiments import tiny_cpu
from mirage_jax import rollout
from mirage_jax.families.small import world_model as small_world_model
from mirage_jax import families
from mirage_jax import memory as memory_lib
from mirage_jax.evaluation import metrics

_AE = flags.DEFINE_string("autoencoder", None, "Autoencoder export.", required=True)
_SEEDS = flags.DEFINE_string("seeds", "100000:100003", "Held-out loop seeds a:b.")
_FRAMES = flags.DEFINE_integer("num_frames", 48, "Frames per loop.")

VARIANTS = (
    ("mirage", {}),
    ("voxel", dict(voxel_size=0.05, depth_tolerance=0.0)),
    ("voxel", dict(voxel_size=0.05, depth_tolerance=0.1)),
    ("voxel", dict(voxel_size=0.05, depth_tolerance=0.2)),
    ("voxel", dict(voxel_size=0.05, depth_tolerance=0.3)),
    ("voxel", dict(voxel_size=0.1, depth_tolerance=0.2)),
)


def main(argv):
  del argv
  ae, ae_config = small_world_model.load_model(_AE.value)
  config = tiny_cpu.get_config("denoiser")
  config.autoencoder = ae_config.autoencoder
  h, w = config.data.resolution
  n = _FRAMES.value
  a, b = (int(x) for x in _SEEDS.value.split(":"))
  scores, depth_error = [], []
  for seed in range(a, b):
    clip = procedural.render_clip(seed, n, h, w, trajectory="loop")
    frames = jnp.asarray(clip["frames"], jnp.float32) / 127.5 - 1.0
    depths = jnp.asarray(clip["depths"])
    K, c2w = jnp.asarray(clip["intrinsics"]), jnp.asarray(clip["poses_c2w"])
    latents, _ = ae.encode(frames, depths)
    truth = (frames[-1:] + 1.0) / 2.0
    recon, recon_depth = ae.decode(latents)
    depth_error.append(float(jnp.mean(metrics.depth_metrics(recon_depth, depths)["abs_rel"])))
    row = [float(metrics.psnr((recon[-1:] + 1.0) / 2.0, truth)[0])]
    for name, overrides in VARIANTS:
      capacity = (n * h * w) if name == "mirage" else config.memory.settings.capacity
      backend = memory_lib.get_backend(name)
      state = backend.init(families.world_model(config).memory_config(config, capacity=capacity, **overrides))
      state = backend.write(state, latents[:-1], depths[:-1], K[:-1], c2w[:-1],
                            jnp.ones((n - 1, h, w), bool), jnp.arange(n - 1, dtype=jnp.int32))
      read, _ = backend.read(state, K[-1:], c2w[-1:])
      rgb, _ = ae.decode(read.astype(jnp.float32))
      row.append(float(metrics.psnr((rgb + 1.0) / 2.0, truth)[0]))
    scores.append(row)
  mean = np.mean(scores, axis=0)
  print(f"| setting | PSNR of the revisited view (dB, mean of {b - a} loops) |")
  print("|---|---|")
  print(f"| autoencoder reconstruction (ceiling) | {mean[0]:.2f} |")
  for (name, overrides), value in zip(VARIANTS, mean[1:]):
    print(f"| {name} {overrides} | {value:.2f} |")
  print(f"\nautoencoder depth abs-rel on these clips (all frames): {np.mean(depth_error):.4f}")


if __name__ == "__main__":
  app.run(main)
