"""Pretraining the Wan2.2-TI2V-5B architecture (no released weights needed).

  --config=experiments/wan22_pretrain.py:<stage>[,<variant>[,<mesh>]]

``<stage>``:

  * 'denoiser' (default): the whole Wan DiT trains, from its random init
    (``denoiser.train_stages=('base',)``, no ``base_checkpoint``; give one to continue from an
    export instead), as a plain Wan DiT (``model.vace=False``: TI2V flow matching on latent
    clips, the sequence ``[references | noisy target | preceding]`` with per-frame timesteps,
    no memory and no VACE input);
  * 'autoencoder': the Wan2.2 VAE (encoder + decoder, ``families.wan.stages.WanVAEStage``) on
    RGB clips of 1 + 4 k frames with L1 + KL (the Wan report's weights 3 and 3e-6; no LPIPS,
    no GAN: see the stage), from scratch, or continuing a Wan VAE export
    (``--config.autoencoder_checkpoint=EXPORT/vae``: ``convert_wan``'s, or an export of this
    stage).

``<variant>``: 'ti2v_5b' (default: the released model's sizes; the DiT on the reference's
clips, 704x1280, 33 target + 8 preceding video frames, 8 references; the VAE on 128x128 clips
of 5 frames, the report's video stage) or 'tiny' (the test-size networks, trains on a CPU:
the DiT on 64x64 latent clips, the VAE on 64x64 procedural clips of 5 frames). ``<mesh>``:
'v5p_128' (default for ti2v_5b) or 'v5e_256'; the tiny variant uses the host's devices.

Pipeline: the VAE stage, ``python -m mirage_jax.export`` (a Wan VAE export, as a converted
one); ``python -m data_pipelines.encode_latents --vae=<VAE export>`` (posed clips -> latent
clips); the denoiser stage with ``--config.data.data_dir=LATENTS``; its export is a whole Wan
DiT, the ``denoiser.base_checkpoint`` of a Mirage fine-tune (``experiments/mirage_wan22_5b.py``).
The latent dataset's control video is not needed for the denoiser stage (no VACE), so neither
is ``denoiser.autoencoder_checkpoint``.
"""

from __future__ import annotations

from experiments import common
from experiments import mirage_wan22_5b
from experiments import wan22_ti2v_5b


# The VAE (ti2v_5b: 705M params) shards its kernels' input channels over fsdp (the conv_in
# rule); its widths (48, 96, 160, ...) divide 16, not 32, so FSDP 16 x data parallel over
# the rest of the slice, one 128x128x5 clip per chip (v5p-128 = 64 chips, v5e-256 = 256).
VAE_MESHES = {
    "v5p_128": dict(mesh=dict(data=4, fsdp=16, context=1, tensor=1), batch_size=64),
    "v5e_256": dict(mesh=dict(data=16, fsdp=16, context=1, tensor=1), batch_size=256),
}


def parse_arg(arg: str | None) -> tuple[str, str, str | None]:
  """``'<stage>[,<variant>[,<mesh>]]'`` -> (stage, variant, mesh or None)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  stage = parts[0] if parts else "denoiser"
  if stage not in common.STAGES:
    raise ValueError(f"config argument must be '<stage>[,<variant>[,<mesh>]]' with stage in "
                     f"{common.STAGES}, got {arg!r}")
  variant, mesh, _ = mirage_wan22_5b.parse_arg(",".join(parts[1:]))
  return stage, variant, mesh


def get_config(arg=None):
  stage, variant, mesh = parse_arg(arg)
  if stage == "autoencoder":
    return autoencoder_config(variant, mesh)
  return denoiser_config(variant, mesh)


def autoencoder_config(variant: str, mesh: str | None):
  """The VAE stage (module docstring)."""
  c = wan22_ti2v_5b.get_config(f"autoencoder,{variant}")
  c.autoencoder_checkpoint = ""  # a Wan VAE export to continue ('' = from scratch)
  # The Wan report's L1 and KL weights (families.wan.stages.vae_loss_settings).
  c.autoencoder_loss = dict(l1_weight=3.0, kl_weight=3e-6, sample_posterior=True)
  c.data.dataset = "procedural_rooms"
  c.data.frames_dtype = "uint8"
  c.data.stride = 1
  c.data.shuffle = True
  c.data.crop = "random"
  c.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-5, warmup_steps=100, b1=0.9,
                     b2=0.99, weight_decay=0.0, grad_clip_norm=1.0, ema_decay=0.999)
  if variant == "ti2v_5b":
    m = VAE_MESHES[mesh]
    c.mesh = m["mesh"]
    # The report's video stage: 128x128 clips of 5 frames.
    c.data.update(resolution=(128, 128), num_frames=5, batch_size=m["batch_size"])
    c.data.build.update(num_clips=4096, frames_per_clip=64, resolution=128)
    c.autoencoder.remat = "full"
    c.train.update(steps=20000, log_every=50)
    c.checkpoint.every = 1000
  else:
    c.mesh = dict(data=1, fsdp=2, context=1, tensor=-1)
    c.data.update(resolution=(64, 64), num_frames=5, batch_size=2, read_threads=1)
    c.data.build.update(num_clips=64, frames_per_clip=24, resolution=64)
    c.autoencoder.remat = "none"
    c.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=20)
    c.train.update(steps=300, log_every=25)
    c.checkpoint.every = 100
  common.set_window(c)
  return c


def denoiser_config(variant: str, mesh: str | None):
  """The Mirage fine-tuning config's data, shapes and mesh, with the whole plain DiT
  training from scratch."""
  c = mirage_wan22_5b.get_config(variant if mesh is None else f"{variant},{mesh}")
  d = c.denoiser
  d.train_stages = ("base",)
  d.base_checkpoint = ""  # from the random init; an export here continues from it
  d.model.vace = False  # a plain Wan DiT: no VACE branch, no memory read
  c.memory.backend = "none"  # and so, generating alone, it keeps no memory
  d.model.lora_rank = 0
  if variant == "ti2v_5b":
    # From scratch: a higher rate than the reference's fine-tuning 1e-5, warmed up and
    # decayed, with an EMA of the weights for the export.
    c.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-5, warmup_steps=2000,
                       ema_decay=0.9999)
    c.train.steps = 200_000
    c.checkpoint.every = 1000
  else:
    c.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-3, warmup_steps=0,
                       ema_decay=0.0)
  return c
