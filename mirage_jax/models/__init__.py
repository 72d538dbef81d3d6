"""Networks: the RGB-D autoencoder, the DiT denoiser and their shared layers."""

from mirage_jax.models.autoencoder import Autoencoder, autoencoder_config
from mirage_jax.models.denoiser import Denoiser, denoiser_config, denoiser_flops

__all__ = ["Autoencoder", "autoencoder_config", "Denoiser", "denoiser_config",
           "denoiser_flops"]
