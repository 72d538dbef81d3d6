"""The small family: an RGB-D autoencoder and a DiT on its latents, CPU-sized to pod-sized.

``autoencoder``, ``denoiser``: the networks; ``conditioning``: what training and generation
share (memory settings, the DiT's inputs); ``world_model``: generation (``WorldModel``);
``stages``: the training stages.
"""

from typing import Any

import ml_collections


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None):
  """The training stage of ``config.stage`` (``stages.make_stage``)."""
  # Imported here: generation need not load the training stages.
  from mirage_jax.families.small import stages  # pylint: disable=g-import-not-at-top
  return stages.make_stage(config, frozen)


def __getattr__(name: str):
  """``WorldModel`` on first use: importing a family's networks (a config file does) must
  not load the memory and rollout code, which touches JAX's backends before
  ``jax.distributed.initialize`` may run."""
  if name == "WorldModel":
    from mirage_jax.families.small.world_model import WorldModel  # pylint: disable=g-import-not-at-top
    return WorldModel
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["WorldModel", "make_stage"]
