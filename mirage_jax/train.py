"""Training: mesh, input, model & optimizer, sharded state, jitted update step, checkpoints, evals.

Reads top to bottom like the loop it runs. Two stages (``config.stage``):

  * ``autoencoder``: the RGB-D VAE on single frames of the clips;
  * ``denoiser``: the frozen autoencoder (``config.denoiser.autoencoder_checkpoint``) encodes
    the clip; several earlier frames are written into the spatial memory with the same
    ``mirage_jax.memory`` write/read code the rollout uses, read into the target cameras, and
    the DiT learns flow matching on the target chunk with the context frames clean.

The state is a plain pytree ``{"step", "params", "opt_state", "ema"}`` (params as nested dicts of
arrays, from ``nnx.split``), created directly in its sharding (``jax.eval_shape`` -> shardings
from the params' logical axes and ``config.logical_rules`` -> ``jax.jit(out_shardings=...)``)
and updated by one jitted step with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
import jax.extend.core as jax_core
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import builders
from data_pipelines import pipeline
from mirage_jax import aot
from mirage_jax import checkpoint as ckpt_lib
from mirage_jax import diffusion
from mirage_jax import distributed
from mirage_jax import geometry
from mirage_jax import memory as memory_lib
from mirage_jax.memory import objects as objects_lib
from mirage_jax import metrics_log
from mirage_jax import paths
from mirage_jax import prefetch
from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.evaluation import training_rollouts
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import conditioning as small_conditioning
from mirage_jax.families.small import denoiser

Batch = dict[str, jax.Array]
State = dict[str, Any]


class Stage(Protocol):
  """What a training stage provides (see ``make_stage``)."""

  fields: tuple[str, ...]  # batch fields the loss reads
  frozen: Any  # non-trained params the loss needs (pytree; {} if none)

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """The trainable model."""

  def loss(self, model: nnx.Module, frozen: Any, batch: Batch, rng: jax.Array
           ) -> tuple[jax.Array, dict]:
    """Scalar loss and a dict of scalar metrics for one global batch."""

  def step_flops(self, batch_size: int) -> float:
    """Analytic FLOPs of one training step (forward + backward + frozen parts) for a batch."""

  # Optional (see ``split_trainable``, ``merge_model``, ``frozen_shardings``; WanStage):
  #   trainable: an nnx filter of the built model's trainable params (default: every
  #     nnx.Param); the rest of the model then comes in through ``frozen`` (``merge``).
  #   merge(graphdef, params, frozen) -> model; frozen_shardings(mesh, rules) -> pytree;
  #   initial_params: nested dict of trainable params that override the random init;
  #   batch_shapes() -> {field: (global shape, dtype)}; input(source, data, where) -> dataset.


# ============================================================================= mesh


def build_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, context, tensor) mesh of ``config.mesh`` (ICI) x ``config.dcn_mesh``.

  ``config.dcn_mesh`` gives how many slices each axis spans (multi-slice TPU, or GPU nodes
  over the data-center network); all ones means one slice, and ``config.mesh`` may use -1 for
  "all remaining devices".
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = {a: int(config.dcn_mesh.get(a, 1)) for a in sharding.MESH_AXES}
  num_slices = math.prod(dcn.values())
  if num_slices == 1:
    return sharding.make_mesh(dict(config.mesh), devices, where="config.mesh")
  if len(devices) % num_slices:
    raise InputError("config.dcn_mesh", "dcn_mesh", f"{len(devices)} devices do not split "
                     f"into {num_slices} slices")
  per_slice = sharding.make_mesh(dict(config.mesh), devices[:len(devices) // num_slices],
                                 where="config.mesh")
  ici_shape = [per_slice.shape[a] for a in sharding.MESH_AXES]
  dcn_shape = [dcn[a] for a in sharding.MESH_AXES]
  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  return Mesh(grid, sharding.MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """``config.logical_rules`` as a tuple of (logical name, mesh axis / axes / None)."""
  rules = []
  for pair in config.logical_rules:
    name, target = pair
    rules.append((name, tuple(target) if isinstance(target, list) else target))
  return tuple(rules)


def batch_axes(mesh: Mesh, rules) -> Any:
  """Mesh axes that the batch dimension is split over (the ``batch`` logical rule)."""
  return sharding.logical_to_spec(("batch",), rules, mesh)[0]


# ============================================================================= model & optimizer


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``opt.learning_rate``, then cosine decay to ``opt.end_learning_rate``."""
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


# ============================================================================= shard & transfer


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the step and the loop need about the model, its state and its shardings."""
  graphdef: Any  # nnx GraphDef of the trainable model
  abstract: State  # ShapeDtypeStruct pytree with shardings
  shardings: State  # NamedSharding pytree, same structure
  tx: optax.GradientTransformation
  schedule: optax.Schedule
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
  tx, schedule = make_optimizer(config, abstract_params, param_specs)
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
  frozen_shardings = (stage.frozen_shardings(mesh, rules) if hasattr(stage, "frozen_shardings")
                      else None)
  return TrainSetup(graphdef, abstract, shardings, tx, schedule, mesh, rules, frozen_shardings)


def split_trainable(stage: Stage, model: nnx.Module) -> tuple[Any, nnx.State]:
  """(graphdef, trainable params) of a built model: ``stage.trainable`` or every nnx.Param.

  With ``stage.trainable`` the graphdef also expects the other params (``merge_model``).
  """
  filt = getattr(stage, "trainable", None)
  if filt is None:
    return nnx.split(model, nnx.Param)
  graphdef, params, _ = nnx.split(model, filt, ...)
  return graphdef, params


def merge_model(stage: Stage, graphdef: Any, params: Any, frozen: Any) -> nnx.Module:
  """The model of trainable ``params`` (nested dict), plus the stage's frozen part if any."""
  if hasattr(stage, "merge"):
    return stage.merge(graphdef, params, frozen)
  return nnx.merge(graphdef, nnx.State(params))


def init_state(config: ml_collections.ConfigDict, stage: Stage, setup: TrainSetup) -> State:
  """Initial state, each array created directly in its sharding (no host copy)."""

  def init() -> State:
    params = split_trainable(stage, stage.build(nnx.Rngs(config.seed)))[1].to_pure_dict()
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": setup.tx.init(params), "ema": params}

  with setup.context():
    state = jax.jit(init, out_shardings=setup.shardings)()
  initial = getattr(stage, "initial_params", None)
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
      out[k] = jax.device_put(jnp.asarray(v, tree[k].dtype), shardings[k])
  return out


# ============================================================================= update step


def make_train_step(config: ml_collections.ConfigDict, stage: Stage, setup: TrainSetup,
                    batch_shardings: Mapping[str, NamedSharding]) -> Callable:
  """The jitted update ``(state, batch, frozen) -> (state, metrics)``; the state is donated.

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
  ema_warmup = bool(config.optimizer.get("ema_warmup", False))
  num_micro = microbatches(config, setup.mesh, setup.rules)
  seed_key = jax.random.key(config.seed)
  axes = batch_axes(setup.mesh, setup.rules)

  def grads_fn(params, batch, frozen, rng):
    def loss_fn(params, batch, rng):
      model = merge_model(stage, setup.graphdef, params, frozen)
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

  def step_fn(state: State, batch: Batch, frozen: Any) -> tuple[State, dict]:
    rng = jax.random.fold_in(seed_key, state["step"])
    (loss, aux), grads = grads_fn(state["params"], batch, frozen, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
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
               "learning_rate": setup.schedule(state["step"]),
               "nonfinite": 1 - finite.astype(jnp.int32), **aux}
    return new_state, metrics

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(setup.shardings, dict(batch_shardings),
                                        setup.frozen_sharding()),
                 out_shardings=(setup.shardings, replicated), donate_argnums=(0,))


def microbatches(config: ml_collections.ConfigDict, mesh: Mesh, rules) -> int:
  """``config.train.microbatches`` (default 1), checked against the global batch.

  Raises:
    InputError: it is not >= 1, or the global batch does not split into that many
      microbatches of whole per-device shares.
  """
  m = config.train.get("microbatches", 1)
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
    model = merge_model(stage, setup.graphdef, params, frozen)
    loss, aux = stage.loss(model, frozen, model_inputs(batch), rng)
    return {"loss": loss, **aux}

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(eval_fn, in_shardings=(setup.shardings["ema"], dict(batch_shardings),
                                        setup.frozen_sharding(), replicated),
                 out_shardings=replicated)


# ============================================================================= stages


def jaxpr_flops(fn: Callable, *args) -> float:
  """FLOPs (2 per multiply-add) of the matmuls and convolutions ``fn`` traces to.

  Counted from the jaxpr (the model's own operations, before XLA), recursing into scans
  (times their length) and other sub-computations; elementwise work is left out.
  """
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def model_flops(build: Callable[[], nnx.Module], call: Callable, *args) -> float:
  """:func:`jaxpr_flops` of ``call(model, *args)`` for an abstract (never allocated) model."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  return jaxpr_flops(lambda state, *a: call(nnx.merge(graphdef, state), *a), abstract, *args)


def _count(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[i] for i in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out ch, in ch, *spatial)
      per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[i] for i in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    times = eqn.params.get("length", 1) if name == "scan" else 1
    if name == "pallas_call":  # a kernel's body runs once per grid point (splash attention)
      times = math.prod(n for n in eqn.params["grid_mapping"].grid if isinstance(n, int))
    if name == "shard_map":  # the body is one shard's work: every shard of the manual axes runs it
      times = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax_core.Jaxpr):
          total += times * _count(inner)
  return total


class AutoencoderStage:
  """Stage 1: the RGB-D VAE (and its dynamic head) on every frame of the windows."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.frozen: dict = {}
    self.fields = ("frames", "depths") + (
        ("dynamic_masks",) if config.autoencoder.get("dynamic_head_width", 0) else ())

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return autoencoder.Autoencoder(self.config.autoencoder, rngs)

  def loss(self, model, frozen, batch: Batch, rng):
    """batch: frames (B, T, H, W, 3) in [-1, 1], depths (B, T, H, W)[, dynamic_masks (B, T, H, W)]."""
    del frozen
    b, t, h, w, _ = batch["frames"].shape
    flat = {k: v.reshape((b * t,) + v.shape[2:]) for k, v in batch.items() if k in self.fields}
    loss, aux = autoencoder.loss(model, flat, rng)
    aux.pop("loss", None)
    return loss, aux

  def step_flops(self, batch_size: int) -> float:
    d = self.config.data
    h, w = d.resolution
    frames = jax.ShapeDtypeStruct((batch_size * d.num_frames, h, w, 3), jnp.float32)
    depths = jax.ShapeDtypeStruct((batch_size * d.num_frames, h, w), jnp.float32)
    fwd = model_flops(lambda: self.build(nnx.Rngs(0)),
                      lambda model, f, z: model(f, z, jax.random.key(0)), frames, depths)
    return 3.0 * fwd  # forward + backward (twice the forward)


class DenoiserStage:
  """Stage 2: flow matching on the target chunk, conditioned on memory and clean context.

  A window of ``T = memory_frames + target_frames`` frames: the first ``memory_frames`` are
  encoded by the frozen autoencoder and written into the memory (``config.memory``), whose
  read into each target camera conditions the denoiser. Clean context (t = 0): the
  ``reference_frames`` memory frames that the rollout's rule retrieves for the targets
  (``memory_lib.references.retrieve_references`` on a bank of the memory frames, the last
  ``context_frames`` not eligible), then the last ``context_frames`` memory frames.
  """

  fields = ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks")

  def __init__(self, config: ml_collections.ConfigDict, frozen: Any):
    self.config = config
    d = config.denoiser
    res = config.data.resolution
    self.factor = factor = autoencoder.downsample_factor(config.autoencoder)
    self.latent_hw = (res[0] // factor, res[1] // factor)
    if d.memory_frames + d.target_frames != config.data.num_frames:
      raise InputError("config.denoiser", "target_frames", f"memory_frames ({d.memory_frames}) + "
                       f"target_frames ({d.target_frames}) must equal data.num_frames "
                       f"({config.data.num_frames})")
    if not 0 <= d.context_frames <= d.memory_frames:
      raise InputError("config.denoiser", "context_frames", "must be in [0, memory_frames]")
    self.refs = small_conditioning.reference_settings(config)
    if self.refs.frames > d.memory_frames:
      raise InputError("config.denoiser", "reference_frames",
                       f"must be <= memory_frames ({d.memory_frames}), got {self.refs.frames}")
    self.memory = memory_lib.get_backend(config.memory.backend)
    # The rollout's settings, but room for this window's points only (train_capacity).
    self.memory_cfg = train_memory_config(config, small_conditioning.memory_config(config),
                                          d.memory_frames)
    if not 0.0 <= d.get("cond_dropout", 0.0) < 1.0:
      raise InputError("config.denoiser", "cond_dropout", f"must be in [0, 1), got "
                       f"{d.cond_dropout}")
    noise_levels(config)
    self.context_noise = float(d.get("context_noise", 0.0))
    if not 0.0 <= self.context_noise < 1.0:
      raise InputError("config.denoiser", "context_noise", f"must be in [0, 1), got "
                       f"{d.context_noise}")
    self.self_generated = float(d.get("self_generated_memory", 0.0))
    if not 0.0 <= self.self_generated <= 1.0:
      raise InputError("config.denoiser", "self_generated_memory", f"must be in [0, 1], got "
                       f"{d.self_generated_memory}")
    # The last g memory frames are generated from the first m - g, keeping >= 1 frame (and
    # the clean context) from the data.
    self.generated_frames = min(d.target_frames, d.memory_frames - max(d.context_frames, 1))
    if self.self_generated > 0 and self.generated_frames < 1:
      raise InputError("config.denoiser", "self_generated_memory", "needs memory_frames > "
                       f"max(context_frames, 1), got memory_frames={d.memory_frames}, "
                       f"context_frames={d.context_frames}")
    objects_cfg = config.get("objects")
    self.object_cfg = (small_conditioning.object_config(config) if objects_cfg is not None
                       and config.memory.backend in objects_cfg.backends else None)
    self.ae_graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))))
    self.frozen = frozen

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return denoiser.Denoiser(self.config.denoiser.model, rngs)

  def load_frozen(self, mesh: Mesh, rules) -> None:
    """Restores the frozen autoencoder straight into the step's (replicated) sharding on
    ``mesh``: every process reads it from the export, none receives it from another."""
    del rules
    self.frozen = load_frozen_autoencoder(self.config, NamedSharding(mesh, PartitionSpec()))

  def _encode(self, frozen, frames, depths):
    """(B, T, H, W, 3), (B, T, H, W) -> scaled posterior-mean latents (B, T, h, w, C)."""
    ae = nnx.merge(self.ae_graphdef, nnx.State(frozen))
    b, t, h, w, _ = frames.shape
    mean, _ = ae.encode(frames.reshape(b * t, h, w, 3), depths.reshape(b * t, h, w))
    latents = mean.reshape((b, t) + mean.shape[1:]) * self.config.denoiser.latent_scale
    return jax.lax.stop_gradient(latents)

  def _condition(self, latents, batch, memory_frames=None):
    """Memory written from the first ``memory_frames`` (default the config's) of the window,
    read into the rest (the targets); rays; context."""
    d = self.config.denoiser
    m = d.memory_frames if memory_frames is None else memory_frames
    nc, k = d.context_frames, self.refs.frames
    hh, ww = self.latent_hw
    frame_ids = jnp.arange(m, dtype=jnp.int32)

    def one_clip(lat, depth, K, c2w, dyn):
      static = dyn[:m] == 0
      state = self.memory.init(self.memory_cfg)
      state = self.memory.write(state, lat[:m], depth[:m], K[:m], c2w[:m], static, frame_ids)
      mem, coverage = self.memory.read(state, K[m:], c2w[m:])
      if self.object_cfg is not None:  # the slots the rollout would hold after these frames
        moving = autoencoder.dynamic_target(dyn[:m], self.factor)
        objects = objects_lib.observe(objects_lib.init(self.object_cfg), lat[:m], depth[:m], K[:m],
                                      c2w[:m], moving, frame_ids)
        target_ids = jnp.arange(m, lat.shape[0], dtype=jnp.int32)
        mem, coverage = small_conditioning.splat_objects(objects, mem, coverage, K[m:], c2w[m:], target_ids)
      if not k:
        return mem, coverage, ()
      bank = memory_lib.frame_bank.write(memory_lib.references.reference_bank_init(self.memory_cfg, m),
                                                   lat[:m], depth[:m], K[:m], c2w[:m], static,
                                                   frame_ids)
      return mem, coverage, memory_lib.references.retrieve_references(bank, bank.frame < m - nc, K[m:], c2w[m:],
                                                        k)[:3]

    mem, coverage, refs = memory_lib.batch_map(one_clip, latents, batch["depths"],
                                               batch["intrinsics"], batch["poses_c2w"],
                                               batch["dynamic_masks"])
    lat_K = lambda K: memory_lib.splatting.latent_intrinsics(self.memory_cfg, K)
    # (B, T, h, w, 6)
    rays = geometry.plucker_rays(lat_K(batch["intrinsics"]), batch["poses_c2w"], hh, ww)
    context, context_rays = latents[:, m - nc:m], rays[:, m - nc:m]
    if k:  # references first: memory_prior falls back on the last context frame, as in rollout
      ref_lat, ref_K, ref_c2w = refs  # (B, k, h, w, C), (B, k, 3, 3), (B, k, 4, 4)
      context = jnp.concatenate([ref_lat.astype(latents.dtype), context], 1)
      context_rays = jnp.concatenate([geometry.plucker_rays(lat_K(ref_K), ref_c2w, hh, ww),
                                      context_rays], 1)
    return dict(memory=mem.astype(jnp.float32), coverage=coverage.astype(jnp.float32),
                rays=rays[:, m:], context=context, context_rays=context_rays)

  def _generate_memory(self, model, frozen, latents, batch, rng):
    """Scheduled sampling of the memory writes: the last g memory frames as the rollout
    would make them, from the first m - g (the rollout's sampler, decoded and, with
    ``sampler.reencode_latents``, encoded again); no gradient flows through them.

    Args:
      latents: (B, T, h, w, C) encoded window; batch: the window's fields.
    Returns:
      latents (B, g, h, w, C) and decoded metric depths (B, g, H, W) of frames m - g .. m - 1.
    """
    d, s = self.config.denoiser, self.config.sampler
    m, g = d.memory_frames, self.generated_frames
    part = {k: batch[k][:, :m] for k in ("depths", "intrinsics", "poses_c2w", "dynamic_masks")}
    cond = self._condition(latents[:, :m], part, m - g)
    b = latents.shape[0]

    def velocity(x, t):
      tt = jnp.full(x.shape[:2], t, jnp.float32)
      return denoiser.predict(model, d.prediction, x, tt, cond["rays"], cond["memory"],
                              cond["coverage"], cond["context"], cond["context_rays"])[0]

    noise = jax.random.normal(rng, (b, g) + latents.shape[2:], latents.dtype)
    gen = diffusion.sample(velocity, noise, int(s.num_steps), s.method, float(s.shift))
    ae = nnx.merge(self.ae_graphdef, nnx.State(frozen))
    rgb, depth = ae.decode(gen.reshape((b * g,) + gen.shape[2:]) / d.latent_scale)
    rgb, depth = rgb.reshape((b, g) + rgb.shape[1:]), depth.reshape((b, g) + depth.shape[1:])
    if s.get("reencode_latents", False):  # what the rollout writes
      gen = self._encode(frozen, rgb, depth)
    return jax.lax.stop_gradient(gen), jax.lax.stop_gradient(depth)

  def loss(self, model, frozen, batch: Batch, rng):
    d = self.config.denoiser
    latents = self._encode(frozen, batch["frames"], batch["depths"])
    if self.self_generated > 0:
      g_rng, u_rng, rng = jax.random.split(rng, 3)
      gen, gen_depth = self._generate_memory(model, frozen, latents, batch, g_rng)
      m, g = d.memory_frames, self.generated_frames
      use = jax.random.bernoulli(u_rng, self.self_generated, latents.shape[:1])
      pick = lambda x, new: x.at[:, m - g:m].set(
          jnp.where(use.reshape((-1,) + (1,) * (new.ndim - 1)), new, x[:, m - g:m]))
      latents = pick(latents, gen.astype(latents.dtype))
      batch = dict(batch, depths=pick(batch["depths"], gen_depth.astype(batch["depths"].dtype)))
    cond = self._condition(latents, batch)
    x0 = latents[:, d.memory_frames:]
    t_rng, n_rng = jax.random.split(rng)
    tr = self.config.train
    t = diffusion.sample_levels(t_rng, *x0.shape[:2], d.time_shift,
                                tr.get("noise_levels", "per_frame"),
                                tr.get("noise_levels_mixed_prob", 0.5))
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
    memory, coverage, context = cond["memory"], cond["coverage"], cond["context"]
    if self.context_noise > 0:
      context = diffusion.noise_context(jax.random.fold_in(rng, 3), context, self.context_noise)
    if d.get("cond_dropout", 0.0) > 0:  # trains the unconditional branch guidance uses
      memory, coverage = diffusion.drop_conditioning(jax.random.fold_in(rng, 2),
                                                     d.cond_dropout, memory, coverage)
    velocity, x0_pred = denoiser.predict(
        model, d.prediction, diffusion.add_noise(x0, noise, t), t, cond["rays"],
        memory, coverage, context, cond["context_rays"])
    if d.prediction == "x0_prior":  # x0 regression (= velocity loss weighted by t^2)
      loss = jnp.mean(jnp.square(x0_pred - x0))
    else:
      loss = diffusion.flow_matching_loss(velocity, x0, noise, t, weighting=d.time_weighting)
    prior_mse = jnp.mean(jnp.square(denoiser.memory_prior(cond["memory"], cond["coverage"],
                                                          cond["context"]) - x0))
    return loss, {"memory_coverage": cond["coverage"].mean(), "prior_mse": prior_mse,
                  "x0_mse": jnp.mean(jnp.square(x0_pred - x0))}

  def step_flops(self, batch_size: int) -> float:
    d, data = self.config.denoiser, self.config.data
    hh, ww = self.latent_hw
    dit = denoiser.denoiser_flops(d.model, batch_size, d.target_frames,
                                  d.context_frames + self.refs.frames, hh, ww)
    h, w = data.resolution
    n = batch_size * data.num_frames
    encode = model_flops(lambda: autoencoder.Autoencoder(self.config.autoencoder, nnx.Rngs(0)),
                         lambda ae, f, z: ae.encode(f, z),
                         jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32),
                         jax.ShapeDtypeStruct((n, h, w), jnp.float32))
    return 3.0 * dit + encode  # the frozen encoder runs forward only


class WanStage:
  """Fine-tuning Mirage on a frozen Wan2.2 base (the reference's ``scripts/train.py``).

  ``config.denoiser.model.family == 'wan'``. The WanDiT's base params (everything but the
  VACE branch and the LoRA adapters) are frozen and come from ``config.denoiser.base_checkpoint``
  (a ``convert_wan`` DiT export, or a fine-tune export of one, followed to its base); they go
  through the step as ``frozen["base"]``, FSDP-sharded by the mesh rules like trainable params
  but with no optimizer state. What trains is ``config.denoiser.train_stages`` ('vace' and/or
  'lora', as the reference's ``--stage``). A trainable part found in the base export starts
  from it; one not found starts as the reference initialises it (VACE: PyTorch-default random
  weights with ``after_proj`` zero; LoRA: A random, B zero).

  Batches are pre-encoded latent clips (``data_pipelines.latent_clips``; nothing is encoded
  per step). Per clip: the memory (``config.memory.backend``) is written from the source
  latent frames (``config.denoiser.memory_write``: 'first_target', the reference's: the
  clean first target latent with its depth; 'preceding': the preceding latents; 'both') and
  read into the target + preceding cameras; the VACE input is that read and the encoded
  all-ones control (``wan_mirage.vace_context``); the DiT sees ``[references | noisy target
  | preceding]`` with per-frame timesteps; loss as ``wan_mirage.flow_loss``. Captions are
  dropped (replaced by the empty-prompt embedding) with probability
  ``config.denoiser.caption_dropout`` and wherever the clip has none.
  """

  FIELDS = ("target_latents", "preceding_latents", "reference_latents", "depths",
            "static_masks", "intrinsics", "poses_c2w", "text", "has_text")
  MEMORY_WRITE = ("first_target", "preceding", "both")

  def __init__(self, config: ml_collections.ConfigDict, frozen: Any = None):
    from mirage_jax.families.wan import conditioning as wan_mirage  # pylint: disable=g-import-not-at-top
    from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
    self.config = config
    d = config.denoiser
    self.cfg = d.model
    self.wm, self.wan_dit = wan_mirage, wan_dit
    if not 5 <= d.target_frames or (d.target_frames - 1) % 4:
      raise InputError("config.denoiser", "target_frames", f"must be 1 + 4 k (k >= 1) video "
                       f"frames, got {d.target_frames}")
    if d.preceding_frames < 0 or d.reference_frames < 0:
      raise InputError("config.denoiser", "preceding_frames", "must be >= 0 (and "
                       "reference_frames >= 0)")
    if d.memory_write not in self.MEMORY_WRITE:
      raise InputError("config.denoiser", "memory_write", f"expected one of "
                       f"{self.MEMORY_WRITE}, got {d.memory_write!r}")
    if d.memory_write != "first_target" and not d.preceding_frames:
      raise InputError("config.denoiser", "memory_write", "needs preceding_frames > 0")
    h, w = (int(r) for r in config.data.resolution)
    if h % 32 or w % 32:
      raise InputError("config.data", "resolution", f"{(h, w)}: must be multiples of 32 (16x "
                       "VAE, 2x2 DiT patches)")
    self.latent_hw = (h // 16, w // 16)
    self.num_target = (d.target_frames - 1) // 4 + 1
    self.num_preceding = (((d.preceding_frames - 1) // 4 + 1) if d.preceding_frames else 0)
    self.num_reference = int(d.reference_frames)
    try:
      self.trainable = wan_dit.trainable_filter(self.cfg, tuple(d.train_stages))
    except InputError as e:
      raise InputError("config.denoiser", "train_stages", e.problem) from e
    if self.trainable is nnx.Nothing:
      raise InputError("config.denoiser", "train_stages", f"{tuple(d.train_stages)} trains "
                       "nothing with this model (vace off or lora_rank 0)")
    want_ch = 96 + (1 if d.vace_coverage else 0)
    if not self.cfg.vace or self.cfg.vace_in_channels != want_ch:
      raise InputError("config.denoiser.model", "vace_in_channels", f"the VACE input has "
                       f"{want_ch} channels (memory 48 + control 48"
                       f"{' + coverage 1' if d.vace_coverage else ''}); model has "
                       f"vace={self.cfg.vace}, vace_in_channels={self.cfg.vace_in_channels}")
    self.noise_levels = noise_levels(config)
    self.memory = memory_lib.get_backend(config.memory.backend)
    self.memory_cfg = train_memory_config(config, wan_mirage.memory_config(config),
                                          len(self._memory_sources()))
    model = nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
    self._graphdef_full, trainable, rest = nnx.split(model, self.trainable, ...)
    self.base_abstract = rest.to_pure_dict()
    self.base_specs = nnx.get_partition_spec(rest).to_pure_dict()
    self.initial_params = None
    f_lat = self.num_target + self.num_preceding
    if frozen == "abstract":  # shapes only (AOT)
      sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
      self.frozen = {"base": self.base_abstract,
                     "control": sds((f_lat,) + self.latent_hw + (48,)),
                     "empty_text": sds((d.text_len, self.cfg.text_dim))}
    elif frozen is not None:
      self.frozen = frozen
    else:
      self.frozen = None  # loaded by load_frozen(mesh), which needs the mesh

  # --------------------------------------------------------------------------- params

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.wan_dit.WanDiT(self.cfg, rngs=rngs)

  def merge(self, graphdef, params, frozen) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params), nnx.State(frozen["base"]))

  def frozen_shardings(self, mesh: Mesh, rules) -> dict:
    replicated = NamedSharding(mesh, PartitionSpec())
    with sharding.use_rules(rules):
      base = sharding.logical_to_sharding(self.base_specs, mesh, rules, self.base_abstract,
                                          params=True)
    return {"base": base, "control": replicated, "empty_text": replicated}

  def load_frozen(self, mesh: Mesh, rules) -> None:
    """Loads the frozen base (sharded), the control latents and the empty-prompt embedding;
    sets ``self.frozen`` and ``self.initial_params`` (trainable params the base has)."""
    d = self.config.denoiser
    if not d.base_checkpoint:
      raise InputError("config.denoiser.base_checkpoint", "base_checkpoint", "the Wan "
                       "fine-tuning stage needs a Wan DiT export (python -m "
                       "mirage_jax.convert_wan)")
    model = nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
    _, trainable, rest = nnx.split(model, self.trainable, ...)
    shard = self.frozen_shardings(mesh, rules)["base"]
    t_specs = nnx.get_partition_spec(trainable).to_pure_dict()
    t_abs = trainable.to_pure_dict()
    with sharding.use_rules(rules):
      t_shard = sharding.logical_to_sharding(t_specs, mesh, rules, t_abs)
    abstract = {}
    for tree, sh in ((rest.to_pure_dict(), shard), (t_abs, t_shard)):
      flat_a, flat_s = self.wm.flat_paths(tree), self.wm.flat_paths(sh)
      for p, a in flat_a.items():
        abstract[p] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_s[p])
    loaded = self.wm.load_dit_params(d.base_checkpoint, self.cfg, abstract)
    base_paths = set(self.wm.flat_paths(rest.to_pure_dict()))
    missing = sorted(base_paths - set(loaded))
    if missing:
      raise InputError(d.base_checkpoint, "/".join(missing[0]), "missing from the base export "
                       f"(and not trained by train_stages {tuple(d.train_stages)}): "
                       f"{len(missing)} frozen params absent")
    base = self.wm.nest({p: v for p, v in loaded.items() if p in base_paths})
    initial = {p: v for p, v in loaded.items() if p not in base_paths}
    self.initial_params = self.wm.nest(initial) if initial else None
    replicated = NamedSharding(mesh, PartitionSpec())
    self.frozen = {"base": base,
                   "control": jax.device_put(self._control(), replicated),
                   "empty_text": jax.device_put(self._empty_text(), replicated)}
    logging.info("Wan base from %s: %d frozen params; %d trainable params start from it",
                 d.base_checkpoint, len(base_paths), len(initial))

  def _data_side(self, name: str):
    if self.config.data.dataset != "wan_latents":
      return None
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    return latent_clips.load_side_array(self.config.data.data_dir, name)

  def _control(self) -> np.ndarray:
    """(Tl + Pl, h, w, 48): the dataset's control_latents.npy, else encoded with the VAE
    export ``config.denoiser.autoencoder_checkpoint``."""
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    want = (self.num_target + self.num_preceding,) + self.latent_hw + (48,)
    control = self._data_side(latent_clips.CONTROL)
    if control is not None:
      if control.shape != want:
        raise InputError(os.path.join(self.config.data.data_dir, latent_clips.CONTROL),
                         "control_latents", f"shape {control.shape}, the config needs {want}")
      return np.asarray(control, np.float32)
    from data_pipelines import encode_latents  # pylint: disable=g-import-not-at-top
    vae, _ = encode_latents.load_vae(self.config.denoiser.autoencoder_checkpoint)
    return np.asarray(self.wm.control_latents(vae, want[0], *self.latent_hw))

  def _empty_text(self) -> np.ndarray:
    """(Lt, D): ``config.denoiser.empty_text`` (.npy), else the dataset's empty_text.npy,
    else zeros (an approximation: umT5's embedding of "" is not zero)."""
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    d = self.config.denoiser
    want = (d.text_len, self.cfg.text_dim)
    where = d.empty_text
    empty = (latent_clips.load_side_array(os.path.dirname(where) or ".",
                                          os.path.basename(where)) if where
             else self._data_side(latent_clips.EMPTY_TEXT))
    if where and empty is None:
      raise InputError(where, "empty_text", "no such file")
    if empty is None:
      logging.warning("no empty-prompt embedding: dropped captions become zeros")
      return np.zeros(want, np.float32)
    if empty.shape != want:
      raise InputError(where or self.config.data.data_dir, "empty_text", f"shape "
                       f"{empty.shape}, the config needs {want}")
    return np.asarray(empty, np.float32)

  # --------------------------------------------------------------------------- input

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(f for f in self.FIELDS if f != "reference_latents" or self.num_reference)

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    b = self.config.data.batch_size
    h, w = self.latent_hw
    tl, pl, r = self.num_target, self.num_preceding, self.num_reference
    f = tl + pl
    return {"target_latents": ((b, tl, h, w, 48), jnp.float32),
            "preceding_latents": ((b, pl, h, w, 48), jnp.float32),
            "reference_latents": ((b, r, h, w, 48), jnp.float32),
            "depths": ((b, f, h, w), jnp.float32), "static_masks": ((b, f, h, w), jnp.uint8),
            "intrinsics": ((b, f, 3, 3), jnp.float32), "poses_c2w": ((b, f, 4, 4), jnp.float32),
            "text": ((b, self.config.denoiser.text_len, self.cfg.text_dim), jnp.float32),
            "has_text": ((b,), jnp.bool_)}

  def check_source(self, source, where: str) -> None:
    """The latent dataset's metadata must match the config's shapes."""
    meta = getattr(source, "metadata", None)
    if meta is None:
      return
    d = self.config.denoiser
    want = dict(target_frames=d.target_frames, preceding_frames=d.preceding_frames,
                latent_hw=list(self.latent_hw), text_len=d.text_len,
                text_dim=self.cfg.text_dim)
    for k, v in want.items():
      if meta.get(k) != v:
        raise InputError(where, k, f"{meta.get(k)!r} in the latent dataset, {v!r} in the "
                         "config")
    if meta.get("num_references", 0) < self.num_reference:
      raise InputError(where, "num_references", f"the dataset has {meta.get('num_references')}"
                       f" references per clip, config.denoiser.reference_frames is "
                       f"{self.num_reference}")

  # --------------------------------------------------------------------------- loss

  def _memory_sources(self) -> list[int]:
    """Indices into [target | preceding] latent frames the memory is written from."""
    tl, pl = self.num_target, self.num_preceding
    return {"first_target": [0], "preceding": list(range(tl, tl + pl)),
            "both": [0] + list(range(tl, tl + pl))}[self.config.denoiser.memory_write]

  def memory_read(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(B, Tl + Pl, h, w, 48) memory read (zeros in holes) and coverage (B, Tl + Pl, h, w)."""
    src = np.asarray(self._memory_sources())
    lat = jnp.concatenate([batch["target_latents"], batch["preceding_latents"]], axis=1)

    def one(lat, depth, static, K, c2w):
      return self.wm.splat_memory(self.memory, self.memory_cfg, lat[src], depth[src],
                                  K[src], c2w[src], static[src].astype(bool), K, c2w)

    return memory_lib.batch_map(one, lat, batch["depths"], batch["static_masks"],
                                batch["intrinsics"], batch["poses_c2w"])

  def loss(self, model, frozen, batch: Batch, rng):
    d = self.config.denoiser
    x0 = batch["target_latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_sig, k_noise, k_drop, k_lora = jax.random.split(rng, 4)
    sigmas = self.wm.sample_sigmas(k_sig, b, self.num_target, d.time_shift, d.first_frame_clean,
                                   *self.noise_levels)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    noisy = self.wm.add_noise(x0, noise, sigmas)
    memory, coverage = self.memory_read(batch)
    vace = self.wm.vace_context(memory, frozen["control"],
                                coverage if d.vace_coverage else None)
    drop = jax.random.bernoulli(k_drop, d.caption_dropout, (b,)) | ~batch["has_text"]
    text = self.wm.caption_or_empty(batch["text"], frozen["empty_text"], drop)
    refs = batch["reference_latents"] if self.num_reference else None
    latents = self.wm.assemble(refs, noisy, batch["preceding_latents"])
    timesteps = self.wm.frame_timesteps(sigmas, self.num_reference, self.num_preceding)
    pred = model(latents, timesteps, text, num_reference=self.num_reference,
                 vace_context=vace, deterministic=False, rngs=nnx.Rngs(dropout=k_lora))
    r = self.num_reference
    loss = self.wm.flow_loss(pred[:, r:r + self.num_target], x0, noise, d.first_frame_clean)
    return loss, {"memory_coverage": coverage.astype(jnp.float32).mean(),
                  "caption_dropped": drop.astype(jnp.float32).mean()}

  def step_flops(self, batch_size: int) -> float:
    h, w = self.latent_hw
    f = self.num_reference + self.num_target + self.num_preceding
    args = (jax.ShapeDtypeStruct((batch_size, f, h, w, 48), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, f), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, self.config.denoiser.text_len, self.cfg.text_dim),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch_size, f - self.num_reference, h, w,
                                  self.cfg.vace_in_channels), jnp.float32))
    fwd = model_flops(lambda: self.build(nnx.Rngs(0)),
                      lambda m, x, t, c, v: m(x, t, c, num_reference=self.num_reference,
                                              vace_context=v), *args)
    # Backward through the whole DiT (the VACE hints feed every later block) is ~2x forward
    # for activations; the frozen weights' gradients are not formed, but the trainable ones
    # are: 3x forward is the usual upper bound.
    return 3.0 * fwd


def noise_levels(config: ml_collections.ConfigDict) -> tuple[str, float]:
  """``config.train.noise_levels`` (default 'per_frame') and ``noise_levels_mixed_prob``
  (default 0.5), checked."""
  tr = config.train
  scheme, prob = tr.get("noise_levels", "per_frame"), tr.get("noise_levels_mixed_prob", 0.5)
  if scheme not in diffusion.NOISE_LEVELS:
    raise InputError("config.train", "noise_levels", f"expected one of "
                     f"{diffusion.NOISE_LEVELS}, got {scheme!r}")
  if not 0.0 <= prob <= 1.0:
    raise InputError("config.train", "noise_levels_mixed_prob", f"must be in [0, 1], got {prob!r}")
  return scheme, float(prob)


def train_memory_config(config: ml_collections.ConfigDict, cfg: memory_lib.MemoryConfig,
                        num_frames: int) -> memory_lib.MemoryConfig:
  """The rollout's memory settings ``cfg`` with a capacity for one training window.

  A window writes ``num_frames`` frames, so it never needs more slots than their points
  (latent pixels; image pixels for ``rgb_points``); the rollout's capacity (131,072 on the
  pods) would only make every read splat empty slots. ``config.memory.train_capacity`` > 0
  sets it; either way it is at most the rollout's, so training never holds more than the
  rollout can.
  """
  from mirage_jax.evaluation import scaling  # pylint: disable=g-import-not-at-top
  n = int(config.memory.get("train_capacity", 0))
  if n < 0:
    raise InputError("config.memory", "train_capacity", f"must be >= 0, got {n}")
  if not n:
    n = scaling.capacity_for(config.memory.backend, num_frames, cfg).get(
        "capacity", num_frames * cfg.latent_height * cfg.latent_width)
  return dataclasses.replace(cfg, capacity=min(n, cfg.capacity))


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None) -> Stage:
  """The stage named by ``config.stage``; the denoiser needs the frozen autoencoder params."""
  if config.stage == "autoencoder":
    return AutoencoderStage(config)
  if config.stage == "denoiser" and config.denoiser.model.get("family") == "wan":
    return WanStage(config, frozen)
  if config.stage == "denoiser":
    if frozen is None:  # loaded by DenoiserStage.load_frozen(mesh), straight into its sharding
      _autoencoder_export(config)
    return DenoiserStage(config, frozen)
  raise InputError("config.stage", "stage", f"expected 'autoencoder' or 'denoiser', got {config.stage!r}")


def _autoencoder_export(config: ml_collections.ConfigDict) -> str:
  path = config.denoiser.autoencoder_checkpoint
  if not path:
    raise InputError("config.denoiser.autoencoder_checkpoint", "autoencoder_checkpoint",
                     "the denoiser stage needs a stage-1 export (python -m mirage_jax.export)")
  return path


def load_frozen_autoencoder(config: ml_collections.ConfigDict,
                            shardings: Any = None) -> Any:
  """Params (float32) of the stage-1 export named by ``config.denoiser.autoencoder_checkpoint``.

  Args:
    shardings: where to restore them (one ``Sharding`` or a matching pytree; see
      ``checkpoint.load_export``); each process reads only its shards, so a mesh-wide
      sharding needs no cross-host transfer. Default: one local device.
  """
  path = _autoencoder_export(config)
  params, ae_config, _ = ckpt_lib.load_export(path, shardings, dtype=jnp.float32)
  # Compare as JSON (the export's config went through JSON: tuples became lists).
  if json.loads(ae_config.autoencoder.to_json()) != json.loads(config.autoencoder.to_json()):
    raise InputError(path, "autoencoder", "the export's autoencoder config differs from "
                     "config.autoencoder")
  return params


# ============================================================================= input


def make_sources(config: ml_collections.ConfigDict) -> dict[str, Sequence[Any]]:
  """Train and validation record sources of ``config.data``, a dataset built beforehand.

  Training never builds data (a pod must not wait on one host rendering clips): a missing
  dataset is an InputError that gives its ``data_pipelines.build`` command.
  """
  d = config.data
  if d.dataset == "wan_latents":  # pre-encoded by data_pipelines.encode_latents
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    return {split: latent_clips.LatentClips(d.data_dir, split) for split in ("train", "validation")}
  builder = builders.make_builder(d.dataset, d.data_dir, d.config_name, **d.build.to_dict())
  if not builders.check_same_params(builder):
    raise InputError(builder.data_path, "config.data", "no dataset built there; build it "
                     f"first: {builders.build_command(builder)}")
  return {split: builder.as_data_source(split) for split in ("train", "validation")}


def make_input(config: ml_collections.ConfigDict, source: Sequence[Any], *, split: str,
               start_step: int = 0, mesh: Mesh | None = None):
  """A Grain iterator of this process's rows of global batches ``start_step, ...``.

  The rows are those this process's devices hold on ``mesh`` (``distributed.process_shard``;
  the same on processes that a model axis spans), unless ``config.data.shard_index`` /
  ``shard_count`` are set; without a mesh, one equal share per process.
  """
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    if split != "train":
      data.shuffle = False
      data.seed = config.data.seed + 1
    if mesh is not None and data.shard_index is None and data.shard_count is None:
      data.shard_index, data.shard_count = distributed.process_shard(
          mesh, batch_axes(mesh, logical_rules(config)), data.batch_size)
  where = f"config.data ({split})"
  if data.dataset == "wan_latents":
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    return iter(latent_clips.from_config(source, data, where=where, start_step=start_step))
  return iter(pipeline.from_config(source, data, where=where, start_step=start_step))


def check_input_rows(config: ml_collections.ConfigDict, mesh: Mesh, num_records: int) -> None:
  """Start-up check on all processes: each feeds the batch rows its devices hold (disjoint,
  or identical across a model axis spanning hosts) from the same data stream."""
  d = config.data
  axes = batch_axes(mesh, logical_rules(config))
  shard = ((d.shard_index, d.shard_count) if d.shard_index is not None
           and d.shard_count is not None else distributed.process_shard(mesh, axes, d.batch_size))
  stream = {k: v for k, v in json.loads(d.to_json_best_effort()).items()
            if k not in ("shard_index", "shard_count", "worker_count", "read_threads",
                         "read_buffer_size", "worker_buffer_size")}
  fingerprint = zlib.crc32(json.dumps([stream, num_records], sort_keys=True).encode())
  distributed.check_process_rows(mesh, axes, d.batch_size, shard, fingerprint)


def abstract_batch(config: ml_collections.ConfigDict, stage: Stage, mesh: Mesh,
                   rules) -> dict[str, jax.ShapeDtypeStruct]:
  """Global batch shapes of the stage's fields (as the pipeline yields them), with shardings.

  frames (B, T, H, W, 3) float32 (uint8 with ``config.data.frames_dtype='uint8'``), depths
  (B, T, H, W) float32, intrinsics (B, T, 3, 3), poses_c2w (B, T, 4, 4) float32,
  dynamic_masks (B, T, H, W) uint8.
  """
  d = config.data
  b, t, (h, w) = d.batch_size, d.num_frames, d.resolution
  frames_dtype = jnp.uint8 if d.get("frames_dtype", "float32") == "uint8" else jnp.float32
  shapes = {"frames": ((b, t, h, w, 3), frames_dtype), "depths": ((b, t, h, w), jnp.float32),
            "intrinsics": ((b, t, 3, 3), jnp.float32), "poses_c2w": ((b, t, 4, 4), jnp.float32),
            "dynamic_masks": ((b, t, h, w), jnp.uint8)}
  if hasattr(stage, "batch_shapes"):
    shapes = stage.batch_shapes()
  axes = batch_axes(mesh, rules)
  split = math.prod(mesh.shape[a] for a in jax.tree.leaves(axes))
  if b % split:
    raise InputError("config.data.batch_size", "batch_size", f"global batch {b} does not split "
                     f"over the {split} devices of the batch mesh axes {axes}")
  return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=distributed.batch_sharding(
      mesh, axes, len(shapes[k][0]))) for k in stage.fields}


# ============================================================================= loop


PEAK_TFLOPS = {  # dense bf16 TFLOP/s per chip, by jax device_kind prefix
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def measure_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
  """Best achieved TFLOP/s of a float32 ``size``^3 matmul on the default device."""
  x = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best / 1e12


def total_peak_tflops(config: ml_collections.ConfigDict) -> float:
  """Peak TFLOP/s of all devices together, for MFU.

  ``config.train.peak_tflops_per_device`` > 0 wins; else a known accelerator's spec sheet;
  on CPU the fake devices share the host's cores, so the peak is one matmul measured now.
  """
  per_device = config.train.peak_tflops_per_device
  kind = jax.devices()[0].device_kind
  if per_device <= 0 and jax.default_backend() == "cpu":
    return measure_matmul_tflops()
  if per_device <= 0:
    per_device = next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), 0.0)
  return per_device * jax.device_count()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       sources: Mapping[str, Sequence[Any]] | None = None) -> dict[str, float]:
  """Trains ``config.stage`` for ``config.train.steps``, resuming from ``workdir`` if possible.

  Args:
    config: a resolved experiment config (see ``experiments/``).
    workdir: checkpoints, metrics (JSONL + TensorBoard), profiles and the config go here.
    sources: ``{"train": records, "validation": records}`` overriding ``config.data``'s
      TFDS dataset (any random-access sequences of clips).
  Returns:
    The metrics of the last logged step.
  """
  if config.train.nonfinite not in ("skip", "halt"):
    raise InputError("config.train.nonfinite", "nonfinite",
                     f"expected 'skip' or 'halt', got {config.train.nonfinite!r}")
  primary = jax.process_index() == 0
  try:  # an unusable workdir (local or gs://) fails here, named, before any work
    paths.makedirs(workdir)
    if primary:  # written whole or not at all: a killed run never leaves half a file
      paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  except Exception as e:  # pylint: disable=broad-except  # OSError, or a Cloud Storage error
    raise InputError(workdir, "workdir", f"cannot write there "
                     f"({getattr(e, 'strerror', None) or e})") from e

  # Before anything compiles: a restarted run loads its executables from the cache.
  aot.enable_compilation_cache(config.get("compilation_cache_dir"))

  # ----------------------------------------------------------------------- mesh
  mesh = build_mesh(config)
  rules = logical_rules(config)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())

  # ----------------------------------------------------------------------- input
  sources = make_sources(config) if sources is None else sources
  checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                       every=config.checkpoint.every, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  # The input position is the step (global batch s is the same examples for any process
  # count), so a run resumes on other process or device counts without iterator state.
  start = checkpointer.latest_step() or 0
  train_iter = make_input(config, sources["train"], split="train", start_step=start, mesh=mesh)
  check_input_rows(config, mesh, len(sources["train"]))

  # ----------------------------------------------------------------------- model & optimizer
  stage = make_stage(config)
  if hasattr(stage, "check_source"):
    stage.check_source(sources["train"], f"{config.data.data_dir} (train)")
  if hasattr(stage, "load_frozen") and stage.frozen is None:
    stage.load_frozen(mesh, rules)  # a large frozen base is restored straight into its shards
  setup = make_setup(config, stage, mesh)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract["params"]))
  logging.info("stage %s: %.2fM trainable parameters", config.stage, num_params / 1e6)
  if primary:
    logging.info("parameter shardings on mesh %s:\n%s", dict(mesh.shape),
                 sharding.sharding_table(setup.abstract["params"], setup.shardings["params"]))

  # ----------------------------------------------------------------------- shard & transfer
  if start:
    state, start = checkpointer.restore(setup.abstract, step=start)
    logging.info("resumed from step %d on %d processes", start, jax.process_count())
  else:
    state, start = init_state(config, stage, setup), 0
  batch_specs = abstract_batch(config, stage, mesh, rules)
  shardings = {k: v.sharding for k, v in batch_specs.items()}
  axes = batch_axes(mesh, rules)
  frozen = jax.device_put(stage.frozen, setup.frozen_sharding())

  # ----------------------------------------------------------------------- update step
  train_step = make_train_step(config, stage, setup, shardings)
  if config.train.get("executable"):  # compiled ahead of time (python -m mirage_jax.aot)
    devices = list(mesh.devices.flat)
    train_step = aot.load_executable(config.train.executable,
                                     aot.executable_key(config, devices, dict(mesh.shape)),
                                     devices)
    logging.info("train step loaded from %s", config.train.executable)
  eval_step = make_eval_step(stage, setup, shardings)
  step_flops = stage.step_flops(config.data.batch_size)
  peak = total_peak_tflops(config)
  writer = metrics_log.MetricsWriter(workdir, tensorboard=config.train.tensorboard,
                                     enabled=primary)
  # Held-out revisit rollouts of the EMA weights at every eval (config.eval.rollouts > 0).
  rollouts = (training_rollouts.TrainingRollouts(config)
              if training_rollouts.check_config(config) and config.eval.every else None)
  preemption = ckpt_lib.PreemptionFlag()
  profile_start, profile_steps = config.train.profile_start, config.train.profile_steps

  # ----------------------------------------------------------------------- loop
  total = config.train.steps
  pending: list[dict] = []  # per-step metrics still on device (no host sync between logs)
  pending_clips: list[np.ndarray] = []  # clip_index of each pending step's batch (names a bad one)
  last = {}
  t_last, step_last = None, start
  data_wait = 0.0  # seconds the loop waited for input since the last log
  to_mesh = lambda local: distributed.global_batch({k: local[k] for k in stage.fields}, mesh,
                                                   axes, config.data.batch_size)
  depth = int(config.train.get("prefetch", 2))
  batches = (prefetch.DevicePrefetch(train_iter, to_mesh, depth) if depth > 0
             else ((local, to_mesh(local)) for local in train_iter))
  step = start
  try:
    while step < total:
      if profile_steps and step == profile_start:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      t_wait = time.perf_counter()
      local, batch = next(batches)
      data_wait += time.perf_counter() - t_wait
      with setup.context():
        state, metrics = train_step(state, batch, frozen)
      step += 1
      pending.append(metrics)
      pending_clips.append(local["clip_index"])
      if profile_steps and step == profile_start + profile_steps:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      if t_last is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(metrics)
        t_last, step_last, data_wait = time.perf_counter(), step, 0.0
      if step % config.train.log_every == 0 or step == total:
        last = _log(config, writer, pending, pending_clips, step, step_last, t_last, total,
                    step_flops, peak, data_wait)
        t_last, step_last, pending, pending_clips = time.perf_counter(), step, [], []
        data_wait = 0.0
      if config.eval.every and (step % config.eval.every == 0 or step == total):
        t_eval = time.perf_counter()
        writer.write_scalars(step, evaluate(config, stage, setup, eval_step, state, frozen,
                                            sources["validation"]))
        if rollouts is not None:
          scalars, videos = eval_rollouts(rollouts, stage, setup, state)
          writer.write_scalars(step, scalars)
          writer.write_videos(step, videos, fps=rollouts.trajectories[0].fps)
        t_last += time.perf_counter() - t_eval  # keep evals out of the step time
      preempted = preemption.reached(step)
      if (pending and config.train.nonfinite == "halt" and (preempted or (
          config.checkpoint.every and step % config.checkpoint.every == 0))):
        _nonfinite_steps(config, jax.device_get(pending), pending_clips, step)  # never save past one
      if preempted:
        checkpointer.save(step, state, config)
        checkpointer.wait()
        logging.warning("preempted: saved step %d, exiting", step)
        break
      checkpointer.save_if_due(step, state, config)
    else:
      if checkpointer.latest_step() != step:
        checkpointer.save(step, state, config)
  finally:
    checkpointer.close()
    writer.close()
    preemption.restore_handler()
  return last


def _nonfinite_steps(config, host: list[dict], clips: list[np.ndarray], step: int) -> list[int]:
  """The steps among ``host`` (metrics of the steps ending at ``step``) that were not finite.

  Args:
    clips: per step, the clip_index (B_local,) of this process's part of its batch.
  Raises:
    FloatingPointError: there is one and ``config.train.nonfinite == 'halt'``; names the
      first such step and its batch.
  """
  first = step - len(host) + 1
  bad = [first + i for i, m in enumerate(host) if m["nonfinite"]]
  if bad and config.train.nonfinite == "halt":
    clip_index = np.asarray(clips[bad[0] - first]).tolist()
    raise FloatingPointError(
        f"step {bad[0]}: non-finite loss or gradient norm on the batch of clip_index "
        f"{clip_index} (config.train.nonfinite='halt'; the state was left unchanged and no "
        f"checkpoint was saved after step {bad[0] - 1})")
  return bad


def device_memory() -> dict[str, float]:
  """Accelerator memory of this process's devices, where the backend reports it ({} on CPU):
  the most any device has in use now and at its peak, and the fraction of its limit."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not stats or any(not s or "bytes_in_use" not in s for s in stats):
    return {}
  out = {"hbm_bytes_in_use": float(max(s["bytes_in_use"] for s in stats))}
  if all("peak_bytes_in_use" in s for s in stats):
    out["hbm_peak_bytes"] = float(max(s["peak_bytes_in_use"] for s in stats))
  if all(s.get("bytes_limit") for s in stats):
    out["hbm_in_use_fraction"] = max(s["bytes_in_use"] / s["bytes_limit"] for s in stats)
  return out


def _log(config, writer, pending, clips, step, step_last, t_last, total, step_flops,
         peak, data_wait: float = 0.0) -> dict:
  """Averages the pending per-step metrics, adds throughput and MFU, writes and logs them.

  Timings come from the host clock between log points (the steps run asynchronously, so no
  step waits for the host): ``step_time_s`` is the wall time per step since the last log,
  ``data_wait_s`` the part of it the loop spent waiting for input (``data_wait``: seconds
  in all), ``mfu`` the analytic FLOPs over the peak; ``hbm_*`` where the backend reports
  memory (:func:`device_memory`).

  Raises:
    FloatingPointError: see ``_nonfinite_steps`` (``clips``: each pending step's clip_index).
  """
  host = jax.device_get(pending)
  bad = _nonfinite_steps(config, host, clips, step)
  finite = [m for m in host if not m["nonfinite"]] or host
  out = {k: float(np.mean([m[k] for m in finite])) for k in host[-1] if k != "nonfinite"}
  out["nonfinite_steps"] = float(len(bad))
  steps_done = step - step_last
  if steps_done > 0:
    seconds = (time.perf_counter() - t_last) / steps_done
    out["step_time_s"] = seconds
    out["examples_per_s"] = config.data.batch_size / seconds
    out["tflops_per_s"] = step_flops / seconds / 1e12
    if peak > 0:
      out["mfu"] = out["tflops_per_s"] / peak
    out["data_wait_s"] = data_wait / steps_done
    eta = _format_eta(seconds * (total - step))
  else:
    eta = "?"
  out.update(device_memory())
  writer.write_scalars(step, out)
  logging.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %s%s eta %s", step, total,
               out["loss"], out["grad_norm"], out["learning_rate"],
               f"{out['step_time_s']:.3f}s/step (data wait {out['data_wait_s']:.3f}s) mfu "
               f"{out.get('mfu', 0):.1%}" if "step_time_s" in out else "",
               f" hbm {out['hbm_bytes_in_use'] / 2**30:.2f} GiB"
               if "hbm_bytes_in_use" in out else "", eta)
  return out


def eval_rollouts(rollouts, stage: Stage, setup: TrainSetup, state: State
                  ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """``rollouts`` (``evaluation.training_rollouts``) of the EMA weights: (scalars, videos).

  Every process gathers the weights to the host and runs the same rollouts (one trajectory
  is one sequential rollout on one device); only process 0's writer writes. A Wan stage's
  trained params go over its frozen base (gathered too), sampled with its empty prompt.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  ema = multihost_utils.process_allgather(state["ema"], tiled=True)
  if isinstance(stage, WanStage):
    frozen = multihost_utils.process_allgather(stage.frozen, tiled=True)
    dn = merge_model(stage, setup.graphdef, ema, frozen)
    return rollouts(None, dn, dict(empty_text=np.asarray(frozen["empty_text"])))
  dn = merge_model(stage, setup.graphdef, ema, None)
  ae = nnx.merge(stage.ae_graphdef, nnx.State(stage.frozen))
  return rollouts(ae, dn)


def evaluate(config, stage: Stage, setup: TrainSetup, eval_step, state: State, frozen,
             source: Sequence[Any]) -> dict[str, float]:
  """Mean loss (and aux metrics) of the EMA params over ``config.eval.batches`` batches."""
  it = make_input(config, source, split="validation", mesh=setup.mesh)
  axes = batch_axes(setup.mesh, setup.rules)
  results = []
  for i in range(config.eval.batches):
    local = next(it)
    batch = distributed.global_batch({k: local[k] for k in stage.fields}, setup.mesh, axes,
                                     config.data.batch_size)
    with setup.context():
      results.append(eval_step(state["ema"], batch, frozen, jax.random.key(i)))
  host = jax.device_get(results)
  return {f"eval_{k}": float(np.mean([r[k] for r in host])) for k in host[0]}
