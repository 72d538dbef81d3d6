"""The stage, its sharded train state, and the jitted train and eval steps.

The state is a plain pytree ``{"step", "params", "opt_state", "ema"}`` (params as nested dicts of
arrays, from ``nnx.split``), created directly in its sharding (``jax.eval_shape`` -> shardings
from the params' logical axes and ``config.logical_rules`` -> ``jax.jit(out_shardings=...)``)
and updated by one jitted step with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import pipeline
from mirage_jax import families
from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.training.mesh import batch_axes, logical_rules
from mirage_jax.training.optimizer import decay_mask, make_optimizer
from mirage_jax.training.stage import Batch, Stage, State


# 'depth' is family-independent (mirage_jax.depth.stage, reached by the registry by name).
STAGES = ("autoencoder", "denoiser", "depth")


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None) -> Stage:
  """The stage named by ``config.stage``, from its family (``families.make_stage``).

  Args:
    frozen: the stage's frozen params (the small denoiser's autoencoder); None: loaded later
      by ``stage.load_frozen``; "abstract": shapes only (compiling ahead of time).
  """
  if config.stage not in STAGES:
    raise InputError("config.stage", "stage", f"expected one of {STAGES}, got {config.stage!r}")
  return families.make_stage(config, frozen)


# ============================================================================= sharded state


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the step and the loop need about the model, its state and its shardings."""
  graphdef: Any  # nnx GraphDef of the trainable model
  abstract: State  # ShapeDtypeStruct pytree with shardings
  shardings: State  # NamedSharding pytree, same structure
  tx: optax.GradientTransformation  # the optimizer (its schedule over config.train.steps)
  decay_mask: Any  # which params take weight decay (optimizer.decay_mask)
  mesh: Mesh
  rules: tuple
  frozen_shardings: Any = None  # NamedSharding pytree of ``stage.frozen`` (None: replicated)

  def frozen_sharding(self) -> Any:
    """Shardings of the frozen argument: the stage's (FSDP for a large frozen base) or one
    replicated sharding for the whole tree."""
    if self.frozen_shardings is not None:
      return self.frozen_shardings
    return NamedSharding(self.mesh, PartitionSpec())

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Mesh and logical rules for tracing, lowering and calling the jitted functions."""
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      yield


def make_setup(config: ml_collections.ConfigDict, stage: Stage, mesh: Mesh) -> TrainSetup:
  """Abstract train state and its shardings, without allocating anything."""
  rules = logical_rules(config)
  model = nnx.eval_shape(lambda: stage.build(nnx.Rngs(config.seed)))
  graphdef, params = split_trainable(stage, model)
  # Logical names -> mesh axes; an axis that does not divide a dimension is an error unless
  # the dimension is smaller than it (sharding.param_spec).
  param_specs = nnx.get_partition_spec(params).to_pure_dict()
  abstract_params = params.to_pure_dict()
  param_shardings = sharding.logical_to_sharding(param_specs, mesh, rules, abstract_params,
                                                 params=True)
  mask = decay_mask(abstract_params, param_specs)
  tx, _ = make_optimizer(config, mask, config.train.steps)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  # Optimizer moments are shaped like the params and shard like them.
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: replicated)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "opt_state": abstract_opt, "ema": abstract_params}
  shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
               "ema": param_shardings}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return TrainSetup(graphdef, abstract, shardings, tx, mask, mesh, rules,
                    stage.frozen_shardings(mesh, rules))


def split_trainable(stage: Stage, model: nnx.Module) -> tuple[Any, nnx.State]:
  """(graphdef, trainable params) of a built model: ``stage.trainable`` or every nnx.Param.

  With ``stage.trainable`` the graphdef also expects the other params (``stage.merge``).
  """
  if stage.trainable is None:
    return nnx.split(model, nnx.Param)
  graphdef, params, _ = nnx.split(model, stage.trainable, ...)
  return graphdef, params


def init_state(config: ml_collections.ConfigDict, stage: Stage, setup: TrainSetup) -> State:
  """Initial state, each array created directly in its sharding (no host copy)."""

  def init() -> State:
    params = split_trainable(stage, stage.build(nnx.Rngs(config.seed)))[1].to_pure_dict()
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": setup.tx.init(params), "ema": params}

  with setup.context():
    state = jax.jit(init, out_shardings=setup.shardings)()
  initial = stage.initial_params
  if initial:  # trainable params the stage starts from (e.g. a released VACE branch)
    overlay = lambda tree, new: _overlay(tree, new, setup.shardings["params"])
    state = dict(state, params=overlay(state["params"], initial),
                 ema=overlay(state["ema"], initial))
  return state


def _overlay(tree: dict, new: Mapping, shardings: dict) -> dict:
  """``tree`` with the leaves present in ``new`` (same nesting) replaced, placed in
  ``shardings``."""
  out = dict(tree)
  for k, v in new.items():
    if isinstance(v, Mapping):
      out[k] = _overlay(tree[k], v, shardings[k])
    else:
      # A copy: params and EMA both start from ``new``, and the step donates the state; one
      # buffer in both would be donated twice (a segfault on CPU).
      out[k] = jax.device_put(jnp.asarray(v, tree[k].dtype), shardings[k], may_alias=False)
  return out


# ============================================================================= update step


class TrainStep:
  """The jitted update with the run's length bound: ``step(state, batch, frozen)`` and
  ``step.lower(state, batch, frozen)``.

  The length (``config.train.steps``, where the learning rate schedule ends) is an input of
  the compiled program, not a constant in it, so runs that differ only in length share one
  executable (the compilation cache, an AOT-saved step).
  """

  def __init__(self, jitted: Any, total_steps: int, sharding_: NamedSharding):
    self.jitted = jitted  # (state, batch, frozen, total_steps) -> (state, metrics)
    self.total_steps = total_steps
    self._sharding = sharding_
    self._total = None  # () int32 on the mesh, made on first call

  def __call__(self, state: State, batch: Batch, frozen: Any) -> tuple[State, dict]:
    if self._total is None:  # every process holds it whole: fine on several hosts
      self._total = jax.make_array_from_callback(
          (), self._sharding, lambda _: np.asarray(self.total_steps, np.int32))
    return self.jitted(state, batch, frozen, self._total)

  @property
  def abstract_total(self) -> jax.ShapeDtypeStruct:
    """The length input's shape, dtype and sharding: for lowering and tracing the jitted
    function without devices (a TPU topology's)."""
    return jax.ShapeDtypeStruct((), jnp.int32, sharding=self._sharding)

  def lower(self, state: Any, batch: Any, frozen: Any) -> jax.stages.Lowered:
    return self.jitted.lower(state, batch, frozen, self.abstract_total)

  def with_executable(self, compiled: jax.stages.Compiled) -> "TrainStep":
    """This step run by ``compiled`` (this step's ``lower(...).compile()``, e.g. loaded from
    an AOT file) instead of the jitted function."""
    return TrainStep(compiled, self.total_steps, self._sharding)


def make_train_step(config: ml_collections.ConfigDict, stage: Stage, setup: TrainSetup,
                    batch_shardings: Mapping[str, NamedSharding]) -> TrainStep:
  """The update ``(state, batch, frozen) -> (state, metrics)`` (:class:`TrainStep`); the
  state is donated.

  ``frozen`` holds the stage's non-trained params (replicated, or sharded as
  ``setup.frozen_shardings`` says: the Wan base is FSDP-sharded; ``{}`` for the autoencoder).

  Call (and ``.lower``) it inside ``setup.context()``.

  A step whose loss or gradient norm is not finite leaves the state unchanged (apart from
  ``step``) and reports ``nonfinite = 1``; the loop then skips on or halts
  (``config.train.nonfinite``).

  With ``config.train.microbatches`` = M > 1 the global batch is cut into M microbatches
  (each device keeps its own examples) whose gradients a ``lax.scan`` averages, so only one
  microbatch's activations are live at a time; microbatch i draws its noise from the step's
  key folded with i. The EMA decay warms up as ``min(ema_decay, (1 + t) / (10 + t))`` at
  step t (``config.optimizer.ema_warmup``), so it follows the params early instead of
  holding on to the random init.
  """
  ema_decay = config.optimizer.ema_decay
  ema_warmup = bool(config.optimizer.ema_warmup)
  num_micro = microbatches(config, setup.mesh, setup.rules)
  seed_key = jax.random.key(config.seed)
  axes = batch_axes(setup.mesh, setup.rules)

  def grads_fn(params, batch, frozen, rng):
    def loss_fn(params, batch, rng):
      model = stage.merge(setup.graphdef, params, frozen)
      return stage.loss(model, frozen, model_inputs(batch), rng)

    grad = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
      return grad(params, batch, rng)

    def split(x):  # (B, ...) -> (M, B / M, ...): each device's examples stay on it
      x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, NamedSharding(
          setup.mesh, PartitionSpec(None, axes, *([None] * (x.ndim - 2)))))

    def body(acc, xs):
      i, micro = xs
      out, g = grad(params, micro, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, acc, (out, g)), None

    micro = jax.tree.map(split, batch)
    shapes = jax.eval_shape(grad, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    return jax.tree.map(lambda x: x / num_micro, total)

  def step_fn(state: State, batch: Batch, frozen: Any, total_steps: jax.Array
              ) -> tuple[State, dict]:
    rng = jax.random.fold_in(seed_key, state["step"])
    (loss, aux), grads = grads_fn(state["params"], batch, frozen, rng)
    grad_norm = optax.global_norm(grads)
    # setup.tx with the schedule over the traced length (the same state structure).
    tx, schedule = make_optimizer(config, setup.decay_mask, total_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay
    if ema_warmup:
      t = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "ema": keep(ema, state["ema"])}
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]),
               "nonfinite": 1 - finite.astype(jnp.int32), **aux}
    return new_state, metrics

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  jitted = jax.jit(step_fn, in_shardings=(setup.shardings, dict(batch_shardings),
                                          setup.frozen_sharding(), replicated),
                   out_shardings=(setup.shardings, replicated), donate_argnums=(0,))
  return TrainStep(jitted, config.train.steps, replicated)


def microbatches(config: ml_collections.ConfigDict, mesh: Mesh, rules) -> int:
  """``config.train.microbatches``, checked against the global batch.

  Raises:
    InputError: it is not >= 1, or the global batch does not split into that many
      microbatches of whole per-device shares.
  """
  m = config.train.microbatches
  if not isinstance(m, int) or m < 1:
    raise InputError("config.train.microbatches", "microbatches", f"must be an integer >= 1, "
                     f"got {m!r}")
  split = math.prod(mesh.shape[a] for a in jax.tree.leaves(batch_axes(mesh, rules)))
  b = config.data.batch_size
  if b % (m * split):
    raise InputError("config.train.microbatches", "microbatches", f"global batch {b} does not "
                     f"split into {m} microbatches over the {split} devices of the batch axes")
  return m


def model_inputs(batch: Batch) -> Batch:
  """The batch as the stages read it: uint8 frames (``config.data.frames_dtype``) become
  float32 in [-1, 1] here, on the device, with the pipeline's own conversion."""
  frames = batch.get("frames")
  if frames is None or frames.dtype != jnp.uint8:
    return batch
  return dict(batch, frames=pipeline.frames_to_float(frames))


def make_eval_step(stage: Stage, setup: TrainSetup, batch_shardings) -> Callable:
  """Jitted ``(ema params, batch, frozen, rng) -> metrics`` with the EMA weights."""

  def eval_fn(params, batch, frozen, rng):
    model = stage.merge(setup.graphdef, params, frozen)
    loss, aux = stage.loss(model, frozen, model_inputs(batch), rng)
    return {"loss": loss, **aux}

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(eval_fn, in_shardings=(setup.shardings["ema"], dict(batch_shardings),
                                        setup.frozen_sharding(), replicated),
                 out_shardings=replicated)
