"""Device mesh and logical-axis sharding.

Model code never names mesh axes. Parameters carry *logical* axis names in their
``out_sharding`` metadata (see ``mirage_jax.nn.layers.param``) and activations are
constrained with logical names through :func:`constrain`. One rules table, a tuple of
``(logical_name, mesh_axis | tuple of mesh axes | None)`` pairs that a config can override,
maps them onto the four mesh axes:

  * ``data``: pure data parallelism (params replicated),
  * ``fsdp``: data parallelism with parameters and optimizer state sharded,
  * ``context``: the token (sequence) axis of video activations,
  * ``tensor``: attention heads and MLP hidden units (Megatron-style).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirage_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical names. Parameter axes: embed, mlp, heads, head_dim, layers, conv_in, conv_out,
# patch_in, latent_ch, cond_embed, vocab. Activation axes: batch, frames, tokens, height, width,
# act_embed, act_mlp, act_heads, cond_tokens.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("patch_in", None),
    ("latent_ch", None),
    ("cond_embed", None),
    ("vocab", None),  # a token-embedding table's rows (its columns are 'embed')
    # activations
    ("batch", ("data", "fsdp")),
    ("frames", None),
    ("tokens", "context"),
    ("height", None),
    ("width", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("cond_tokens", None),
)


# ----------------------------------------------------------------------------- mesh


def target_platform() -> str:
  """The platform being compiled for: the current (abstract) mesh's devices', else the default
  backend's ('cpu', 'gpu', 'tpu'). Lets a layer pick the formulation its compiler runs best."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def make_mesh(mesh_shape: dict[str, int], devices: Sequence[Any] | None = None,
              where: str = "config.mesh") -> Mesh:
  """Builds a 4-axis (data, fsdp, context, tensor) mesh with Auto axis types.

  Args:
    mesh_shape: axis name -> size; missing axes get size 1, one axis may be -1 to take
      all remaining devices.
    devices: devices to use (default: all ``jax.devices()``).
    where: name of the config field, for error messages.
  Returns:
    A ``jax.sharding.Mesh`` with axes ``MESH_AXES`` in that order.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise InputError(where, sorted(unknown)[0], f"unknown mesh axis; known: {MESH_AXES}")
  sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise InputError(where, "mesh", "at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise InputError(where, "mesh", f"axis sizes must be positive or -1, got {sizes}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise InputError(where, "mesh", f"{len(devices)} devices not divisible by {fixed}")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise InputError(where, "mesh", f"mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


# ----------------------------------------------------------------------------- rules


class _Rules(threading.local):
  rules: tuple[tuple[str, Any], ...] = DEFAULT_LOGICAL_RULES


_RULES = _Rules()


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Makes ``rules`` the table that :func:`constrain` uses while the context is open."""
  old = _RULES.rules
  _RULES.rules = tuple((k, v) for k, v in rules)
  try:
    yield
  finally:
    _RULES.rules = old


def current_rules() -> tuple[tuple[str, Any], ...]:
  return _RULES.rules


def logical_to_spec(logical_axes: Sequence[str | None], rules=None, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a mesh ``PartitionSpec``.

  A mesh axis is used at most once per array (the first dimension to claim it wins), so
  e.g. ``('batch', 'embed')`` does not put ``fsdp`` on both dimensions. When ``mesh`` and
  ``shape`` are given, mesh axes that do not divide a dimension are dropped (tiny configs).

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: rules table (default: the current one, see :func:`use_rules`).
    mesh: optional mesh, to drop axes that are absent or do not divide ``shape``.
    shape: optional array shape, same length as ``logical_axes``.
  """
  table = dict(current_rules() if rules is None else rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    for a in axes:
      if a in used or (mesh is not None and a not in mesh.shape):
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]
        if shape[i] % size:
          continue
      kept.append(a)
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def param_spec(name: str, logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
               rules=None) -> PartitionSpec:
  """:func:`logical_to_spec` for a parameter, where a silent replicate would hide a mistake.

  A mesh axis that does not divide the dimension it is assigned to is dropped only when the
  dimension is smaller than the axes (e.g. 4 input channels over 8 devices: it cannot be
  split at all); a dimension at least that large that does not divide (e.g. 1000 over 64) is
  a config error: it would keep a full copy of the weight on every device.

  Args:
    name: the parameter's path, for the error message.
    logical_axes, shape: one logical name (or None) and one size per dimension.
    mesh: the device mesh (or anything with a ``shape`` mapping of axis sizes).
  Raises:
    InputError: naming the parameter, the dimension and the mesh axis.
  """
  table = dict(current_rules() if rules is None else rules)
  used: set[str] = set()
  for i, logical in enumerate(logical_axes):
    target = table.get(logical) if logical is not None else None
    kept = []
    for a in () if target is None else ((target,) if isinstance(target, str) else target):
      if a in used or a not in mesh.shape:
        continue
      size = math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]
      if shape[i] % size and shape[i] >= size:
        raise InputError("config.logical_rules", name, f"dimension {i} (size {shape[i]}, "
                         f"logical '{logical}') does not split over mesh axis '{a}' "
                         f"({size} devices); change config.mesh or the rule for '{logical}'")
      if not shape[i] % size:
        kept.append(a)
    used.update(kept)
  return logical_to_spec(logical_axes, rules, mesh, shape)


def sharding_table(abstract: Any, shardings: Any) -> str:
  """One line per array: path, shape, dtype and ``PartitionSpec`` (a start-up log).

  Args:
    abstract: pytree of arrays / ``ShapeDtypeStruct``s; shardings: same structure of
      ``NamedSharding``s.
  """
  rows = [(jax.tree_util.keystr(path), str(tuple(x.shape)), str(x.dtype), str(s.spec))
          for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                  jax.tree.leaves(shardings))]
  widths = [max([len(h)] + [len(r[i]) for r in rows])
            for i, h in enumerate(("path", "shape", "dtype", "spec"))]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([fmt(("path", "shape", "dtype", "spec"))] + [fmt(r) for r in rows])


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec) or (
      isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def logical_to_sharding(logical_specs, mesh: Mesh, rules=None, shapes=None, *,
                        params: bool = False):
  """Tree of logical specs -> tree of ``NamedSharding`` on ``mesh``.

  Args:
    logical_specs: pytree whose leaves are ``PartitionSpec``s or tuples of logical names
      (e.g. ``nnx.get_partition_spec(state)`` of a model built with logical names).
    mesh: the device mesh.
    rules: rules table (default: the current one).
    shapes: optional pytree of the same structure with arrays or ``ShapeDtypeStruct``s;
      used to drop mesh axes that do not divide a dimension.
    params: the leaves are parameters: an axis that does not divide a dimension at least
      its size is an error (:func:`param_spec`), not a silent replicate (needs ``shapes``).
  """
  if shapes is None:
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(s, rules, mesh)),
                        logical_specs, is_leaf=_is_spec)
  if params:
    return jax.tree_util.tree_map_with_path(
        lambda path, s, x: NamedSharding(mesh, param_spec(
            jax.tree_util.keystr(path), s, np.shape(x), mesh, rules)),
        logical_specs, shapes, is_leaf=_is_spec)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, logical_to_spec(s, rules, mesh, np.shape(x))),
      logical_specs, shapes, is_leaf=_is_spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names inside a mesh context, else identity.

  The mesh context is ``jax.set_mesh(mesh)``; the rules are the current ones
  (:func:`use_rules`).

  Args:
    x: array with ``len(logical_axes)`` dimensions.
    logical_axes: one logical name (or None) per dimension.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if x.ndim != len(logical_axes):
    raise ValueError(f"constrain: {x.shape} vs logical axes {logical_axes}")
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, None, mesh, x.shape))
