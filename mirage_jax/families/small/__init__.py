"""The small family: an RGB-D autoencoder and a DiT on its latents, CPU-sized to pod-sized.

``autoencoder``, ``denoiser``: the networks; ``stages``: their training stages.
"""

from typing import Any

import ml_collections


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None):
  """The training stage of ``config.stage`` (``stages.make_stage``)."""
  # Imported here: the stages import the rollout, which imports this package's networks.
  from mirage_jax.families.small import stages  # pylint: disable=g-import-not-at-top
  return stages.make_stage(config, frozen)
