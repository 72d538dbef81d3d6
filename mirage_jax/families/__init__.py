"""The model families, and the one place that picks one for a config.

A family is one package under ``mirage_jax/families/<name>/`` (its networks, its
conditioning, its training stages, its export loading) with two modules the rest of the
project reaches through this registry: ``world_model`` (class ``WorldModel``,
:func:`world_model`) and ``stages`` (``make_stage``, :func:`make_stage`). Removing a family is deleting its folder and its name here.

  * ``small``: the RGB-D autoencoder + DiT of this project, CPU-sized to pod-sized;
  * ``wan``: Mirage's own networks (Wan2.2-TI2V-5B DiT + VACE + LoRA, the Wan2.2 VAE).

Families are imported by name (``importlib``), so nothing here imports a family's code and
families never import each other.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import ml_collections

from mirage_jax.errors import InputError

FAMILIES = ("small", "wan")


def family_name(config: ml_collections.ConfigDict) -> str:
  """The family of a training config or an export's config, checked.

  Read from ``config.family`` (set by every family's ``upgrade``); configs without it (exports
  made before it existed) name it in ``config.denoiser.model.family`` (a denoiser) or
  ``config.autoencoder.family`` (an autoencoder), and configs without those are the small
  family's.
  """
  if "family" in config:
    name = config.family
  elif config.get("stage") == "autoencoder" or "denoiser" not in config:
    name = config.autoencoder.get("family", "small")
  else:
    name = config.denoiser.model.get("family", "small")
  if name not in FAMILIES:
    raise InputError("config", "family", f"expected one of {FAMILIES}, got {name!r}")
  return name


def check_family(config: ml_collections.ConfigDict, name: str) -> str:
  """``name`` if it is ``config``'s family, else an InputError (a config of one family given
  to another family's code)."""
  given = family_name(config)
  if given != name:
    raise InputError("config", "family", f"a {given!r}-family config given to the {name!r} "
                     "family's code")
  return name


def get(config_or_name: ml_collections.ConfigDict | str) -> types.ModuleType:
  """The family package (``mirage_jax.families.<name>``) of a config or a name."""
  name = (config_or_name if isinstance(config_or_name, str)
          else family_name(config_or_name))
  if name not in FAMILIES:
    raise InputError("config", "family", f"expected one of {FAMILIES}, got {name!r}")
  return importlib.import_module(f"mirage_jax.families.{name}")


def _family_module(config_or_name: ml_collections.ConfigDict | str, module: str):
  get(config_or_name)  # checks the name
  name = config_or_name if isinstance(config_or_name, str) else family_name(config_or_name)
  return importlib.import_module(f"mirage_jax.families.{name}.{module}")


def world_model(config_or_name: ml_collections.ConfigDict | str):
  """The ``WorldModel`` class (``mirage_jax.world_model.WorldModel``) of a config's family:
  its module ``world_model``."""
  return _family_module(config_or_name, "world_model").WorldModel


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None):
  """The training stage of ``config.stage`` from the family's module ``stages``
  (``make_stage(config, frozen)``); imported only when training.

  ``'depth'`` (``mirage_jax.depth.stage``) belongs to no family: a monocular depth network
  trained on the frames of any family's data, so it is found by its stage name alone.
  """
  if config.get("stage") == "depth":
    from mirage_jax.depth import stage as depth_stage  # pylint: disable=g-import-not-at-top
    return depth_stage.make_stage(config, frozen)
  return _family_module(config, "stages").make_stage(config, frozen)


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` (an export's, of any age) in the current schema of its family."""
  return world_model(config).upgrade(config)
