"""AdamW with warmup-cosine learning rate, global-norm clipping and masked weight decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mirage_jax import sharding


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``opt.learning_rate``, then cosine decay to ``opt.end_learning_rate``.

  No warmup and an end rate equal to the peak is a constant rate (the same values): then the
  run's length is not a constant of the compiled train step, so runs of any length share one
  executable through the compilation cache.
  """
  if opt.warmup_steps == 0 and opt.end_learning_rate == opt.learning_rate:
    rate = opt.learning_rate
    return lambda count: jnp.asarray(rate, jnp.float32)  # float32, as the decaying schedule
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(total_steps, opt.warmup_steps + 1), end_value=opt.end_learning_rate)


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


def make_optimizer(config: ml_collections.ConfigDict, abstract_params: Any,
                   param_specs: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping; weight decay as :func:`decay_mask` says."""
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.train.steps)
  mask = decay_mask(abstract_params, param_specs)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=mask))
  return optax.chain(*parts), schedule
