"""Base: one GPU/TPU host (8 accelerators), ~190M-parameter DiT, 128x128 frames.

  python -m mirage_jax.main --config=experiments/base.py:autoencoder --workdir=runs/base_ae
  python -m mirage_jax.export --workdir=runs/base_ae --output=runs/base_ae_export
  python -m mirage_jax.main --config=experiments/base.py:denoiser --workdir=runs/base_dit \\
      --config.denoiser.autoencoder_checkpoint=runs/base_ae_export
"""

from experiments import common
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser


def get_config(stage=None):
  c = common.base_config(stage)
  c.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  c.data.build.update(num_clips=2000, frames_per_clip=64, resolution=128)
  c.data.update(resolution=(128, 128), stride=1, worker_count=4, read_threads=4)
  c.autoencoder = autoencoder.autoencoder_config("base")
  c.denoiser.model = denoiser.denoiser_config("base")
  c.denoiser.update(memory_frames=6, context_frames=2, target_frames=8, time_shift=3.0)
  c.memory.settings.update(capacity=65536, voxel_size=0.05)
  if c.stage == "autoencoder":
    c.data.update(batch_size=32, num_frames=2, stride=8)
    c.optimizer.update(learning_rate=2e-4, warmup_steps=2000)
  else:
    c.data.batch_size = 32
    c.optimizer.update(learning_rate=1e-4, warmup_steps=2000, weight_decay=0.0)
  c.train.update(steps=200_000, log_every=100)
  c.checkpoint.update(every=2000, keep=3)
  c.eval.update(every=5000, batches=8)
  common.set_window(c)
  return c
