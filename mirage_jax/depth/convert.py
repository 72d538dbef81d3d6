"""Released Depth Anything V2 weights -> :class:`~mirage_jax.depth.depth_anything.DepthAnythingV2`
params, and the export the command line writes (``python -m mirage_jax.convert_depth``).

Two layouts are read, told apart by their keys:

* transformers (``depth-anything/Depth-Anything-V2-*-hf``, ``model.safetensors``):
  ``backbone.embeddings.*``, ``backbone.encoder.layer.<i>.*``, ``backbone.layernorm.*``,
  ``neck.reassemble_stage.*``, ``neck.convs.*``, ``neck.fusion_stage.*``, ``head.conv<j>.*``.
  Attention is named as in the released files (``attention.attention.query``,
  ``attention.output.dense``) or as transformers >= 5 names it in memory (``attention.q_proj``,
  ``attention.o_proj``); both are accepted.
* the original repository (``depth_anything_v2_vit{s,b,l}.pth``, and the metric ones):
  ``pretrained.*`` (DINOv2: ``blocks.<i>.attn.qkv`` fused q/k/v, ``ls1.gamma``, ...) and
  ``depth_head.*`` (``projects``, ``resize_layers``, ``scratch.layer<k>_rn``,
  ``scratch.refinenet<k>``, ``scratch.output_conv1``, ``scratch.output_conv2.{0,2}``).

The DINOv2 ``mask_token`` (masked-image pretraining only, never used for depth) is read past.
Any other key the model has no place for, a key the model needs that is missing, or a shape
other than the config's is refused before anything is written, in one line naming the file
and the key.

Layouts: torch ``Linear`` (out, in) -> kernel (in, out); ``Conv2d`` (out, in, kh, kw) ->
(kh, kw, in, out); ``ConvTranspose2d`` (in, out, kh, kw) -> spatially flipped (kh, kw, in,
out), since ``nnx.ConvTranspose`` (``transpose_kernel=False``) correlates where torch's
transposed convolution convolves.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from mirage_jax import weight_files
from mirage_jax.depth import depth_anything as da
from mirage_jax.errors import InputError

IGNORED = ("backbone.embeddings.mask_token", "pretrained.mask_token")



def _linear(w: np.ndarray) -> np.ndarray:
  return w.T


def _conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)


def _conv_transpose(w: np.ndarray) -> np.ndarray:
  return w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def layout(cfg) -> dict[str, tuple[str, Callable, str]]:
  """transformers key -> (our param path, transform, torch layout kind)."""
  t: dict[str, tuple[str, Callable, str]] = {}

  def linear(src, dst):
    t[f"{src}.weight"] = (f"{dst}/kernel", _linear, "linear")
    t[f"{src}.bias"] = (f"{dst}/bias", _same, "vector")

  def conv(src, dst, bias=True, kind="conv"):
    t[f"{src}.weight"] = (f"{dst}/kernel", _conv_transpose if kind == "convT" else _conv, kind)
    if bias:
      t[f"{src}.bias"] = (f"{dst}/bias", _same, "vector")

  def norm(src, dst):
    t[f"{src}.weight"] = (f"{dst}/scale", _same, "vector")
    t[f"{src}.bias"] = (f"{dst}/bias", _same, "vector")

  t["backbone.embeddings.cls_token"] = ("cls_token", _same, "same")
  t["backbone.embeddings.position_embeddings"] = ("pos_embed", _same, "same")
  conv("backbone.embeddings.patch_embeddings.projection", "patch_embed")
  for i in range(cfg.num_layers):
    s, d = f"backbone.encoder.layer.{i}", f"blocks/{i}"
    norm(f"{s}.norm1", f"{d}/norm1")
    norm(f"{s}.norm2", f"{d}/norm2")
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"),
                         ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      linear(f"{s}.{'attention.' if ours in 'qkvo' else ''}{theirs}", f"{d}/{ours}")
    t[f"{s}.layer_scale1.lambda1"] = (f"{d}/ls1", _same, "vector")
    t[f"{s}.layer_scale2.lambda1"] = (f"{d}/ls2", _same, "vector")
  norm("backbone.layernorm", "norm")
  for i in range(4):
    conv(f"neck.reassemble_stage.layers.{i}.projection", f"projects/{i}")
    conv(f"neck.convs.{i}", f"level_convs/{i}", bias=False)
    f = f"neck.fusion_stage.layers.{i}"
    conv(f"{f}.projection", f"fusions/{i}/out")
    for r in (1, 2):
      for c in (1, 2):
        conv(f"{f}.residual_layer{r}.convolution{c}", f"fusions/{i}/res{r}/conv{c}")
  conv("neck.reassemble_stage.layers.0.resize", "upsample4", kind="convT")
  conv("neck.reassemble_stage.layers.1.resize", "upsample2", kind="convT")
  conv("neck.reassemble_stage.layers.3.resize", "downsample2")
  for j in (1, 2, 3):
    conv(f"head.conv{j}", f"head{j}")
  return t


# transformers' names in the released safetensors (before transformers 5 renamed them).
_HF_RELEASED = ((".attention.attention.query.", ".attention.q_proj."),
                (".attention.attention.key.", ".attention.k_proj."),
                (".attention.attention.value.", ".attention.v_proj."),
                (".attention.output.dense.", ".attention.o_proj."))


def _hf_name(key: str) -> str:
  for old, new in _HF_RELEASED:
    key = key.replace(old, new)
  return key


def _original_name(key: str) -> str | None:
  """An original-repository key -> the transformers name (None for the fused qkv)."""
  parts = key.split(".")
  if parts[0] == "pretrained":
    rest = ".".join(parts[1:])
    simple = {"cls_token": "backbone.embeddings.cls_token",
              "pos_embed": "backbone.embeddings.position_embeddings",
              "mask_token": "backbone.embeddings.mask_token",
              "patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
              "norm.weight": "backbone.layernorm.weight", "norm.bias": "backbone.layernorm.bias"}
    if rest in simple:
      return simple[rest]
    if parts[1] == "blocks" and len(parts) >= 5:
      i, sub = parts[2], ".".join(parts[3:])
      block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
      stem, leaf = sub.rsplit(".", 1)
      if stem in block:
        return f"backbone.encoder.layer.{i}.{block[stem]}.{leaf}"
      if sub in ("ls1.gamma", "ls2.gamma"):
        return f"backbone.encoder.layer.{i}.layer_scale{sub[2]}.lambda1"
    return key
  if parts[0] == "depth_head":
    leaf = parts[-1]
    stem = ".".join(parts[1:-1])
    for k in range(4):
      if stem == f"projects.{k}":
        return f"neck.reassemble_stage.layers.{k}.projection.{leaf}"
      if stem == f"resize_layers.{k}":
        return f"neck.reassemble_stage.layers.{k}.resize.{leaf}"
      if stem == f"scratch.layer{k + 1}_rn":
        return f"neck.convs.{k}.{leaf}"
      # refinenet4 takes the coarsest level: transformers' (and our) fusion 0.
      ref = f"scratch.refinenet{4 - k}"
      if stem == f"{ref}.out_conv":
        return f"neck.fusion_stage.layers.{k}.projection.{leaf}"
      for r in (1, 2):
        for c in (1, 2):
          if stem == f"{ref}.resConfUnit{r}.conv{c}":
            return f"neck.fusion_stage.layers.{k}.residual_layer{r}.convolution{c}.{leaf}"
    heads = {"scratch.output_conv1": "head.conv1", "scratch.output_conv2.0": "head.conv2",
             "scratch.output_conv2.2": "head.conv3"}
    if stem in heads:
      return f"{heads[stem]}.{leaf}"
  return key


def torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The torch tensor's shape that gives our param of shape ``ours``."""
  if kind == "linear":
    return ours[::-1]
  if kind == "conv":
    return (ours[3], ours[2], ours[0], ours[1])
  if kind == "convT":
    return (ours[2], ours[3], ours[0], ours[1])
  return tuple(ours)


def _layout_of(keys: list[str], path: str) -> str:
  if any(k.startswith("pretrained.") for k in keys):
    return "original"
  if any(k.startswith("backbone.") for k in keys):
    return "transformers"
  raise InputError(path, "keys", "neither a transformers Depth Anything file (backbone.*) nor "
                   f"an original Depth-Anything-V2 .pth (pretrained.*); first keys: {keys[:3]}")


def convert_params(path: str, cfg) -> dict:
  """Reads a released weight file into the pure dict of ``DepthAnythingV2(cfg)``'s params.

  Args:
    path: ``.safetensors`` (transformers layout) or ``.pth`` (either layout).
    cfg: the model config (:func:`depth_anything.model_config`) the weights must fit.
  Returns:
    nested dict of float32 numpy arrays, the structure of ``nnx.state(model,
    nnx.Param).to_pure_dict()``.
  Raises:
    InputError: naming ``path`` and the key: a missing key, an unexpected one, a wrong shape.
  """
  da.check_config(cfg)
  ours = da.param_shapes(cfg)
  table = layout(cfg)
  assert set(d for d, _, _ in table.values()) == set(ours), "converter table out of date"
  wf = weight_files.open_weights(path)
  keys = list(wf.keys())
  naming = _layout_of(keys, path)
  hint = f"(a {cfg.variant}/{cfg.kind} model expects other weights: wrong --variant?)"
  # source key -> [(our path, transform)], and the source shape we need.
  plan: dict[str, list[tuple[str, Callable]]] = {}
  want: dict[str, tuple[int, ...]] = {}
  for key in keys:
    if key in IGNORED:
      continue
    if naming == "original" and key.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
      parts = key.split(".")
      i, leaf = parts[2], parts[-1]
      d = cfg.hidden_size
      plan[key] = [(f"blocks/{i}/{n}/{'kernel' if leaf == 'weight' else 'bias'}",
                    lambda w, j=j: _linear(w[j * d:(j + 1) * d]) if w.ndim == 2
                    else w[j * d:(j + 1) * d])
                   for j, n in enumerate("qkv")]
      if any(p not in ours for p, _ in plan[key]):
        raise InputError(path, key, f"not a weight of the model {hint}")
      want[key] = (3 * d, d) if leaf == "weight" else (3 * d,)
      continue
    name = _hf_name(key) if naming == "transformers" else _original_name(key)
    if name not in table:
      raise InputError(path, key, f"unexpected key: not a weight of the model {hint}")
    dst, fn, kind = table[name]
    plan[key] = [(dst, fn)]
    want[key] = torch_shape(kind, ours[dst])
  covered = {p for targets in plan.values() for p, _ in targets}
  if covered != set(ours):
    present = set(keys)
    for source in sorted(torch_keys(cfg, naming)):
      if source not in present and source not in IGNORED and not (
          naming == "transformers" and any(_hf_name(k) == source for k in present)):
        raise InputError(path, source, f"missing from the file {hint}")
    raise AssertionError(f"converter: {sorted(set(ours) - covered)[:3]} not covered")
  for key, shape in want.items():
    if tuple(wf.shape(key)) != shape:
      raise InputError(path, key, f"shape {tuple(wf.shape(key))}, the {cfg.variant} "
                       f"{cfg.kind} model needs {shape} {hint}")
  flat = {}
  for key, targets in plan.items():
    source = np.asarray(wf.read(key), np.float32)
    for dst, fn in targets:
      flat[dst] = np.ascontiguousarray(fn(source))
  return _nest(flat)


def _nest(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = value
  return out


def torch_keys(cfg, naming: str = "transformers") -> set[str]:
  """The keys a released file of ``cfg`` holds (mask_token included; transformers >= 5
  attention names)."""
  if naming == "transformers":
    return set(layout(cfg)) | {"backbone.embeddings.mask_token"}
  if naming != "original":
    raise InputError("torch_keys", "naming", f"unknown naming {naming!r}")
  wb = lambda stem: {f"{stem}.weight", f"{stem}.bias"}
  keys = {"pretrained.cls_token", "pretrained.pos_embed", "pretrained.mask_token"}
  keys |= wb("pretrained.patch_embed.proj") | wb("pretrained.norm")
  for i in range(cfg.num_layers):
    b = f"pretrained.blocks.{i}"
    for stem in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
      keys |= wb(f"{b}.{stem}")
    keys |= {f"{b}.ls1.gamma", f"{b}.ls2.gamma"}
  h = "depth_head"
  for k in range(4):
    keys |= wb(f"{h}.projects.{k}") | {f"{h}.scratch.layer{k + 1}_rn.weight"}
    r = f"{h}.scratch.refinenet{k + 1}"
    keys |= wb(f"{r}.out_conv")
    for u in (1, 2):
      for c in (1, 2):
        keys |= wb(f"{r}.resConfUnit{u}.conv{c}")
  for k in (0, 1, 3):
    keys |= wb(f"{h}.resize_layers.{k}")
  keys |= wb(f"{h}.scratch.output_conv1") | wb(f"{h}.scratch.output_conv2.0")
  keys |= wb(f"{h}.scratch.output_conv2.2")
  return keys


def write_export(output: str, params: dict, cfg, *, source: str, dtype: str | None = None
                 ) -> None:
  """Writes ``params`` (pure dict) and ``{'depth_model': cfg}`` as an export that
  :func:`depth_anything.load_export` (and ``checkpoint.load_export``) read
  (:func:`checkpoint.write_export`: all or nothing)."""
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top  # orbax: writing only

  if os.path.exists(output):
    raise InputError("--output", "output", f"{output} already exists")
  if dtype is not None:
    params = _map(params, lambda x: x.astype(dtype))
  checkpoint.write_export(output, params, {"depth_model": cfg.to_dict()}, source=source,
                          dtype=dtype)


def _map(tree: dict, fn: Callable) -> dict:
  return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}
