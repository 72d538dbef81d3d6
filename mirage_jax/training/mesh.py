"""The device mesh of a training config and its logical-axis rules.

``config.mesh`` (ICI) x ``config.dcn_mesh`` -> a (data, fsdp, context, tensor) ``Mesh``;
``config.logical_rules`` map the params' and activations' logical axis names onto it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from mirage_jax import sharding
from mirage_jax.errors import InputError


def build_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, context, tensor) mesh of ``config.mesh`` (ICI) x ``config.dcn_mesh``.

  ``config.dcn_mesh`` gives how many slices each axis spans (multi-slice TPU, or GPU nodes
  over the data-center network); all ones means one slice, and ``config.mesh`` may use -1 for
  "all remaining devices".
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = {a: int(config.dcn_mesh.get(a, 1)) for a in sharding.MESH_AXES}
  num_slices = math.prod(dcn.values())
  if num_slices == 1:
    return sharding.make_mesh(dict(config.mesh), devices, where="config.mesh")
  if len(devices) % num_slices:
    raise InputError("config.dcn_mesh", "dcn_mesh", f"{len(devices)} devices do not split "
                     f"into {num_slices} slices")
  per_slice = sharding.make_mesh(dict(config.mesh), devices[:len(devices) // num_slices],
                                 where="config.mesh")
  ici_shape = [per_slice.shape[a] for a in sharding.MESH_AXES]
  dcn_shape = [dcn[a] for a in sharding.MESH_AXES]
  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  return Mesh(grid, sharding.MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """``config.logical_rules`` as a tuple of (logical name, mesh axis / axes / None)."""
  rules = []
  for pair in config.logical_rules:
    name, target = pair
    rules.append((name, tuple(target) if isinstance(target, list) else target))
  return tuple(rules)


def batch_axes(mesh: Mesh, rules) -> Any:
  """Mesh axes that the batch dimension is split over (the ``batch`` logical rule)."""
  return sharding.logical_to_spec(("batch",), rules, mesh)[0]
