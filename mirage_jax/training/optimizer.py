"""AdamW with warmup-cosine learning rate, global-norm clipping and masked weight decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mirage_jax import sharding


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: Any) -> optax.Schedule:
  """Linear warmup to ``opt.learning_rate``, then cosine decay to ``opt.end_learning_rate``
  at step ``total_steps`` (optax's ``warmup_cosine_decay_schedule``, the same float32 values).

  ``total_steps`` may be a traced int32 scalar: the train step takes the run's length as an
  input (``step.TrainStep``), so it is not a constant of the compiled program and runs of any
  length share one executable (the compilation cache, an AOT-saved step).
  """
  peak, end, warmup = opt.learning_rate, opt.end_learning_rate, opt.warmup_steps
  if warmup == 0 and end == peak:
    return lambda count: jnp.asarray(peak, jnp.float32)  # float32, as the decaying schedule
  warm = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup)
  alpha = 0.0 if peak == 0.0 else end / peak

  def schedule(count):
    # optax's cosine_decay_schedule over the steps after the warmup (at least one), written
    # with jnp so that the length may be traced.
    decay = (jnp.maximum(total_steps, warmup + 1) - warmup).astype(jnp.float32)
    t = jnp.minimum(count - warmup, decay)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * t * (1.0 / decay)))
    return jnp.where(count < warmup, warm(count), peak * ((1 - alpha) * cosine + alpha))
  return schedule


# Parameter names that never take weight decay, whatever their shape (Wan's per-head
# q/k norm scales are (heads, head_dim)).
_NO_DECAY_NAMES = ("bias", "scale", "norm")


def decay_mask(abstract_params: Any, param_specs: Any = None) -> Any:
  """True for the parameters weight decay applies to: kernels and embeddings.

  A parameter decays when it has at least two dimensions besides the ``layers`` axis of a
  scanned stack (from its logical axes in ``param_specs``; without them, all of its
  dimensions count) and no path component names a bias, scale or norm. A stacked bias
  (layers, d) therefore does not decay, a stacked kernel (layers, d, d) does.

  Args:
    abstract_params: nested dict of arrays / ShapeDtypeStructs.
    param_specs: same structure, leaves the logical axis names (``nnx.get_partition_spec``)
      or None.
  Returns:
    The same structure of bools.
  """
  def one(path, x, spec):
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    if any(n in name for name in names for n in _NO_DECAY_NAMES):
      return False
    axes = tuple(spec) if spec is not None and len(tuple(spec)) == x.ndim else (None,) * x.ndim
    return sum(a != "layers" for a in axes) >= 2

  if param_specs is None:
    return jax.tree_util.tree_map_with_path(lambda p, x: one(p, x, None), abstract_params)
  specs = jax.tree.map(lambda a, s: s, abstract_params, param_specs,
                       is_leaf=lambda x: x is None or sharding._is_spec(x))
  return jax.tree_util.tree_map_with_path(one, abstract_params, specs,
                                          is_leaf=lambda x: x is None or sharding._is_spec(x))


def make_optimizer(config: ml_collections.ConfigDict, mask: Any, total_steps: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping, weight decay where ``mask`` (:func:`decay_mask`) is
  True, and :func:`learning_rate_schedule` over ``total_steps`` (an int, or a traced scalar
  inside the train step; the state's structure does not depend on it)."""
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, total_steps)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=mask))
  return optax.chain(*parts), schedule
