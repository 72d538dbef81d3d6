"""Wan2.2-TI2V-5B (DiT + VACE + LoRA, Wan2.2 VAE): the reference's model at its own sizes.

  --config=experiments/wan22_ti2v_5b.py[:<stage>[,tiny]]

``<stage>`` is 'autoencoder' or 'denoiser' (default); ',tiny' picks the test-size variant of
both networks. This is the config of the released weights: ``python -m mirage_jax.convert_wan``
writes both exports with it. The runs build on it: ``experiments/mirage_wan22_5b.py``
(Mirage's VACE + LoRA fine-tuning, the reference's recipe), ``experiments/wan22_pretrain.py``
(the VAE and the whole DiT trained from scratch) and ``experiments/wan_tiny_cpu.py`` (all of
it at tiny widths on a CPU: ``python -m mirage_jax.main_job --family=wan``).
"""

from experiments import common
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import vae as wan_vae

VARIANTS = ("ti2v_5b", "tiny")


def parse_arg(arg: str | None) -> tuple[str, str]:
  """``'<stage>[,<variant>]'`` -> (stage, variant); defaults 'denoiser', 'ti2v_5b'."""
  return common.parse_stage_variant(arg, "denoiser", "ti2v_5b", VARIANTS)


def get_config(arg=None):
  stage, variant = parse_arg(arg)
  c = common.base_config(stage)
  c.family = "wan"
  c.variant = variant
  c.autoencoder = wan_vae.wan_vae_config(variant)
  c.denoiser.model = wan_dit.wan_dit_config(variant)
  # The reference's sampler: FlowUniPC (order 2), 20 steps, shift 5, no guidance.
  c.sampler.update(method="unipc", num_steps=20, shift=5.0, guidance_scale=0.0)
  # Its training: sigma ~ U(0, 1) shifted by 5; AdamW(0.9, 0.999) at a constant 1e-5,
  # weight decay 0.01, gradient clip 1.0, seed 3407, one clip per device step.
  c.denoiser.update(time_shift=5.0, time_weighting="uniform", prediction="velocity")
  c.optimizer.update(learning_rate=1e-5, end_learning_rate=1e-5, warmup_steps=0, b1=0.9,
                     b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)
  c.seed = 3407
  if variant == "ti2v_5b":
    # Clips of the reference: 1280x704 (latent 80x44).
    c.data.update(resolution=(704, 1280), batch_size=1)
  else:
    c.data.update(resolution=(32, 32), batch_size=2)
  common.set_window(c)
  return c


def export_configs(variant: str = "ti2v_5b"):
  """(autoencoder, denoiser) configs of the two exports ``families.wan.convert`` writes."""
  return get_config(f"autoencoder,{variant}"), get_config(f"denoiser,{variant}")
