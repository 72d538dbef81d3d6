"""The small family: the RGB-D autoencoder + DiT of this project (``WorldModel``)."""

from mirage_jax.families.small.world_model import WorldModel

__all__ = ["WorldModel"]
