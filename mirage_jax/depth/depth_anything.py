"""PLACEHOLDER of Depth Anything V2 (to be replaced by the full port at merge).

This file exists only so that the depth training stage (``mirage_jax.depth.stage``) can be
written and tested before the full port lands. It follows the agreed interface of
``mirage_jax/depth/depth_anything.py`` exactly (``model_config``, ``DepthAnythingV2``,
``estimate``, ``load_export``) but its network is a small ViT (patches of 14, pre-LN blocks)
with a simplified DPT-like head (per-level projections summed on the patch grid, then
convolutions and upsampling to the input size); it is NOT the released architecture, has no
converter and no parity with transformers. The full port replaces this whole file; nothing
else in the project may depend on anything here beyond the agreed interface.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mirage_jax import checkpoint as ckpt_lib
from mirage_jax.errors import InputError
from mirage_jax.nn import attention as attention_lib
from mirage_jax.nn import layers

VARIANTS = {  # (hidden, layers, heads, out_indices, neck sizes, fusion size)
    "tiny": (64, 4, 2, (0, 1, 2, 3), (16, 32, 64, 64), 32),
    "small": (384, 12, 6, (2, 5, 8, 11), (48, 96, 192, 384), 64),
    "base": (768, 12, 12, (2, 5, 8, 11), (96, 192, 384, 768), 128),
    "large": (1024, 24, 16, (4, 11, 17, 23), (256, 512, 1024, 1024), 256),
}
KINDS = ("relative", "metric")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_config(variant: str = "small", kind: str = "relative",
                 **overrides) -> ml_collections.ConfigDict:
  """The config of ``variant`` and ``kind`` (see the agreed interface); unknown names or
  override fields are an InputError."""
  if variant not in VARIANTS:
    raise InputError("depth_model", "variant", f"expected one of {tuple(VARIANTS)}, got "
                     f"{variant!r}")
  if kind not in KINDS:
    raise InputError("depth_model", "kind", f"expected one of {KINDS}, got {kind!r}")
  hidden, n, heads, out_idx, neck, fusion = VARIANTS[variant]
  cfg = ml_collections.ConfigDict(dict(
      variant=variant, kind=kind, patch_size=14, hidden_size=hidden, num_layers=n,
      num_heads=heads, mlp_ratio=4, out_indices=out_idx, neck_hidden_sizes=neck,
      fusion_hidden_size=fusion, head_hidden_size=32, layer_norm_eps=1e-6,
      max_depth=20.0 if kind == "metric" else 1.0, input_size=518))
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise InputError("depth_model", unknown[0], f"unknown field (known: {', '.join(sorted(cfg))})")
  cfg.update(overrides)
  return cfg


class _Block(nnx.Module):
  """Pre-LN ViT block: x + attn(LN x), then x + MLP(LN x)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv = layers.Dense(d, 3 * d, ("embed", "mlp"), **kw)
    self.proj = layers.Dense(d, d, ("mlp", "embed"), **kw)
    self.fc1 = layers.Dense(d, d * cfg.mlp_ratio, ("embed", "mlp"), **kw)
    self.fc2 = layers.Dense(d * cfg.mlp_ratio, d, ("mlp", "embed"), **kw)
    self.heads, self.eps = cfg.num_heads, cfg.layer_norm_eps

  def __call__(self, x):
    """x: (N, L, D) -> (N, L, D)."""
    n, l, d = x.shape
    q, k, v = jnp.split(self.qkv(layers.layer_norm(x, self.eps)), 3, axis=-1)
    split = lambda t: t.reshape(n, l, self.heads, d // self.heads)
    a = attention_lib.attention(split(q), split(k), split(v), impl="xla").reshape(n, l, d)
    x = x + self.proj(a)
    return x + self.fc2(jax.nn.gelu(self.fc1(layers.layer_norm(x, self.eps))))


class DepthAnythingV2(nnx.Module):
  """PLACEHOLDER network (module docstring): pixel_values -> depth, the agreed interface."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch = layers.Dense(p * p * 3, d, ("patch_in", "embed"), **kw)
    grid = cfg.input_size // p
    self.pos = layers.param(rngs, nnx.initializers.normal(0.02), (grid, grid, d),
                            (None, None, "embed"), param_dtype)
    self.blocks = nnx.List([_Block(cfg, **kw) for _ in range(cfg.num_layers)])
    f = cfg.fusion_hidden_size
    self.necks = nnx.List([layers.Dense(d, c, ("embed", "mlp"), **kw)
                           for c in cfg.neck_hidden_sizes])
    self.fuse = nnx.List([layers.Dense(c, f, ("mlp", "embed"), **kw)
                          for c in cfg.neck_hidden_sizes])
    self.conv1 = layers.Conv(f, f, 3, **kw)
    self.conv2 = layers.Conv(f, cfg.head_hidden_size, 3, **kw)
    self.out = layers.Conv(cfg.head_hidden_size, 1, 1, **kw)
    self.dtype = dtype

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values (N, h', w', 3) ImageNet-normalised, h', w' multiples of 14 ->
    (N, h', w') float32: metres (metric) or relative inverse depth >= 0 (relative)."""
    cfg = self.cfg
    n, h, w, _ = pixel_values.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise InputError("DepthAnythingV2", "pixel_values", f"height and width must be "
                       f"multiples of {p}, got {(h, w)}")
    gh, gw = h // p, w // p
    x = pixel_values.reshape(n, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch(x.reshape(n, gh, gw, p * p * 3))
    pos = self.pos[...]
    if pos.shape[:2] != (gh, gw):
      pos = jax.image.resize(pos, (gh, gw, pos.shape[-1]), "cubic")
    x = (x + pos.astype(x.dtype)).reshape(n, gh * gw, -1)
    feats = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if i in tuple(cfg.out_indices):
        feats.append(layers.layer_norm(x, cfg.layer_norm_eps))
    y = sum(fuse(jax.nn.gelu(neck(f))) for f, neck, fuse in zip(feats, self.necks, self.fuse))
    y = y.reshape(n, gh, gw, -1)
    y = jax.nn.relu(self.conv1(jax.image.resize(y, (n, 2 * gh, 2 * gw, y.shape[-1]), "linear")))
    y = jax.image.resize(y, (n, h, w, y.shape[-1]), "linear")
    y = self.out(jax.nn.relu(self.conv2(y)))[..., 0].astype(jnp.float32)
    if cfg.kind == "metric":
      return jax.nn.sigmoid(y) * cfg.max_depth
    return jax.nn.relu(y)


def input_shape(cfg, height: int, width: int) -> tuple[int, int]:
  """The released resize rule: the shorter side to ``cfg.input_size``, aspect kept, both
  sides multiples of the patch size (rounded, never below input_size)."""
  scale = cfg.input_size / min(height, width)
  p = cfg.patch_size
  side = lambda s: max(int(round(s * scale / p)) * p, int(math.ceil(cfg.input_size / p)) * p)
  return side(height), side(width)


def estimate(model: DepthAnythingV2, images: jax.Array, *, input_hw=None) -> jax.Array:
  """images (N, H, W, 3) in [-1, 1] -> depth (N, H, W) float32 (resize, normalise, run,
  resize back; jittable)."""
  n, h, w, _ = images.shape
  ih, iw = input_hw if input_hw is not None else input_shape(model.cfg, h, w)
  rgb = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
  rgb = jax.image.resize(rgb, (n, ih, iw, 3), "cubic")
  x = (rgb - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return jax.image.resize(model(x), (n, h, w), "linear")


def load_export(path: str) -> tuple[DepthAnythingV2, ml_collections.ConfigDict]:
  """(model, its config ``depth_model``) of an export written by checkpoint.export_params."""
  params, config, _ = ckpt_lib.load_export(path, dtype=jnp.float32)
  if "depth_model" not in config:
    raise InputError(path, "depth_model", "not a Depth Anything export (no depth_model config)")
  cfg = model_config(config.depth_model.variant, config.depth_model.kind,
                     **{k: v for k, v in config.depth_model.items()
                        if k not in ("variant", "kind")})
  abstract = nnx.eval_shape(lambda: DepthAnythingV2(cfg, rngs=nnx.Rngs(0)))
  graphdef, want = nnx.split(abstract, nnx.Param)
  want = want.to_pure_dict()
  # Orbax writes the list indices of nnx.List as strings; the model's state has ints.
  relabel = lambda t: ({(int(k) if isinstance(k, str) and k.isdigit() else k): relabel(v)
                        for k, v in t.items()} if isinstance(t, dict) else t)
  params = relabel(params)
  got_shapes = jax.tree.map(lambda a: tuple(a.shape), params)
  want_shapes = jax.tree.map(lambda a: tuple(a.shape), want)
  if got_shapes != want_shapes:
    raise InputError(path, "params", f"do not match depth_model variant {cfg.variant!r} "
                     "(different names or shapes)")
  return nnx.merge(graphdef, nnx.State(params)), cfg
