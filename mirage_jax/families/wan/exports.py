"""Wan-family exports: reading an export's config, following a fine-tune's chain of exports
to its converted base, and loading the DiT's params from that chain (local or gs://)."""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import traverse_util

from mirage_jax import families, paths
from mirage_jax.errors import InputError
from mirage_jax.nn.params import flat_paths


def read_export_config(path: str):
  """The training config stored with a base export (``mirage_jax.export`` / ``convert_wan``),
  local or ``gs://`` (``checkpoint.export_config``)."""
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if not path or not paths.isdir(path):
    raise InputError(path or "<empty>", "base_checkpoint", "no such export directory")
  return checkpoint.export_config(path)


# Fields that must agree between a base export and the model trained on it.
_SAME_MODEL = ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "in_channels",
               "out_channels", "freq_dim", "patch_size")


def export_chain(path: str, model_cfg) -> list[tuple[str, Any]]:
  """[(export path, its config)] from the root base to ``path``: a fine-tune export points
  at the export it was trained on through ``denoiser.base_checkpoint``.

  Raises:
    InputError: naming the export's config.json and the field: not a Wan DiT export, another
      model (a different size), a cycle.
  """
  import os  # pylint: disable=g-import-not-at-top
  chain, seen = [], set()
  while path:
    real = paths.resolve(path) if paths.is_remote(path) else os.path.realpath(path)
    if real in seen:
      raise InputError(path, "denoiser.base_checkpoint", "the exports point at each other")
    seen.add(real)
    cfg = read_export_config(path)
    where = paths.join(path, "config.json")
    model = cfg.get("denoiser", {}).get("model", {}) if cfg.get("denoiser") else {}
    family = families.family_name(cfg) if cfg.get("stage") == "denoiser" else None
    if family != "wan":
      raise InputError(where, "family", f"not a Wan DiT export (stage {cfg.get('stage')!r}, "
                       f"family {family!r})")
    for field in _SAME_MODEL:
      a, b = model.get(field), model_cfg.get(field)
      if (tuple(a) if isinstance(a, (list, tuple)) else a) != (
          tuple(b) if isinstance(b, (list, tuple)) else b):
        raise InputError(where, f"denoiser.model.{field}", f"{a!r} in the export, {b!r} in "
                         "the config: an export of another model")
    chain.append((path, cfg))
    path = cfg.denoiser.get("base_checkpoint", "")
  return chain[::-1]


def nest(flat: dict[tuple[str, ...], Any]) -> dict:
  """{path tuple: leaf} -> nested dict (the inverse of :func:`flat_paths`)."""
  return traverse_util.unflatten_dict(flat)


def load_dit_params(path: str, model_cfg, abstract: dict[tuple[str, ...], Any]
                    ) -> dict[tuple[str, ...], jax.Array]:
  """Params of a Wan DiT export and the exports it builds on, later ones overriding.

  Args:
    path: a ``convert_wan`` DiT export or a fine-tune export of one.
    model_cfg: the WanDiT config they must fit.
    abstract: {param path: ShapeDtypeStruct with sharding} of the model; each stored param is
      restored straight into that sharding (no host copy of the whole model) and cast to
      its dtype.
  Returns:
    {param path: array} of every param found (a subset of ``abstract``).
  Raises:
    InputError: naming the export and the param: one the model lacks, another shape.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mirage_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  out: dict = {}
  for export, _ in export_chain(path, model_cfg):
    params_dir = paths.resolve(paths.join(export, "params"))
    try:
      with ocp.PyTreeCheckpointer() as ckptr:
        stored = flat_paths(ckpt_lib._tree(ckptr.metadata(params_dir).item_metadata))  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(export, "params", f"unreadable ({type(e).__name__}: {e})") from e
    shardings = {}
    for p, m in stored.items():
      name = "/".join(p)
      if p not in abstract:
        raise InputError(export, name, "a param the configured model does not have (an "
                         "export of another model?)")
      if tuple(m.shape) != tuple(abstract[p].shape):
        raise InputError(export, name, f"shape {tuple(m.shape)}, the model's is "
                         f"{tuple(abstract[p].shape)}")
      shardings[p] = abstract[p].sharding
    params, _, _ = ckpt_lib.load_export(export, nest(shardings))
    for p, v in flat_paths(params).items():
      out[p] = v.astype(abstract[p].dtype) if v.dtype != abstract[p].dtype else v
  return out


def load_dit(path: str, shardings_fn=None):
  """The whole WanDiT of an export: a ``convert_wan`` DiT export, or a fine-tune export
  (``python -m mirage_jax.export`` of a Wan run: only its trained VACE/LoRA params, plus
  ``denoiser.base_checkpoint`` naming the export it was trained on, followed to the root).

  Args:
    path: the export folder.
    shardings_fn: optional ``abstract nnx.State -> NamedSharding pytree`` (same structure as
      ``State.to_pure_dict()``) to restore each param into; default one local device.
  Returns:
    (WanDiT with every param loaded, the export's config).
  Raises:
    InputError: not a Wan DiT export, another model, or a param found in none of the chain.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  config = read_export_config(path)
  export_chain(path, config.get("denoiser", {}).get("model", {}))  # checks family first
  model_cfg = config.denoiser.model
  graphdef, state = nnx.split(nnx.eval_shape(lambda: wan_dit.WanDiT(model_cfg,
                                                                    rngs=nnx.Rngs(0))))
  pure = state.to_pure_dict()
  if shardings_fn is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, pure)
  else:
    shardings = shardings_fn(state)
  flat_a, flat_s = flat_paths(pure), flat_paths(shardings)
  abstract = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_s[p])
              for p, a in flat_a.items()}
  loaded = load_dit_params(path, model_cfg, abstract)
  missing = sorted(set(abstract) - set(loaded))
  if missing:
    raise InputError(path, "/".join(missing[0]), f"found in none of the exports it builds on "
                     f"({len(missing)} params missing)")
  nnx.replace_by_pure_dict(state, nest(loaded))
  return nnx.merge(graphdef, state), config
