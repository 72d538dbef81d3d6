"""Depth Anything V2 (DINOv2 ViT encoder + DPT decoder) in Flax NNX, with its released
pre- and post-processing.

A port of the released networks (github.com/DepthAnything/Depth-Anything-V2, and
transformers' ``DepthAnythingForDepthEstimation``, which is our numerical oracle) with the
same math, so the released weights load through :mod:`mirage_jax.depth.convert`.

Network, all tensors NHWC::

  tokens = [cls, PatchEmbed14(x)] + PosEmbed (bicubic-resized to the patch grid)
  for each of the L blocks:               # DINOv2 block, pre-norm, LayerScale
    tokens += ls1 * Attn(LN1(tokens));  tokens += ls2 * MLP(LN2(tokens))    # MLP: GELU (erf)
  features[i] = LN(tokens after block out_indices[i]) without the cls token ("ignore" readout)
  reassemble: 1x1 projection to neck_hidden_sizes[i], then x4 / x2 transposed conv, identity,
              stride-2 3x3 conv (factors 4, 2, 1, 1/2 of the patch grid)
  3x3 conv (no bias) of each to fusion_hidden_size; fusion from the coarsest:
    f = RCU2(f + RCU1(level)) -> bilinear (align_corners) to the next level's size (x2 for the
    last) -> 1x1 conv            # RCU: x + conv(relu(conv(relu(x))))
  head: 3x3 conv (F -> F/2), bilinear (align_corners) to 14 * grid, 3x3 conv (-> 32), ReLU,
        1x1 conv (-> 1), ReLU (relative) or sigmoid * max_depth (metric)

Outputs. The relative kind predicts relative inverse depth (disparity, affine-invariant, >= 0);
the metric kind predicts metres in (0, max_depth) (20 for the indoor release, 80 outdoor).

Resampling. Three different interpolations appear in the released pipeline, each done here so
it gives the oracle's numbers:

* position embeddings and the final resize back to the frame (``post_process_depth_estimation``)
  use torch's bicubic (Keys a = -0.75, half-pixel centres, edge-clamped taps, no antialias);
  jax.image.resize's cubic is Keys a = -0.5 and antialiases when shrinking, so these use
  explicit interpolation matrices (:func:`_bicubic_matrix`, numpy at trace time: static shapes);
* the decoder's upsamplings are bilinear with ``align_corners=True``, which jax.image.resize has
  no mode for: matrices again (:func:`_bilinear_align_corners_matrix`);
* the input resize is torchvision's antialiased bicubic (PIL's filter: Keys a = -0.5, support
  widened by the scale when shrinking, weights renormalised at the borders), which is what
  ``jax.image.resize(method='cubic', antialias=True)`` computes. Differences left: the
  processor resizes uint8 pixels (rounded, clamped to [0, 255]), we resize floats and clamp to
  [0, 1]; measured in tests/test_depth_anything.py (max abs error of the normalised input).

The position-embedding resize follows transformers (to the grid's size); the original repo
resizes by a scale factor ``(grid + 0.1) / 37``, which differs slightly for grids other
than 37 x 37 (518 x 518 inputs, where both skip the resize).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mirage_jax.errors import InputError
from mirage_jax.nn import attention as attention_lib
from mirage_jax.nn import params as params_lib

VARIANTS = ("tiny", "small", "base", "large")
KINDS = ("relative", "metric")
PATCH_SIZE = 14
# ImageNet statistics (the released image processor's image_mean / image_std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Each of the 4 reassembled levels is the patch grid resized by this factor.
REASSEMBLE_FACTORS = (4, 2, 1, 0.5)

_SIZES = {
    # hidden, layers, heads, out_indices, neck_hidden_sizes, fusion_hidden_size, input_size
    "tiny": (64, 4, 2, (0, 1, 2, 3), (16, 32, 64, 64), 32, 70),
    "small": (384, 12, 6, (2, 5, 8, 11), (48, 96, 192, 384), 64, 518),
    "base": (768, 12, 12, (2, 5, 8, 11), (96, 192, 384, 768), 128, 518),
    "large": (1024, 24, 16, (4, 11, 17, 23), (256, 512, 1024, 1024), 256, 518),
}


def model_config(variant: str = "small", kind: str = "relative", **overrides
                 ) -> ml_collections.ConfigDict:
  """The config of a released size (or ``tiny``, CPU-sized) and kind.

  Fields: variant, kind, patch_size (14), hidden_size, num_layers, num_heads, mlp_ratio,
  layer_norm_eps, out_indices, neck_hidden_sizes, fusion_hidden_size, head_hidden_size,
  max_depth (metric: 20 indoor / 80 outdoor; relative: 1, unused), input_size (the shorter
  side's target of the released preprocessing, a multiple of 14), pos_grid (side of the
  position-embedding grid: 37 for the released 518 x 518 pretraining), attention
  (``mirage_jax.nn.attention`` implementation).
  """
  if variant not in VARIANTS:
    raise InputError("depth_model", "variant", f"unknown variant {variant!r}; known: {VARIANTS}")
  if kind not in KINDS:
    raise InputError("depth_model", "kind", f"unknown kind {kind!r}; known: {KINDS}")
  hidden, layers, heads, out_indices, neck, fusion, input_size = _SIZES[variant]
  cfg = ml_collections.ConfigDict(dict(
      variant=variant, kind=kind, patch_size=PATCH_SIZE, hidden_size=hidden, num_layers=layers,
      num_heads=heads, mlp_ratio=4, layer_norm_eps=1e-6, out_indices=list(out_indices),
      neck_hidden_sizes=list(neck), fusion_hidden_size=fusion, head_hidden_size=32,
      max_depth=20.0 if kind == "metric" else 1.0, input_size=input_size,
      pos_grid=input_size // PATCH_SIZE, attention="auto"))
  for key, value in overrides.items():
    if key not in cfg:
      raise InputError("depth_model", key, f"unknown field (known: {', '.join(sorted(cfg))})")
    cfg[key] = list(value) if isinstance(value, tuple) else value
  check_config(cfg)
  return cfg


def check_config(cfg, where: str = "depth_model") -> None:
  """Raises an InputError naming the field unless ``cfg`` describes a buildable model."""
  for field in ("variant", "kind", "patch_size", "hidden_size", "num_layers", "num_heads",
                "out_indices", "neck_hidden_sizes", "fusion_hidden_size", "head_hidden_size",
                "max_depth", "input_size", "pos_grid"):
    if field not in cfg:
      raise InputError(where, field, "missing")
  if cfg.kind not in KINDS:
    raise InputError(where, "kind", f"unknown kind {cfg.kind!r}; known: {KINDS}")
  if cfg.patch_size != PATCH_SIZE:
    raise InputError(where, "patch_size", f"{cfg.patch_size}: the decoder's head resizes to "
                     f"{PATCH_SIZE} x the grid; only {PATCH_SIZE} is supported")
  if cfg.hidden_size % cfg.num_heads:
    raise InputError(where, "num_heads", f"{cfg.num_heads} does not divide hidden_size "
                     f"{cfg.hidden_size}")
  if len(cfg.out_indices) != 4 or len(cfg.neck_hidden_sizes) != 4:
    raise InputError(where, "out_indices", "the DPT decoder takes exactly 4 levels "
                     f"(out_indices {list(cfg.out_indices)}, neck_hidden_sizes "
                     f"{list(cfg.neck_hidden_sizes)})")
  if not all(0 <= i < cfg.num_layers for i in cfg.out_indices):
    raise InputError(where, "out_indices", f"{list(cfg.out_indices)} not all in "
                     f"[0, {cfg.num_layers})")
  if cfg.input_size % PATCH_SIZE:
    raise InputError(where, "input_size", f"{cfg.input_size} is not a multiple of {PATCH_SIZE}")
  if not cfg.max_depth > 0:
    raise InputError(where, "max_depth", f"{cfg.max_depth}: must be > 0 (metres)")


# ----------------------------------------------------------------------------- resampling


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) weights of torch's ``interpolate(mode='bicubic', align_corners=False)``
  along one axis (no antialias; taps outside the input clamped to its edge)."""
  def cubic(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  frac = src - base
  m = np.zeros((n_out, n_in), np.float64)
  for tap in range(-1, 3):
    idx = np.clip(base + tap, 0, n_in - 1).astype(np.int64)
    np.add.at(m, (np.arange(n_out), idx), cubic(frac - tap))
  return m.astype(np.float32)


def _bilinear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's ``interpolate(mode='bilinear', align_corners=True)``."""
  src = (np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1)) if n_out > 1
         else np.zeros((1,)))
  lo = np.clip(np.floor(src), 0, n_in - 1).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def _resize_hw(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
  """x (N, h, w, C) -> (N, H, W, C) with the separable weights mh (H, h), mw (W, w)."""
  hi = jax.lax.Precision.HIGHEST  # resampling weights: keep float32 on TPU/GPU matmul units
  x = jnp.einsum("Hh,nhwc->nHwc", jnp.asarray(mh, x.dtype), x, precision=hi)
  return jnp.einsum("Ww,nhwc->nhWc", jnp.asarray(mw, x.dtype), x, precision=hi)


def resize_bicubic(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """torch's bicubic resize (align_corners=False, no antialias): x (N, h, w, C) -> (N, H, W, C)."""
  return _resize_hw(x, _bicubic_matrix(x.shape[1], hw[0]), _bicubic_matrix(x.shape[2], hw[1]))


def resize_bilinear_aligned(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """torch's bilinear resize with align_corners=True of x (N, h, w, C) -> (N, H, W, C)."""
  if (x.shape[1], x.shape[2]) == tuple(hw):
    return x
  return _resize_hw(x, _bilinear_align_corners_matrix(x.shape[1], hw[0]),
                    _bilinear_align_corners_matrix(x.shape[2], hw[1]))


def input_hw(height: int, width: int, input_size: int, multiple: int = PATCH_SIZE
             ) -> tuple[int, int]:
  """The released processor's network input size for a (height, width) frame.

  transformers' DPT/Depth Anything processor with ``size = input_size x input_size``,
  ``keep_aspect_ratio=True``, ``ensure_multiple_of=14``: one scale for both sides, the one of
  the two (input_size / height, input_size / width) closer to 1 ("scale as little as
  possible"), then each side rounded to the nearest multiple of 14 (Python's round, halves to
  even). A frame larger than input_size on both sides gets its shorter side to input_size.
  """
  scale_h, scale_w = input_size / height, input_size / width
  scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
  fit = lambda v: max(int(round(v / multiple)) * multiple, multiple)
  return fit(scale * height), fit(scale * width)


# ----------------------------------------------------------------------------- network


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1,
          padding: int = 0, bias: bool = True, **kw) -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                  padding=((padding, padding), (padding, padding)), use_bias=bias, rngs=rngs,
                  **kw)


class _Block(nnx.Module):
  """DINOv2 transformer block: tokens (N, L, D) -> (N, L, D)."""

  def __init__(self, cfg, rngs: nnx.Rngs, **kw):
    d, self.heads, self.impl = cfg.hidden_size, cfg.num_heads, cfg.get("attention", "auto")
    hidden = int(d * cfg.mlp_ratio)
    self.norm1 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.q = nnx.Linear(d, d, rngs=rngs, **kw)
    self.k = nnx.Linear(d, d, rngs=rngs, **kw)
    self.v = nnx.Linear(d, d, rngs=rngs, **kw)
    self.o = nnx.Linear(d, d, rngs=rngs, **kw)
    self.ls1 = nnx.Param(jnp.ones((d,), kw.get("param_dtype", jnp.float32)))
    self.norm2 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.fc1 = nnx.Linear(d, hidden, rngs=rngs, **kw)
    self.fc2 = nnx.Linear(hidden, d, rngs=rngs, **kw)
    self.ls2 = nnx.Param(jnp.ones((d,), kw.get("param_dtype", jnp.float32)))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, l, d = x.shape
    h = self.norm1(x)
    split = lambda t: t.reshape(n, l, self.heads, d // self.heads)
    a = attention_lib.attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                impl=self.impl)
    x = x + self.ls1[...] * self.o(a.reshape(n, l, d))
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
    return x + self.ls2[...] * h


class _ResidualConvUnit(nnx.Module):
  """Pre-activation residual unit: x + conv(relu(conv(relu(x)))), x (N, h, w, F)."""

  def __init__(self, f: int, rngs: nnx.Rngs, **kw):
    self.conv1 = _conv(f, f, 3, rngs, padding=1, **kw)
    self.conv2 = _conv(f, f, 3, rngs, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))


class _Fusion(nnx.Module):
  """DPT fusion block: (N, h, w, F) [+ skip (N, h, w, F)] -> (N, H, W, F) at ``size``."""

  def __init__(self, f: int, rngs: nnx.Rngs, **kw):
    # The coarsest level's block never sees a skip; its res1 exists (and is released) unused.
    self.res1 = _ResidualConvUnit(f, rngs, **kw)
    self.res2 = _ResidualConvUnit(f, rngs, **kw)
    self.out = _conv(f, f, 1, rngs, **kw)

  def __call__(self, x: jax.Array, skip: jax.Array | None, size: tuple[int, int]) -> jax.Array:
    if skip is not None:
      x = x + self.res1(skip)  # same size by construction (each level resizes to the next)
    return self.out(resize_bilinear_aligned(self.res2(x), size))


class DepthAnythingV2(nnx.Module):
  """Depth Anything V2: pixel_values (N, h, w, 3) ImageNet-normalised, h and w multiples of
  14 -> depth (N, h, w) float32 (relative: disparity >= 0; metric: metres)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    check_config(cfg)
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    d, f = cfg.hidden_size, cfg.fusion_hidden_size
    init = nnx.initializers.truncated_normal(0.02)
    self.patch_embed = nnx.Conv(3, d, (PATCH_SIZE, PATCH_SIZE), strides=(PATCH_SIZE, PATCH_SIZE),
                                padding="VALID", rngs=rngs, **kw)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + cfg.pos_grid ** 2, d), param_dtype))
    self.blocks = nnx.List([_Block(cfg, rngs, **kw) for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs, **kw)
    neck = list(cfg.neck_hidden_sizes)
    self.projects = nnx.List([_conv(d, c, 1, rngs, **kw) for c in neck])
    self.upsample4 = nnx.ConvTranspose(neck[0], neck[0], (4, 4), strides=(4, 4), padding="VALID",
                                       rngs=rngs, **kw)
    self.upsample2 = nnx.ConvTranspose(neck[1], neck[1], (2, 2), strides=(2, 2), padding="VALID",
                                       rngs=rngs, **kw)
    self.downsample2 = _conv(neck[3], neck[3], 3, rngs, stride=2, padding=1, **kw)
    self.level_convs = nnx.List([_conv(c, f, 3, rngs, padding=1, bias=False, **kw) for c in neck])
    # fusions[0] takes the coarsest level (the released refinenet4), fusions[3] the finest.
    self.fusions = nnx.List([_Fusion(f, rngs, **kw) for _ in neck])
    self.head1 = _conv(f, f // 2, 3, rngs, padding=1, **kw)
    self.head2 = _conv(f // 2, cfg.head_hidden_size, 3, rngs, padding=1, **kw)
    self.head3 = _conv(cfg.head_hidden_size, 1, 1, rngs, **kw)

  def _position_embedding(self, gh: int, gw: int) -> jax.Array:
    """(1, 1 + gh * gw, D): the cls position and the patch grid's, bicubic-resized in float32."""
    pos = self.pos_embed[...].astype(jnp.float32)
    g = self.cfg.pos_grid
    if (gh, gw) == (g, g):
      return pos
    grid = resize_bicubic(pos[:, 1:].reshape(1, g, g, -1), (gh, gw))
    return jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)

  def features(self, pixel_values: jax.Array) -> list[jax.Array]:
    """The 4 normalised encoder levels (N, gh, gw, D), cls token dropped."""
    n, h, w, _ = pixel_values.shape
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    x = self.patch_embed(pixel_values).reshape(n, gh * gw, -1)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self._position_embedding(gh, gw).astype(x.dtype)
    out = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if i in self.cfg.out_indices:
        out.append(self.norm(x)[:, 1:].reshape(n, gh, gw, -1))
    return out

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    n, h, w, c = pixel_values.shape
    if h % PATCH_SIZE or w % PATCH_SIZE or c != 3:
      raise InputError("pixel_values", "shape", f"{pixel_values.shape}: expected (N, h, w, 3) "
                       f"with h and w multiples of {PATCH_SIZE}")
    levels = [proj(x) for proj, x in zip(self.projects, self.features(pixel_values))]
    levels[0] = self.upsample4(levels[0])
    levels[1] = self.upsample2(levels[1])
    levels[3] = self.downsample2(levels[3])
    levels = [conv(x) for conv, x in zip(self.level_convs, levels)][::-1]  # coarsest first
    x = None
    for i, (fusion, level) in enumerate(zip(self.fusions, levels)):
      size = (levels[i + 1].shape[1:3] if i + 1 < len(levels)
              else (2 * level.shape[1], 2 * level.shape[2]))
      x = fusion(level, None, size) if x is None else fusion(x, level, size)
    x = resize_bilinear_aligned(self.head1(x), (h, w))  # 14 * grid = the input size
    x = self.head3(jax.nn.relu(self.head2(x)))[..., 0].astype(jnp.float32)
    if self.cfg.kind == "metric":
      return jax.nn.sigmoid(x) * self.cfg.max_depth
    return jax.nn.relu(x)


# ----------------------------------------------------------------------------- inference


def estimate(model: DepthAnythingV2, images: jax.Array, *,
             input_hw: tuple[int, int] | None = None) -> jax.Array:
  """Depth of frames as the released pipeline computes it (jittable: static shapes).

  Args:
    model: a DepthAnythingV2.
    images: (N, H, W, 3) float in [-1, 1] (the decoders' range).
    input_hw: the network's input size (multiples of 14); default: the released rule
      (:func:`input_hw` of ``model.cfg.input_size``).
  Returns:
    (N, H, W) float32: the model's output (relative disparity or metric metres) resized back
    to (H, W) with torch's bicubic, as ``post_process_depth_estimation``.
  """
  n, height, width, c = images.shape
  if c != 3:
    raise InputError("images", "shape", f"{images.shape}: expected (N, H, W, 3)")
  hw = _input_hw_of(model.cfg, height, width) if input_hw is None else tuple(input_hw)
  if hw[0] % PATCH_SIZE or hw[1] % PATCH_SIZE or min(hw) < PATCH_SIZE:
    raise InputError("estimate", "input_hw", f"{hw}: each side must be a positive multiple "
                     f"of {PATCH_SIZE}")
  pixels = preprocess(images, hw)
  depth = model(pixels)
  return resize_bicubic(depth[..., None], (height, width))[..., 0]


def _input_hw_of(cfg, height: int, width: int) -> tuple[int, int]:
  return input_hw(height, width, cfg.input_size)


def preprocess(images: jax.Array, hw: Sequence[int]) -> jax.Array:
  """images (N, H, W, 3) in [-1, 1] -> ImageNet-normalised (N, hw[0], hw[1], 3) float32.

  Antialiased bicubic (PIL's / torchvision's filter) of [0, 1] pixels, clamped to [0, 1] as
  the processor's uint8 resize clamps to [0, 255], then (x - mean) / std.
  """
  x = (images.astype(jnp.float32) + 1.0) * 0.5
  if tuple(x.shape[1:3]) != tuple(hw):
    x = jax.image.resize(x, (x.shape[0], hw[0], hw[1], 3), method="cubic", antialias=True)
  x = jnp.clip(x, 0.0, 1.0)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# ----------------------------------------------------------------------------- exports


def abstract_model(cfg, dtype=jnp.float32, param_dtype=jnp.float32) -> DepthAnythingV2:
  """The model of ``cfg`` with ShapeDtypeStruct params (no allocation)."""
  return nnx.eval_shape(lambda: DepthAnythingV2(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                param_dtype=param_dtype))



def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """'blocks/0/q/kernel' -> shape, for every param of ``DepthAnythingV2(cfg)`` (abstract)."""
  return params_lib.shapes(abstract_model(cfg))


def load_export(path: str, dtype=None) -> tuple[DepthAnythingV2, ml_collections.ConfigDict]:
  """A DepthAnythingV2 from an export (``config.json`` with ``depth_model``, ``params/`` the
  pure dict of the model's ``nnx.Param`` state), and that model config.

  Raises:
    InputError: naming the export and the field: no ``depth_model`` in its config, an invalid
      one, or saved params whose names or shapes are not those the config builds.
  """
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top  # orbax: load time only
  config = checkpoint.export_config(path)
  where = f"{path}/config.json"
  if "depth_model" not in config:
    raise InputError(where, "depth_model", "missing: not a Depth Anything export")
  cfg = ml_collections.ConfigDict(config.depth_model.to_dict())
  check_config(cfg, where)
  params, _, _ = checkpoint.load_export(path, dtype=dtype)
  model = abstract_model(cfg)
  hint = f"(an export of another variant? config says {cfg.variant}/{cfg.kind})"
  return params_lib.restore(model, params, path, hint), cfg


num_params = params_lib.count  # parameter count (works on an abstract model)
