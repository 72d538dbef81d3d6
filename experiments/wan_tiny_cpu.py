"""The Wan2.2 architecture at tiny widths, pretrained and fine-tuned on a laptop CPU.

  --config=experiments/wan_tiny_cpu.py:<stage>

What ``python -m mirage_jax.main_job --family=wan`` trains, in order, on the procedural rooms
at 128x128 (the Wan VAE's 16x grid: 8x8 latents, 4x4 DiT tokens per latent frame):

  * 'autoencoder': the Wan VAE (``experiments/wan22_pretrain.py``'s stage at widths 16) on
    random 64x64 crops of 5-frame clips (the VAE is convolutional; crops cost a quarter of
    whole frames);
  * 'denoiser': the whole Wan DiT from scratch (a plain Wan DiT: no VACE, no memory) on the
    clips pre-encoded by that VAE: 9 target + 5 preceding video frames = 3 + 2 latent frames;
  * 'mirage': Mirage's fine-tuning on top, the reference's recipe: the VACE branch and LoRA
    adapters train, the pretrained base stays frozen (``denoiser.base_checkpoint``).

Sizes were measured on a 2-core CPU (BENCHMARKS.md, "The tiny Wan family pretrained on a CPU").
"""

from __future__ import annotations

from experiments import mirage_wan22_5b
from experiments import wan22_pretrain

STAGES = ("autoencoder", "denoiser", "mirage")
RESOLUTION = 128
# Procedural clips: enough views of enough rooms for a DiT trained from scratch; each
# clip gives WINDOWS_PER_CLIP training windows of 9 target + 5 preceding frames.
NUM_CLIPS = 96
FRAMES_PER_CLIP = 28
WINDOWS_PER_CLIP = 2
# Clips the VAE export's latent statistics are measured on (main_job's step 2).
LATENT_STATS_CLIPS = 32


def dit_size(model) -> None:
  """The tiny Wan DiT's widths: 4 layers of 128 (4 heads of 32), FFN 384, text 32."""
  model.update(dim=128, num_layers=4, num_heads=4, ffn_dim=384, text_dim=32,
               vace_layers=(0, 2))


def get_config(arg=None):
  stage = (arg or "autoencoder").strip()
  if stage not in STAGES:
    raise ValueError(f"config argument must be one of {STAGES}, got {arg!r}")
  if stage == "autoencoder":
    c = wan22_pretrain.get_config("autoencoder,tiny")
    c.data.update(resolution=(64, 64), num_frames=5, batch_size=2, crop="random_native")
    # Decode the posterior mean: sampled latents kept the posterior's noise (log-variance
    # still -0.2 after 300 steps, noise std 0.9 against latents of std 1.7) and capped the
    # reconstruction at 17 dB PSNR (BENCHMARKS.md); the KL term still regularises the mean.
    c.autoencoder_loss.sample_posterior = False
    c.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=20)
    c.train.update(steps=500, log_every=25)
  else:
    c = (wan22_pretrain.get_config("denoiser,tiny") if stage == "denoiser"
         else mirage_wan22_5b.get_config("tiny"))
    dit_size(c.denoiser.model)
    c.data.update(resolution=(RESOLUTION, RESOLUTION), batch_size=8)
    if stage == "denoiser":
      c.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=50,
                         ema_decay=0.999)
      c.train.update(steps=2000, log_every=50)
    else:
      c.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=20)
      c.train.update(steps=1000, log_every=50)
      # FlowUniPC with 8 steps instead of the reference's 20: evaluation time.
      c.sampler.num_steps = 8
    # Room for the memory of a whole 48-frame loop at 8x8 latents (and a window's sources).
    c.memory.settings.capacity = 4096
  c.data.build.update(num_clips=NUM_CLIPS, frames_per_clip=FRAMES_PER_CLIP,
                      resolution=RESOLUTION)
  c.checkpoint.update(every=250, keep=2, async_save=False)
  c.train.tensorboard = False
  return c
