"""The training loop: ``train_and_evaluate`` and what it logs and evaluates.

Reads top to bottom like the loop it runs: workdir and mesh, input, the stage (its family's,
``config.stage``) and its sharded state (restored or initialised), the jitted step (or one
compiled ahead of time), then steps with metrics, MFU, evals, training rollouts, preemption
and checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from mirage_jax import checkpoint as ckpt_lib
from mirage_jax import distributed
from mirage_jax import faults
from mirage_jax import metrics_log
from mirage_jax import paths
from mirage_jax import prefetch
from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.evaluation import training_rollouts
from mirage_jax.training import executables
from mirage_jax.training.flops import total_peak_tflops
from mirage_jax.training.inputs import abstract_batch, check_input_rows, make_input, make_sources
from mirage_jax.training.mesh import batch_axes, build_mesh, logical_rules
from mirage_jax.training.stage import Stage, State
from mirage_jax.training.step import (TrainSetup, init_state, make_eval_step, make_setup,
                                      make_stage, make_train_step)

# The host clock of the step timings (seconds); a test replaces it to check the arithmetic.
_clock = time.perf_counter


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
  executables.enable_compilation_cache(config.get("compilation_cache_dir"))

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
  stage.check_source(sources["train"], f"{config.data.data_dir} (train)")
  if stage.frozen is None:
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
  if config.train.executable:  # compiled ahead of time (python -m mirage_jax.aot)
    devices = list(mesh.devices.flat)
    train_step = train_step.with_executable(executables.load_executable(
        config.train.executable, executables.executable_key(config, devices, dict(mesh.shape)),
        devices))
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
  depth = int(config.train.prefetch)
  batches = (prefetch.DevicePrefetch(train_iter, to_mesh, depth) if depth > 0
             else ((local, to_mesh(local)) for local in train_iter))
  step = start
  try:
    while step < total:
      if profile_steps and step == profile_start:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      t_wait = _clock()
      local, batch = next(batches)
      data_wait += _clock() - t_wait
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
        t_last, step_last, data_wait = _clock(), step, 0.0
      if step % config.train.log_every == 0 or step == total:
        last = _log(config, writer, pending, pending_clips, step, step_last, t_last, total,
                    step_flops, peak, data_wait)
        t_last, step_last, pending, pending_clips = _clock(), step, [], []
        data_wait = 0.0
      if config.eval.every and (step % config.eval.every == 0 or step == total):
        t_eval = _clock()
        writer.write_scalars(step, evaluate(config, stage, setup, eval_step, state, frozen,
                                            sources["validation"]))
        if rollouts is not None:
          scalars, videos = eval_rollouts(rollouts, stage, setup, state)
          writer.write_scalars(step, scalars)
          writer.write_videos(step, videos, fps=rollouts.trajectories[0].fps)
        t_last += _clock() - t_eval  # keep evals out of the step time
      faults.at("step", step)  # test-only (MIRAGE_FAULT_AT); nothing unless set
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


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
    seconds = (_clock() - t_last) / steps_done
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
  is one sequential rollout on one device); only process 0's writer writes. The stage
  turns the weights into the rollouts' arguments (``stage.rollout_args``).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  ema = multihost_utils.process_allgather(state["ema"], tiled=True)
  return rollouts(*stage.rollout_args(setup.graphdef, ema))


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
