"""Pretraining the Wan2.2-TI2V-5B architecture (no released weights needed).

  --config=experiments/wan22_pretrain.py:<stage>[,<variant>[,<mesh>]]

``<stage>``: 'denoiser' (default): the whole Wan DiT trains, from its random init
(``denoiser.train_stages=('base',)``, no ``base_checkpoint``; give one to continue from an
export instead), as a plain Wan DiT (``model.vace=False``: TI2V flow matching on latent clips,
the sequence ``[references | noisy target | preceding]`` with per-frame timesteps, no memory
and no VACE input). 'autoencoder': the Wan VAE (not yet).

``<variant>``: 'ti2v_5b' (default: the released model's sizes and clips, 704x1280, 33 target
+ 8 preceding video frames, 8 references) or 'tiny' (the test-size networks, 64x64 frames,
trains on CPU). ``<mesh>``: 'v5p_128' (default for ti2v_5b) or 'v5e_256', the meshes of
``experiments/mirage_wan22_5b.py``; the tiny variant uses every local device.

Pipeline: ``python -m data_pipelines.encode_latents --vae=<Wan VAE export>`` (posed clips ->
latent clips), then ``python -m mirage_jax.main --config=...:denoiser,ti2v_5b
--config.data.data_dir=LATENTS``; ``python -m mirage_jax.export`` of the run is a whole Wan
DiT, the ``denoiser.base_checkpoint`` of a Mirage fine-tune
(``experiments/mirage_wan22_5b.py``). The latent dataset's control video is not needed here
(no VACE), so neither is ``denoiser.autoencoder_checkpoint``.
"""

from __future__ import annotations

from experiments import common
from experiments import mirage_wan22_5b


def parse_arg(arg: str | None) -> tuple[str, str, str | None]:
  """``'<stage>[,<variant>[,<mesh>]]'`` -> (stage, variant, mesh or None)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  stage = parts[0] if parts else "denoiser"
  if stage not in common.STAGES:
    raise ValueError(f"config argument must be '<stage>[,<variant>[,<mesh>]]' with stage in "
                     f"{common.STAGES}, got {arg!r}")
  variant, mesh = mirage_wan22_5b.parse_arg(",".join(parts[1:]))
  return stage, variant, mesh


def get_config(arg=None):
  stage, variant, mesh = parse_arg(arg)
  if stage == "autoencoder":
    return autoencoder_config(variant, mesh)
  return denoiser_config(variant, mesh)


def autoencoder_config(variant: str, mesh: str | None):
  raise ValueError(f"wan22_pretrain.py: the 'autoencoder' stage (training the Wan VAE) is not "
                   f"available yet (variant {variant!r}, mesh {mesh!r}); use the converted VAE "
                   "(python -m mirage_jax.convert_wan)")


def denoiser_config(variant: str, mesh: str | None):
  """The Mirage fine-tuning config's data, shapes and mesh, with the whole plain DiT
  training from scratch."""
  c = mirage_wan22_5b.get_config(variant if mesh is None else f"{variant},{mesh}")
  d = c.denoiser
  d.train_stages = ("base",)
  d.base_checkpoint = ""  # from the random init; an export here continues from it
  d.model.vace = False  # a plain Wan DiT: no VACE branch, no memory read
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
