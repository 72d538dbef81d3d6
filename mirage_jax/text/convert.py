"""Released umT5 encoder weights -> :class:`~mirage_jax.text.umt5.UMT5Encoder` params, and the
export the command line writes (``python -m mirage_jax.convert_text``).

Two layouts are read, told apart by their keys:

* Wan (``models_t5_umt5-xxl-enc-bf16.pth``, the Wan2.x release; Mirage's
  ``WanTextEncoder``): ``token_embedding.weight``, ``blocks.<i>.norm1.weight``,
  ``blocks.<i>.attn.{q,k,v,o}.weight``, ``blocks.<i>.pos_embedding.embedding.weight``,
  ``blocks.<i>.norm2.weight``, ``blocks.<i>.ffn.gate.0.weight`` (the GELU branch),
  ``blocks.<i>.ffn.fc1.weight`` (the linear branch), ``blocks.<i>.ffn.fc2.weight``,
  ``norm.weight``.
* transformers (``UMT5EncoderModel`` / ``UMT5Model`` safetensors, one file, a sharded index or
  a folder): ``shared.weight`` (or its tied copy ``encoder.embed_tokens.weight``),
  ``encoder.block.<i>.layer.0.{layer_norm,SelfAttention.{q,k,v,o,relative_attention_bias}}``,
  ``encoder.block.<i>.layer.1.{layer_norm,DenseReluDense.{wi_0,wi_1,wo}}``,
  ``encoder.final_layer_norm.weight``. A full encoder-decoder checkpoint's ``decoder.*`` and
  ``lm_head.*`` (the half we do not port) are read past.

Any other key, a key the model needs that is missing, or a shape other than the config's is
refused before anything is read, in one line naming the file and the key. torch ``Linear``
weights (out, in) become kernels (in, out); layer ``i``'s tensors become slice ``i`` of our
stacked params. Tensors are read one at a time and cast to the export's dtype as they come,
so converting the 5.7B-parameter release costs the memory of the export (11 GiB in bf16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from mirage_jax import weight_files
from mirage_jax.errors import InputError
from mirage_jax.text import umt5

NAMINGS = ("wan", "transformers")
# Keys of a full transformers UMT5 checkpoint that belong to the decoder / LM head.
_OTHER_HALF = ("decoder.", "lm_head.")
_TIED = "encoder.embed_tokens.weight"  # transformers' tied copy of shared.weight

# our block param -> (Wan name, transformers name) under blocks.<i>. / encoder.block.<i>.
_BLOCK = {
    "norm1/scale": ("norm1.weight", "layer.0.layer_norm.weight"),
    "q/kernel": ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    "k/kernel": ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    "v/kernel": ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    "o/kernel": ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    "rel_bias": ("pos_embedding.embedding.weight",
                 "layer.0.SelfAttention.relative_attention_bias.weight"),
    "norm2/scale": ("norm2.weight", "layer.1.layer_norm.weight"),
    "wi_gate/kernel": ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    "wi_lin/kernel": ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    "wo/kernel": ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
}
_TOP = {"token_embedding": ("token_embedding.weight", "shared.weight"),
        "norm/scale": ("norm.weight", "encoder.final_layer_norm.weight")}


def layout(cfg, naming: str) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Our param path -> (source keys: one per layer for the stacked block params, else one;
  whether it is a torch Linear weight, transposed)."""
  if naming not in NAMINGS:
    raise InputError("text.convert", "naming", f"unknown naming {naming!r}; known: {NAMINGS}")
  j = NAMINGS.index(naming)
  prefix = "blocks" if naming == "wan" else "encoder.block"
  out = {ours: ((names[j],), False) for ours, names in _TOP.items()}
  for ours, names in _BLOCK.items():
    keys = tuple(f"{prefix}.{i}.{names[j]}" for i in range(cfg.num_layers))
    out[f"blocks/{ours}"] = (keys, ours.endswith("kernel"))
  return out


def torch_keys(cfg, naming: str) -> set[str]:
  """The keys a released encoder file of ``cfg`` holds in ``naming`` (transformers: with
  ``shared.weight``, not its tied copy)."""
  return {k for keys, _ in layout(cfg, naming).values() for k in keys}


def _naming_of(keys: list[str], path: str) -> str:
  if any(k.startswith("encoder.") or k == "shared.weight" for k in keys):
    return "transformers"
  if any(k.startswith("blocks.") or k == "token_embedding.weight" for k in keys):
    return "wan"
  raise InputError(path, "keys", "neither a Wan umT5 encoder .pth (token_embedding, blocks.*) "
                   f"nor a transformers UMT5 file (shared, encoder.*); first keys: {keys[:3]}")


def convert_params(path: str, cfg, dtype: str = "float32") -> dict:
  """Reads a released umT5 encoder file into the pure dict of ``UMT5Encoder(cfg)``'s params.

  Args:
    path: the Wan ``.pth`` or transformers ``.safetensors`` (file, index or folder).
    cfg: :func:`umt5.model_config` the weights must fit.
    dtype: 'float32' or 'bfloat16', the params' dtype.
  Returns:
    nested dict of numpy arrays, the structure of ``nnx.state(model,
    nnx.Param).to_pure_dict()``.
  Raises:
    InputError: naming ``path`` and the key: a missing key, an unexpected one, a wrong shape.
  """
  umt5.check_config(cfg)
  if dtype not in ("float32", "bfloat16"):
    raise InputError("--dtype", "dtype", f"must be float32 or bfloat16, got {dtype!r}")
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  ours = umt5.param_shapes(cfg)
  wf = weight_files.open_weights(path)
  keys = list(wf.keys())
  naming = _naming_of(keys, path)
  table = layout(cfg, naming)
  assert set(table) == set(ours), "converter table out of date"
  present = set(keys)
  alias = {}
  if naming == "transformers" and "shared.weight" not in present and _TIED in present:
    alias["shared.weight"] = _TIED
  hint = f"(the {cfg.variant} config expects other weights: wrong --variant?)"
  needed = torch_keys(cfg, naming)
  skip = {_TIED} if naming == "transformers" else set()
  for key in keys:
    if key in needed or key in skip or (naming == "transformers" and key.startswith(_OTHER_HALF)):
      continue
    raise InputError(wf.file_of(key), key, f"unexpected key: not a weight of the umT5 encoder "
                     f"{hint}")
  for dst, (sources, linear) in sorted(table.items()):
    shape = ours[dst][1:] if dst.startswith("blocks/") else ours[dst]
    want = tuple(shape[::-1]) if linear else tuple(shape)
    for key in sources:
      key = alias.get(key, key)
      if key not in present:
        raise InputError(path, key, f"missing from the file {hint}")
      if tuple(wf.shape(key)) != want:
        raise InputError(wf.file_of(key), key, f"shape {tuple(wf.shape(key))}, the "
                         f"{cfg.variant} encoder needs {want} {hint}")
  flat: dict[str, np.ndarray] = {}
  for dst, (sources, linear) in table.items():
    # Filled slice by slice: one source tensor in memory beside the export, never a list.
    out = np.empty(ours[dst], target)
    for i, key in enumerate(sources):
      x = np.asarray(wf.read(alias.get(key, key))).astype(target, copy=False)
      if dst.startswith("blocks/"):
        out[i] = x.T if linear else x
      else:
        out[...] = x.T if linear else x
      del x
    flat[dst] = out
  wf.close()
  return _nest(flat)


def _nest(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def write_export(output: str, params: dict, cfg, *, source: str, dtype: str) -> None:
  """Writes ``params`` (pure dict, already in ``dtype``) and ``{'text_encoder': cfg}`` as an
  export that :func:`umt5.load_export` reads (all or nothing)."""
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top  # orbax: writing only
  checkpoint.write_export(output, params, {"text_encoder": cfg.to_dict()}, source=source,
                          dtype=dtype)
