"""Tiny: trains in minutes on a laptop CPU (``--config=experiments/tiny_cpu.py[:<stage>[,memory_maze]]``).

``<stage>`` is 'autoencoder' (default) or 'denoiser'. ',memory_maze' is the Memory Maze variant
(the ``evaluate --benchmark=memory_maze`` protocol): 64x64 Memory Maze clips, the same
networks with one more downsampling (16x16 latents, so the denoiser's tokens per frame are
the 32x32 config's), memory sized for a 9x9 maze.
"""

from experiments import common

VARIANTS = ("procedural", "memory_maze")


def parse_arg(arg):
  """``'<stage>[,<variant>]'`` -> (stage, variant); defaults 'autoencoder', 'procedural'."""
  return common.parse_stage_variant(arg, "autoencoder", "procedural", VARIANTS)


def get_config(arg=None):
  stage, variant = parse_arg(arg)
  c = common.base_config(stage)
  # 96 clips: with 24 the dynamic head learnt those scenes' objects (held-out IoU 0.26 vs
  # 0.60 on training scenes, BENCHMARKS.md); rendering them takes seconds.
  c.data.build.update(num_clips=96, frames_per_clip=24, resolution=32)
  c.data.update(resolution=(32, 32), batch_size=8, num_frames=1, stride=2, read_threads=1)
  c.denoiser.update(memory_frames=3, context_frames=1, target_frames=2, prediction="x0_prior")
  # PSNR against ground truth favours the mean: on held-out loops 2 Euler steps gave
  # +0.8 dB revisit PSNR over 8 (BENCHMARKS.md). Shift 5 (the reference's) puts the middle
  # time at 0.83 instead of 0.5: +0.36 dB voxel revisit PSNR on held-out loops (better on
  # 8 of 8) and +0.23 dB on the Memory Maze protocol (BENCHMARKS.md, "Where the oracle gap
  # comes from").
  c.sampler.update(num_steps=2, shift=5.0)
  # Decoding and re-encoding each chunk's latents before they become context and memory:
  # +1.8 dB voxel revisit PSNR on held-out loops (better on 8 of 8), BENCHMARKS.md.
  c.sampler.reencode_latents = True
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
  if variant == "memory_maze":
    _memory_maze(c)
  common.set_window(c)
  return c


def _memory_maze(c) -> None:
  """The Memory Maze variant (module docstring); steps sized for about an hour on 2 cores."""
  c.data.dataset = "memory_maze"
  # Seeds 0..num_clips-1 (9x9 mazes, the scripted `explore` walk); evaluation mazes are
  # seeded from 1000000 (evaluate --memory_maze_seeds).
  c.data.build = dict(num_clips=64, frames_per_clip=32, resolution=64, maze_size=9, first_seed=0)
  # Every frame: the protocol generates every control step (4 Hz).
  c.data.update(resolution=(64, 64), stride=1)
  # 4x: 16x16 latents at 64x64, the 32x32 config's denoiser cost per frame.
  c.autoencoder.channel_mults = (1, 2, 2)
  # Corridors of a 9x9 maze run up to 18 m; log-depth spans e^3 ~ 20 m (e^2 ~ 7 m at 2).
  c.autoencoder.depth_log_scale = 3.0
  # 0.2 m voxels: a 9x9 maze's walls and floor seen over a few hundred frames fit 16384.
  c.memory.settings.update(capacity=16384, voxel_size=0.2)
  # About 1 s (autoencoder) and 2 s (denoiser) a step on the shared 2-core CPU (BENCHMARKS.md).
  c.train.steps = 600 if c.stage == "autoencoder" else 800
