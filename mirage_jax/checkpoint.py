"""Orbax checkpoints: train state + config, preemption saves, params export.

Layout of a training workdir::

  <workdir>/config.json            the resolved config (also saved in every checkpoint)
  <workdir>/checkpoints/<step>/    items ``state`` (PyTree) and ``config`` (JSON)

The input position is not saved: it follows from the step (``data_pipelines.pipeline``: global
batch ``s`` is the same examples for any process count), so a run resumes on another number
of processes or devices. A ``data`` item (Grain iterator state, ``process_<i>-of-<n>.json``)
in checkpoints written before that is ignored.

An export (``python -m mirage_jax.export``) is a params-only Orbax PyTree plus the config::

  <export>/params/   <export>/config.json

and :func:`load_export` is the loader the evaluation and generation commands use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mirage_jax import faults
from mirage_jax import paths
from mirage_jax.errors import InputError

STATE, DATA, CONFIG = "state", "data", "config"


# ----------------------------------------------------------------------------- preemption


class PreemptionFlag:
  """Turns SIGTERM into a flag the training loop polls, so it can save and exit cleanly.

  With several processes JAX's own preemption service (started by ``jax.distributed``) sees
  SIGTERM and every process reaches the same sync step; a local handler would let one process
  save alone and the others hang, so it is installed only in single-process runs.
  """

  def __init__(self):
    self._set = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting.")
    self._set.set()

  def reached(self, step: int) -> bool:
    """True when this step is where every process saves because of a preemption."""
    if jax.process_count() > 1:
      return ocp.multihost.reached_preemption(step)
    return self._set.is_set()

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ----------------------------------------------------------------------------- manager


class Checkpointer:
  """A ``CheckpointManager`` with the items of a training run (state and config).

  Args:
    directory: where step directories go (created).
    every: save every this many steps (``save_if_due``).
    keep: how many recent checkpoints to keep.
    async_save: write in a background thread while training goes on.
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.every = int(every)
    self._saving = -1  # the step of the save under way (read by the fault point)
    # Orbax runs this in an async save after the arrays are written, before it commits the
    # step: the test-only fault point "saving" (mirage_jax.faults; nothing unless set).
    at_saving = ocp.AsyncOptions(post_finalization_callback=lambda: faults.at("saving",
                                                                              self._saving))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), enable_async_checkpointing=bool(async_save),
        async_options=at_saving if async_save else None, create=True)
    self.manager = _manager(directory, options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any,
           config: ml_collections.ConfigDict | None = None) -> None:
    """Saves ``state`` (pytree of jax.Arrays) and the config (the input position is the step)."""
    items = {STATE: ocp.args.PyTreeSave(state)}
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(json.loads(config.to_json()))
    self.manager.wait_until_finished()  # as Orbax's save does first: no earlier save is under way
    self._saving = int(step)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def save_if_due(self, step: int, state: Any,
                  config: ml_collections.ConfigDict | None = None) -> bool:
    if self.every > 0 and step % self.every == 0 and step != self.latest_step():
      self.save(step, state, config)
      return True
    return False

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores the state into the shardings of ``abstract_state``.

    The target shardings may differ from the ones saved (another mesh, device or process
    count): Orbax reads each shard's slice from the saved global arrays. The input resumes
    from the returned step (a saved ``data`` item is not read).

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
      step: which step (default: the latest).
    Returns:
      (state, step).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise InputError(str(self.manager.directory), "step", "no checkpoint to restore")
    where = os.path.join(str(self.manager.directory), str(step))
    with _unreadable_as_input_error(where, STATE):
      saved = _tree(self.manager.item_metadata(step)[STATE])
    _check_params_match(saved, abstract_state, where)
    items = {STATE: ocp.args.PyTreeRestore(item=abstract_state,
                                           restore_args=_restore_args(abstract_state))}
    with _unreadable_as_input_error(where, ", ".join(items)):
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], step

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def wait(self) -> None:
    """Blocks until async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def _unreadable_as_input_error(where: str, field: str) -> Iterator[None]:
  """Turns a failure to read a checkpoint (truncated, corrupt, missing item) into InputError."""
  try:
    yield
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore/JSON errors vary
    raise InputError(where, field, f"unreadable checkpoint ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]})") from e


def _check_params_match(saved: Any, abstract: Any, where: str) -> None:
  """Raises InputError unless the saved params have the names and shapes of ``abstract``'s.

  Args:
    saved: metadata tree of a saved train state (``{"params": {...}, ...}``).
    abstract: the train state this config builds (ShapeDtypeStructs).
  """
  # Saved metadata may key list entries by strings ('0'): compare paths as strings.
  paths = lambda tree: {"".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!s}]" for k in p): x
                        for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  have = paths(saved.get("params", {}) if isinstance(saved, dict) else {})
  want = paths(abstract["params"])
  hint = "(a checkpoint of another model config?)"
  for key in sorted(want.keys() - have.keys()):
    raise InputError(where, f"params{key}", f"the model this config builds has it, the "
                     f"checkpoint does not {hint}")
  for key in sorted(have.keys() - want.keys()):
    raise InputError(where, f"params{key}", f"in the checkpoint, not in the model this config "
                     f"builds {hint}")
  for key in sorted(want):
    if tuple(have[key].shape) != tuple(want[key].shape):
      raise InputError(where, f"params{key}", f"saved shape {tuple(have[key].shape)}, the "
                       f"config builds {tuple(want[key].shape)} {hint}")


def _pytree_handler(**kwargs) -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler (``kwargs`` its arguments), for the items this module writes.

  On CPU devices its jax.Array writes are not replica-parallel. Orbax's default splits each
  replicated array among its replicas so that every host writes a part, which pays on a TPU
  pod; on CPU the split is an eager slice per array and replica, two thirds of a save's time
  for nothing (720 replicated arrays on 8 devices: 2.7 s against 0.9 s per save). The files
  are the same format either way (a restore does not care who wrote what).
  """
  if jax.default_backend() != "cpu":
    return ocp.PyTreeCheckpointHandler(**kwargs)
  # orbax-checkpoint is pinned (setup.py): its default jax.Array handler keeps per-host
  # array metadata in this store.
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint._src.metadata import array_metadata_store
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      *[(ty, th.get_type_handler(ty)) for ty in (int, float, bytes, np.number, np.ndarray, str,
                                                 type(ocp.PLACEHOLDER))],
      (jax.Array, th.ArrayHandler(use_replica_parallel=False,
                                  array_metadata_store=array_metadata_store.Store())))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, **kwargs)


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  # Imported here: the commands that only read exports do not need grain.
  import grain  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      paths.resolve(directory), options=options,
      item_handlers={STATE: _pytree_handler(),
                     DATA: grain.checkpoint.CheckpointHandler(),
                     CONFIG: ocp.JsonCheckpointHandler()})


def _restore_args(abstract: Any) -> Any:
  return jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      abstract)


def _tree(metadata: Any) -> Any:
  """The nested-dict tree of a PyTree item's metadata (TreeMetadata or already a tree)."""
  return metadata.tree if hasattr(metadata, "tree") else metadata


def _replicated_abstract(tree_metadata: Any) -> Any:
  """Saved array metadata -> ShapeDtypeStructs on one local device (for exports)."""
  device = jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      tree_metadata)


# ----------------------------------------------------------------------------- export


def export_params(workdir: str, output: str, *, use_ema: bool = True,
                  dtype: str | None = None, step: int | None = None,
                  update_config: Callable[[dict, Any], dict] | None = None,
                  add_files: Callable[[dict], dict[str, np.ndarray]] | None = None) -> int:
  """Writes a params-only checkpoint (EMA by default, optionally cast) for evaluation.

  Runs on the calling process alone, without waiting for the others of a multi-process job
  (``python -m mirage_jax.export`` calls it on process 0 only).

  Args:
    workdir: a training workdir (with ``checkpoints/``).
    output: export directory (must not exist yet).
    use_ema: export the EMA params (else the raw params).
    dtype: e.g. ``'bfloat16'`` to cast floating params, or None to keep them.
    step: which checkpoint (default: the latest).
    update_config: called with the run's config (a JSON dict) and the exported params (host
      arrays) before ``config.json`` is written; returns the config to write (constants
      measured with the trained weights, e.g. a Wan VAE's latent statistics). The export
      stays all-or-nothing: a failure here leaves no export.
    add_files: called with the config to write (after ``update_config``); returns arrays
      saved (``.npy``) under their names in the export beside ``params/`` (e.g. a Wan DiT's
      ``empty_text.npy``), written before ``config.json``. A failure leaves no export.
  Returns:
    The exported step.
  """
  ckpt_dir = paths.join(workdir, "checkpoints")
  if not paths.isdir(ckpt_dir):
    raise InputError("--workdir", "workdir", f"{ckpt_dir} does not exist")
  if paths.is_remote(output) and paths.exists(output) and not paths.exists(
      paths.join(output, "config.json")):
    paths.remove_tree(output)  # a remote export that died before its last file: never loadable
  if paths.exists(output):
    raise InputError("--output", "output", f"{output} already exists")
  # This process alone (with several, ``python -m mirage_jax.export`` runs it on process 0).
  alone = _this_process_only()
  manager = _manager(ckpt_dir, ocp.CheckpointManagerOptions(
      read_only=True, create=False, multiprocessing_options=alone))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise InputError("--workdir", "checkpoints", f"no checkpoint in {ckpt_dir}")
  key = "ema" if use_ema else "params"
  tree = _tree(manager.item_metadata(step)[STATE])
  if key not in tree:
    raise InputError("--workdir", key, f"checkpoint step {step} has no '{key}' item")
  # Only the exported subtree is read: optimizer moments never leave the disk.
  abstract = {key: _replicated_abstract(tree[key])}
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract),
                                    partial_restore=True),
      CONFIG: ocp.args.JsonRestore()}))
  params = restored[STATE][key]
  if dtype is not None:
    target = jnp.dtype(dtype)
    params = jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  manager.close()
  # Host arrays: Orbax saves a process's own jax.Arrays only when every process joins the save,
  # NumPy arrays from one process alone; 1 or N processes write the same export.
  params = jax.device_get(params)
  config = restored[CONFIG]
  if update_config is not None:
    config = update_config(config, params)
  files = add_files(config) if add_files is not None else {}

  def save_files(directory: str) -> None:
    for name, array in files.items():
      with paths.open(paths.join(directory, name), "wb") as f:
        np.save(f, array, allow_pickle=False)

  if paths.is_remote(output):
    # Cloud Storage has no rename: config.json, which load_export needs, is written last.
    with _params_checkpointer(alone) as ckptr:
      ckptr.save(paths.join(output, "params"), params)
    save_files(output)
    paths.write_text(paths.join(output, "config.json"), _export_meta(config, step, key, dtype))
    return int(step)
  # Written under a temporary name beside ``output``, renamed when complete: an export that
  # dies leaves no ``output`` (and no half export that a rerun would refuse to replace).
  tmp = os.path.join(os.path.dirname(os.path.abspath(output)),
                     f".{os.path.basename(os.path.abspath(output))}.{os.getpid()}.tmp")
  try:
    os.makedirs(tmp)
  except OSError as e:
    raise InputError("--output", "output", f"cannot create {output} ({e.strerror or e})") from e
  try:
    with _params_checkpointer(alone) as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
    save_files(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(_export_meta(config, step, key, dtype))
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return int(step)


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for reading and writing from this process alone: no barrier waits for the
  others, and this process is the primary host that finalises what it writes."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _params_checkpointer(options: ocp.options.MultiprocessingOptions) -> ocp.Checkpointer:
  """``ocp.PyTreeCheckpointer()`` (the export's format) with ``options``."""
  return ocp.Checkpointer(_pytree_handler(multiprocessing_options=options),
                          multiprocessing_options=options)


def _export_meta(config: dict, step: int, source: str, dtype: str | None) -> str:
  return json.dumps({"config": config, "step": int(step), "source": source, "dtype": dtype},
                    indent=2)


def write_export(output: str, params: Any, config: dict, *, source: str,
                 dtype: str | None = None) -> None:
  """Writes host ``params`` (a pure dict of numpy arrays) and ``config`` as an export that
  :func:`load_export` reads: the converters' writer (weights from released files).

  Written under a temporary name beside ``output`` and renamed when complete, so a failed
  conversion leaves no half export.

  Args:
    output: local export directory (must not exist yet).
    params: nested dict of arrays (``nnx.State.to_pure_dict()``'s structure).
    config: the export's config (JSON-able dict), e.g. ``{"depth_model": cfg.to_dict()}``.
    source: where the weights came from (recorded in ``config.json``).
    dtype: the dtype the params were cast to (recorded), or None.
  """
  if os.path.exists(output):
    raise InputError("--output", "output", f"{output} already exists")
  parent = os.path.dirname(os.path.abspath(output))
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output))}.{os.getpid()}.tmp")
  try:
    os.makedirs(tmp)
  except OSError as e:
    raise InputError("--output", "output", f"cannot create {output} ({e.strerror or e})") from e
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(_export_meta(config, 0, source, dtype))
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def export_config(path: str) -> ml_collections.ConfigDict:
  """The training config of an export (its ``config.json``, local or ``gs://``), without
  loading the params. Raises an ``InputError`` naming the file when it is missing or
  unreadable."""
  meta_path = paths.join(path, "config.json")
  if not paths.isfile(meta_path):
    raise InputError(path, "config.json", "not an export directory (missing config.json)")
  try:
    with paths.open(meta_path) as f:
      return ml_collections.ConfigDict(json.load(f)["config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(meta_path, "config", f"unreadable ({e})") from None


def load_export(path: str, shardings: Any = None, dtype: Any = None
                ) -> tuple[Any, ml_collections.ConfigDict, int]:
  """Loads an export written by :func:`export_params`.

  Args:
    path: export directory.
    shardings: optional pytree of ``jax.sharding.Sharding`` matching the params, or one
      ``Sharding`` for all of them, to restore each array straight into it (e.g. a mesh
      spanning several processes: each reads only its shards, nothing crosses hosts);
      default: one local device.
    dtype: optional dtype that floating params are cast to as they are read.
  Returns:
    (params pytree of jax.Arrays, config, step).
  """
  meta_path = paths.join(path, "config.json")
  if not paths.exists(meta_path):
    raise InputError(path, "config.json", "not an export directory (missing config.json)")
  with _unreadable_as_input_error(meta_path, "config.json"), paths.open(meta_path) as f:
    meta = json.load(f)
    config, step = ml_collections.ConfigDict(meta["config"]), int(meta["step"])
  params_dir = paths.resolve(paths.join(path, "params"))
  with _unreadable_as_input_error(path, "params"), ocp.PyTreeCheckpointer() as ckptr:
    abstract = _replicated_abstract(_tree(ckptr.metadata(params_dir).item_metadata))
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, abstract)
    if shardings is not None:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    if dtype is not None:
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
          sharding=a.sharding), abstract)
    params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=_restore_args(abstract)))
  return params, config, step
