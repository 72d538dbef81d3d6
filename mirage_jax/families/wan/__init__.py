"""The Wan family: Mirage's own networks (Wan2.2-TI2V-5B DiT + VACE + LoRA, the Wan2.2 VAE).

``dit``, ``vae``: the networks; ``conditioning``: memory, VACE and timestep inputs (what
training and generation share); ``world_model``: generation (``WorldModel``); ``stage``: the
fine-tuning stage; ``convert``, ``weight_files``, ``original_layout``: the released weights.
"""

from typing import Any

import ml_collections


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None):
  """The training stage of ``config.stage`` (``stage.make_stage``)."""
  # Imported here: generation need not load the training stage.
  from mirage_jax.families.wan import stage  # pylint: disable=g-import-not-at-top
  return stage.make_stage(config, frozen)


def __getattr__(name: str):
  """``WorldModel`` on first use: importing a family's networks (a config file does) must
  not load the memory and rollout code, which touches JAX's backends before
  ``jax.distributed.initialize`` may run."""
  if name == "WorldModel":
    from mirage_jax.families.wan.world_model import WorldModel  # pylint: disable=g-import-not-at-top
    return WorldModel
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["WorldModel", "make_stage"]
