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
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import builders
from data_pipelines import pipeline
from mirage_jax import aot
from mirage_jax import checkpoint as ckpt_lib
from mirage_jax import distributed
from mirage_jax import metrics_log
from mirage_jax import paths
from mirage_jax import prefetch
from mirage_jax import rollout
from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.evaluation import training_rollouts
from mirage_jax import families
from mirage_jax.training.stage import Batch, State, Stage, noise_levels, train_memory_config
from mirage_jax.training.flops import PEAK_TFLOPS, jaxpr_flops, measure_matmul_tflops, model_flops, total_peak_tflops
from mirage_jax.families.small.stages import AutoencoderStage, DenoiserStage, load_frozen_autoencoder
from mirage_jax.families.wan.stage import WanStage


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


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None) -> Stage:
  """The stage named by ``config.stage``, from its family (``families.get(config)``); the
  denoiser needs the frozen autoencoder params."""
  if config.stage not in ("autoencoder", "denoiser"):
    raise InputError("config.stage", "stage", f"expected 'autoencoder' or 'denoiser', got {config.stage!r}")
  return families.get(config).make_stage(config, frozen)


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
