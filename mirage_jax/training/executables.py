"""Compiled train steps kept across runs: JAX's persistent compilation cache, and train steps
serialised to a file (``python -m mirage_jax.aot --save_executable=FILE``) that a run of the
same config, mesh and devices loads instead of compiling (``config.train.executable``).
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import jax
import ml_collections
from flax import traverse_util
from jax.experimental import serialize_executable

from mirage_jax.errors import InputError


# ----------------------------------------------------------------------------- compile cache

# Below this compile time an executable is cheaper to rebuild than to read back (JAX's own
# default); the test suite lowers it through $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS.
CACHE_MIN_COMPILE_TIME_S = 1.0


def enable_compilation_cache(directory: str | None,
                             where: str = "config.compilation_cache_dir") -> str | None:
  """Turns on JAX's persistent compilation cache in ``directory`` ('' or None: leave it off).

  A directory already set (``$JAX_COMPILATION_CACHE_DIR``, or an earlier call) wins, so the
  test suite and CI point every process, subprocesses included, at one cache. Call it before
  the first compilation that should be cached. Entries are keyed by the computation, the
  devices, the compile options and the JAX version, so a stale entry is never used.

  Returns:
    The directory in use, or None.
  Raises:
    InputError: the directory cannot be created.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not directory:
    return None
  path = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise InputError(where, "compilation_cache_dir", f"cannot create {path} "
                     f"({e.strerror or e})") from None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_TIME_S)
  return path


# ----------------------------------------------------------------------------- executables

# /2: the step takes the run's length as a fourth input (step.TrainStep); /1 files had it
# compiled in.
EXECUTABLE_FORMAT = "mirage_jax.aot.executable/2"
# Config fields that never reach the compiled step: where files are, how long to run (an
# input of the step), how often to log, save or evaluate, how the host reads data, and the
# checkpoints whose params are step inputs.
_RUN_ONLY_FIELDS = (
    "compilation_cache_dir", "train.executable", "train.steps", "train.log_every",
    "train.tensorboard", "train.profile_start", "train.profile_steps", "train.prefetch",
    "train.nonfinite", "train.peak_tflops_per_device", "checkpoint.", "eval.", "data.data_dir",
    "data.dataset", "data.config_name", "data.build.", "data.seed", "data.shuffle",
    "data.num_epochs", "data.shard_index", "data.shard_count", "data.worker_count",
    "data.worker_buffer_size", "data.read_threads", "data.read_buffer_size",
    "denoiser.autoencoder_checkpoint", "denoiser.base_checkpoint", "denoiser.empty_text",
    "denoiser.text_encoder", "denoiser.tokenizer")


def executable_key(config: ml_collections.ConfigDict, devices: list[Any],
                   mesh_shape: dict[str, int]) -> dict[str, Any]:
  """What a serialised train step depends on: the compiled config fields (flattened, as
  JSON values), the device platform and count, the mesh and the JAX version."""
  flat = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  fields = {k: v for k, v in sorted(flat.items())
            if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _RUN_ONLY_FIELDS)}
  return {"config": fields, "platform": devices[0].platform, "devices": len(devices),
          "mesh": {k: int(v) for k, v in mesh_shape.items()}, "jax": jax.__version__}


def save_executable(compiled: jax.stages.Compiled, path: str, key: dict[str, Any]) -> int:
  """Writes ``compiled`` (``jit(...).lower(...).compile()``) and its ``key`` to ``path``.

  Returns:
    Bytes written.
  """
  from mirage_jax.atomic import atomic_output  # pylint: disable=g-import-not-at-top
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  blob = pickle.dumps({"format": EXECUTABLE_FORMAT, "key": key, "executable": payload,
                       "in_tree": in_tree, "out_tree": out_tree})
  with atomic_output(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(blob)
  return len(blob)


def load_executable(path: str, key: dict[str, Any], devices: list[Any],
                    where: str = "config.train.executable") -> jax.stages.Compiled:
  """The executable :func:`save_executable` wrote, loaded onto ``devices`` (the mesh's).

  The file is trusted (it holds pickled code, as JAX's own cache does): load only your own.

  Args:
    key: :func:`executable_key` of this run; it must equal the saved one.
  Raises:
    InputError: unreadable, not such a file, or compiled for another config, mesh,
      device platform or count, or JAX version (names the first fields that differ).
  """
  try:
    with open(path, "rb") as f:
      saved = pickle.load(f)
  except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
    raise InputError(path, "executable", f"unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(saved, dict) or saved.get("format") != EXECUTABLE_FORMAT:
    raise InputError(path, "executable", "not a train step written by python -m "
                     "mirage_jax.aot --save_executable")
  if saved["key"] != key:
    old, new = saved["key"], key
    diff = [k for k in ("platform", "devices", "mesh", "jax") if old.get(k) != new.get(k)]
    diff += sorted(k for k in set(old["config"]) | set(new["config"])
                   if old["config"].get(k, "<absent>") != new["config"].get(k, "<absent>"))
    raise InputError(path, diff[0], f"compiled for another setup ({where}); differs in "
                     f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}: recompile "
                     "with python -m mirage_jax.aot --save_executable")
  try:
    return serialize_executable.deserialize_and_load(
        saved["executable"], saved["in_tree"], saved["out_tree"],
        backend=devices[0].client, execution_devices=devices)
  except Exception as e:  # pylint: disable=broad-except  # the runtime refuses it its own way
    raise InputError(path, "executable", f"cannot load it on these devices ({type(e).__name__}"
                     f": {' '.join(str(e).split())[:200]})") from None
