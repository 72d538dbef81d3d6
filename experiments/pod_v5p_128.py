"""Pod: a v5p-128 slice (64 chips, topology 4x4x4), ~2.4B-parameter DiT, 256x256 frames.

Window of 24 frames: 8 written into memory (the last 4 also clean context), 16 targets
(5120 tokens per example with 2x2 patches of the 32x32 latents). FSDP over all chips.

  python -m mirage_jax.aot --config=experiments/pod_v5p_128.py:denoiser --topology=v5p:4x4x4
"""

from experiments import common
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser


def get_config(stage=None):
  c = common.base_config(stage)
  c.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  c.data.dataset = "procedural_rooms"
  # Storage every host reads: a gs:// URL directly, not a gcsfuse mount (README "Cloud
  # Storage (gs://) paths"). Name your bucket with --config.data.data_dir=gs://...
  c.data.data_dir = "gs://BUCKET/datasets"
  c.data.build.update(num_clips=200_000, frames_per_clip=96, resolution=256)
  c.data.update(resolution=(256, 256), stride=1, worker_count=8, read_threads=8)
  c.autoencoder = autoencoder.autoencoder_config("base")
  c.denoiser.model = denoiser.denoiser_config("pod")
  c.denoiser.update(memory_frames=8, context_frames=4, target_frames=16, time_shift=5.0)
  c.memory.settings.update(capacity=131072, voxel_size=0.05)
  if c.stage == "autoencoder":
    c.data.update(batch_size=512, num_frames=1)
    c.optimizer.update(learning_rate=2e-4, warmup_steps=5000)
  else:
    c.data.batch_size = 128  # 2 per chip
    c.optimizer.update(learning_rate=1e-4, warmup_steps=5000, weight_decay=0.0,
                       ema_decay=0.9999)
  c.train.update(steps=500_000, log_every=100)
  c.checkpoint.update(every=1000, keep=3)
  c.eval.update(every=10_000, batches=8)
  common.set_window(c)
  return c
