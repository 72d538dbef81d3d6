"""The small family: an RGB-D autoencoder and a DiT on its latents, CPU-sized to pod-sized.

``autoencoder``, ``denoiser``: the networks; ``conditioning``: what training and generation
share (memory settings, the DiT's inputs); ``world_model``: generation (``WorldModel``);
``stages``: the training stages.
"""

from typing import Any

import ml_collections

from mirage_jax.families.small.world_model import WorldModel


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None):
  """The training stage of ``config.stage`` (``stages.make_stage``)."""
  # Imported here: generation need not load the training stages.
  from mirage_jax.families.small import stages  # pylint: disable=g-import-not-at-top
  return stages.make_stage(config, frozen)


__all__ = ["WorldModel", "make_stage"]
