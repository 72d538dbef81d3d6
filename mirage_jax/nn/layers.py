"""Small building blocks shared by the autoencoder and the denoiser.

Every parameter is created through :func:`param`, which records its *logical* axis names in
the ``out_sharding`` metadata (``eager_sharding=False``: the mapping to mesh axes happens in
``mirage_jax.sharding``, so models build the same way with or without a mesh).
Compute happens in ``dtype`` (e.g. bf16); parameters are stored in ``param_dtype`` (f32).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
  """An ``nnx.Param`` of ``shape`` annotated with logical ``axes`` (one name per dim)."""
  if len(axes) != len(shape):
    raise ValueError(f"param: shape {tuple(shape)} vs logical axes {tuple(axes)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


class Dense(nnx.Module):
  """``y = x @ W + b`` over the last axis.

  Args:
    in_features, out_features: sizes of the last axis before and after.
    axes: logical names of the kernel's (in, out) axes; the bias uses the out name.
    zero_init: start with a zero kernel (adaLN-zero gates, output heads, control branch).
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None],
               *, rngs: nnx.Rngs, use_bias: bool = True, zero_init: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32):
    init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    self.kernel = param(rngs, init, (in_features, out_features), axes, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), (out_features,), axes[1:],
                       param_dtype) if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in_features) -> (..., out_features) in ``dtype``."""
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Conv(nnx.Module):
  """2D convolution, NHWC, 'SAME' padding, square kernel, integer stride."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, *,
               rngs: nnx.Rngs, zero_init: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32):
    init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    self.kernel = param(rngs, init, (kernel, kernel, in_ch, out_ch),
                        (None, None, "conv_in", "conv_out"), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), (out_ch,), ("conv_out",),
                      param_dtype)
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, in_ch) -> (B, H / stride, W / stride, out_ch)."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Parameter-free LayerNorm over the last axis, computed in f32, returned in x.dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale over the last axis (used on queries and keys)."""

  def __init__(self, features: int, axis_name: str | None, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.scale = param(rngs, nnx.initializers.ones_init(), (features,), (axis_name,),
                       param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., features) -> same shape and dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + 1e-6)
    return (y * self.scale[...]).astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of flow-matching time scaled by 1000.

  Args:
    t: (...) times in [0, 1].
    dim: even embedding size.
  Returns:
    (..., dim) float32 ``[cos, sin]`` features of ``1000 * t``.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def maybe_remat(fn: Callable, policy: str) -> Callable:
  """Wraps ``fn`` in ``jax.checkpoint`` according to a config policy name ('none' = as is)."""
  if policy == "none":
    return fn
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; "
                     f"known: {['none', *REMAT_POLICIES]}")
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """``n`` modules from ``make(rngs)`` with params stacked on a leading 'layers' axis."""
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(key):
    return make(nnx.Rngs(params=key))
  return build(jax.random.split(rngs.params(), n))


def run_layers(stack: nnx.Module, carry: Any, step: Callable, xs: Any, *, scan: bool,
               remat: str) -> tuple[Any, Any]:
  """Runs ``step(layer, carry, xs_i) -> (carry, y_i)`` over the layers of ``stack``
  (:func:`stack_layers`), each under :func:`maybe_remat` with policy ``remat``.

  Args:
    stack: the stacked layers; layer i is its params at index i of the leading axis.
    carry: what flows from layer to layer.
    xs: a pytree with a leading layer axis (or None): ``xs_i`` goes to layer i.
    scan: one ``jax.lax.scan`` (one compiled layer) or a Python loop (unrolled).
  Returns:
    (last carry, the ``y_i`` stacked on a leading layer axis; None when ``step`` gives None).
  """
  graphdef, state = nnx.split(stack)

  def body(carry, layer_xs):
    layer_state, extra = layer_xs
    return step(nnx.merge(graphdef, layer_state), carry, extra)

  body = maybe_remat(body, remat)
  if scan:
    return jax.lax.scan(body, carry, (state, xs))
  n = jax.tree.leaves(state)[0].shape[0]
  ys = []
  for i in range(n):
    carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
    ys.append(y)
  return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


# precision -> (compute dtype of the matmuls, dtype of the residual stream between blocks).
PRECISIONS = {"f32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"),
              "f32_residual": ("bfloat16", "float32")}


def precision_dtypes(cfg) -> tuple[jnp.dtype, jnp.dtype]:
  """(compute, residual) dtypes of ``cfg.precision``; configs from before that field give
  both as their ``dtype``."""
  if "precision" not in cfg:
    return (jnp.dtype(cfg.dtype),) * 2
  if cfg.precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision!r}")
  return tuple(jnp.dtype(d) for d in PRECISIONS[cfg.precision])
