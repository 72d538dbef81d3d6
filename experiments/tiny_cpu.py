"""Tiny: trains in minutes on a laptop CPU (``--config=experiments/tiny_cpu.py[:denoiser]``)."""

from experiments import common


def get_config(stage=None):
  c = common.base_config(stage)
  # 96 clips: with 24 the dynamic head learnt those scenes' objects (held-out IoU 0.26 vs
  # 0.60 on training scenes, BENCHMARKS.md); rendering them takes seconds.
  c.data.build.update(num_clips=96, frames_per_clip=24, resolution=32)
  c.data.update(resolution=(32, 32), batch_size=8, num_frames=1, stride=2, read_threads=1)
  c.denoiser.update(memory_frames=3, context_frames=1, target_frames=2, prediction="x0_prior")
  # PSNR against ground truth favours the mean: on held-out loops 2 Euler steps gave
  # +0.8 dB revisit PSNR over 8 (BENCHMARKS.md).
  c.sampler.update(num_steps=2, shift=1.0)
  # 2x downsampling (16x16 latents at 32x32): at 4x the autoencoder alone capped memory
  # reads at 22.9 dB PSNR vs 25.6 dB here (BENCHMARKS.md); patches of 2 keep 64 tokens/frame.
  c.autoencoder.channel_mults = (1, 2)
  c.denoiser.model.patch_size = 2
  # Voxels of 0.1 m and 8192 slots hold a loop's scene without eviction (4096 slots of
  # 0.05 m evicted the first visit: -2.7 dB on revisits); with generated content the newest
  # view is not the best one, so no recency band (depth_tolerance 0) here.
  c.memory.settings.update(capacity=8192, voxel_size=0.1, depth_tolerance=0.0)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=20)
  c.train.update(steps=2000 if c.stage == "autoencoder" else 2400, log_every=50)
  c.checkpoint.every = 100
  common.set_window(c)
  return c
