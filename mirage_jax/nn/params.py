"""A module's parameters as flat named arrays: counting them, their shapes, and restoring a
saved pure dict into an abstract module with every name and shape checked first."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from flax import nnx

from mirage_jax.errors import InputError


def flat(tree: Any) -> dict[str, Any]:
  """'blocks/0/q/kernel' -> leaf, for every leaf of a nested dict / pytree."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def flat_paths(tree: Any) -> dict[tuple[str, ...], Any]:
  """{('blocks', '0', 'q', 'kernel'): leaf} for a nested mapping (dicts, ``nnx.State``,
  orbax metadata trees); a mapping whose keys are all tuples is already flat and is copied.
  Leaves are whatever is not a mapping (arrays, ``nnx.Variable``, weight-file tensors)."""
  if isinstance(tree, nnx.State):
    return {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(tree)}
  if isinstance(tree, Mapping) and tree and all(isinstance(k, tuple) for k in tree):
    return dict(tree)
  out = {}

  def walk(prefix, node):
    if isinstance(node, Mapping) or hasattr(node, "items"):
      for k, v in node.items():
        walk(prefix + (str(k),), v)
    else:
      out[prefix] = node
  walk((), tree)
  return out


def shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of every ``nnx.Param`` of ``model`` (works on an abstract model)."""
  return {k: tuple(v.shape) for k, v in flat(nnx.state(model, nnx.Param).to_pure_dict()).items()}


def count(model: nnx.Module) -> int:
  """Parameter count (works on an abstract model)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def restore(model: nnx.Module, params: Any, where: str, hint: str) -> nnx.Module:
  """``model`` (abstract) with the saved pure dict ``params`` as its ``nnx.Param`` state.

  Raises:
    InputError naming ``where`` and ``params/<name>`` (``hint`` appended) for a name missing
    from ``params``, a name the model does not have, or a shape the model does not build.
  """
  state = nnx.state(model, nnx.Param)
  want, have = flat(state.to_pure_dict()), flat(params)
  for key in sorted(want.keys() - have.keys()):
    raise InputError(where, f"params/{key}", f"missing from the export {hint}")
  for key in sorted(have.keys() - want.keys()):
    raise InputError(where, f"params/{key}", f"not a parameter of the model {hint}")
  for key in sorted(want):
    if tuple(have[key].shape) != tuple(want[key].shape):
      raise InputError(where, f"params/{key}", f"saved shape {tuple(have[key].shape)}, the "
                       f"config builds {tuple(want[key].shape)} {hint}")
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model
