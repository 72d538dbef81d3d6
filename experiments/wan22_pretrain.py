"""Pretraining the Wan-architecture family: the Wan2.2 VAE (this file's ``autoencoder`` stage).

  --config=experiments/wan22_pretrain.py:autoencoder[,<variant>[,<mesh>]]

``autoencoder``: the Wan2.2 VAE (encoder + decoder, ``families.wan.stages.WanVAEStage``) on
RGB clips of 1 + 4 k frames with L1 + KL (the Wan report's weights 3 and 3e-6; no LPIPS, no
GAN: see the stage). ``<variant>``: 'ti2v_5b' (the released VAE's sizes; 128x128 clips of 5
frames, the report's video stage, on a pod) or 'tiny' (the test-size VAE, widths 16, on the
procedural rooms at 64x64, 5 frames: trains on a CPU). ``<mesh>``: 'v5p_128' (default for
ti2v_5b) or 'v5e_256'; tiny uses the host's devices (FSDP 2, the rest on the tensor axis).

From scratch by default; ``--config.autoencoder_checkpoint=EXPORT/vae`` continues a Wan VAE
export (``convert_wan``'s, or an export of this stage). The run's export
(``python -m mirage_jax.export``) is a Wan VAE export: ``python -m
data_pipelines.encode_latents --vae=<export>`` encodes latent clips with it.
"""

from __future__ import annotations

from experiments import common
from experiments import wan22_ti2v_5b

VARIANTS = wan22_ti2v_5b.VARIANTS
STAGES = ("autoencoder",)  # the denoiser stage is added beside it

# The VAE (ti2v_5b: 705M params) shards its kernels' input channels over fsdp (the conv_in
# rule); its widths (48, 96, 160, ...) divide 16, not 32, so FSDP 16 x data parallel over
# the rest of the slice, one 128x128x5 clip per chip (v5p-128 = 64 chips, v5e-256 = 256).
VAE_MESHES = {
    "v5p_128": dict(mesh=dict(data=4, fsdp=16, context=1, tensor=1), batch_size=64),
    "v5e_256": dict(mesh=dict(data=16, fsdp=16, context=1, tensor=1), batch_size=256),
}


def parse_arg(arg: str | None) -> tuple[str, str, str | None]:
  """``'<stage>[,<variant>[,<mesh>]]'`` -> (stage, variant, mesh); defaults 'autoencoder',
  'ti2v_5b', and 'v5p_128' for ti2v_5b (None for tiny)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  stage = parts[0] if parts else "autoencoder"
  variant = parts[1] if len(parts) > 1 else "ti2v_5b"
  mesh = parts[2] if len(parts) > 2 else ("v5p_128" if variant == "ti2v_5b" else None)
  if (stage not in STAGES or variant not in VARIANTS or len(parts) > 3
      or (mesh is not None and mesh not in VAE_MESHES)):
    raise ValueError(f"config argument must be '<stage>[,<variant>[,<mesh>]]' with stage in "
                     f"{STAGES}, variant in {VARIANTS} and mesh in {tuple(VAE_MESHES)}, got "
                     f"{arg!r}")
  return stage, variant, mesh


def get_config(arg=None):
  stage, variant, mesh = parse_arg(arg)
  if stage == "autoencoder":
    return autoencoder_config(variant, mesh)
  raise ValueError(f"unknown stage {stage!r}")


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
