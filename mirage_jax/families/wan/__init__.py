"""The Wan family: Mirage's own networks (Wan2.2-TI2V-5B DiT + VACE + LoRA, the Wan2.2 VAE)."""

from mirage_jax.families.wan.world_model import WorldModel

__all__ = ["WorldModel"]
