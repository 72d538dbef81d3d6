"""Multi-host setup: ``jax.distributed`` from flags or the launcher's environment, global batches.

Three ways a process learns its place in a job, first match wins:

  1. explicit: a coordinator address (flag ``--coordinator_address`` or environment
     ``MIRAGE_COORDINATOR_ADDRESS``) plus the process count and id (flags or
     ``MIRAGE_NUM_PROCESSES`` / ``MIRAGE_PROCESS_ID``); ``launch/local_multiprocess.sh`` uses it;
  2. auto: ``--distributed=auto`` (or ``MIRAGE_DISTRIBUTED=auto``) lets JAX detect the cluster
     (TPU VM workers, GKE/xpk jobs, Slurm), as ``launch/tpu_vm.sh`` and ``launch/slurm.sbatch`` do;
  3. neither: one process, no coordination service.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirage_jax.errors import InputError


def _from_env(value, name: str, cast=str):
  """``value`` unless it is unset (None, '' or -1), else environment ``name`` (or None)."""
  if value not in (None, "", -1):
    return value
  raw = os.environ.get(name, "")
  if raw == "":
    return None
  try:
    return cast(raw)
  except ValueError as e:
    raise InputError(f"${name}", name, f"cannot parse {raw!r}: {e}") from None


def define_flags():
  """Defines the multi-process flags of an entry point; returns ``init()`` that uses them.

  ``--coordinator_address``, ``--num_processes``, ``--process_id`` (each else from the
  environment, see :func:`initialize`) and ``--distributed=off|auto``.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  coordinator = flags.DEFINE_string("coordinator_address", None,
                                    "host:port of process 0 (else $MIRAGE_COORDINATOR_ADDRESS).")
  num_processes = flags.DEFINE_integer("num_processes", None,
                                       "Processes in the job (else $MIRAGE_NUM_PROCESSES).")
  process_id = flags.DEFINE_integer("process_id", None, "This process's id (else $MIRAGE_PROCESS_ID).")
  mode = flags.DEFINE_enum("distributed", None, ["off", "auto"], "'auto': let JAX detect the "
                           "cluster (TPU VM, GKE, Slurm); else $MIRAGE_DISTRIBUTED.")
  return lambda: initialize(coordinator.value, num_processes.value, process_id.value, mode.value)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str | None = None) -> bool:
  """Starts ``jax.distributed`` when configured; returns True when it did.

  Must run before anything touches a JAX backend.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: total processes in the job (explicit mode).
    process_id: this process, in ``[0, num_processes)`` (explicit mode).
    mode: ``'auto'`` to let JAX detect the cluster, ``'off'`` or None otherwise.
  """
  address = _from_env(coordinator_address, "MIRAGE_COORDINATOR_ADDRESS")
  mode = _from_env(mode, "MIRAGE_DISTRIBUTED") or "off"
  if mode not in ("off", "auto"):
    raise InputError("--distributed", "distributed", f"expected 'off' or 'auto', got {mode!r}")
  if address is None and mode == "off":
    return False
  if _cpu_only():
    # CPU collectives across processes need an explicit implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address is None:
    jax.distributed.initialize()
    return True
  count = _from_env(num_processes, "MIRAGE_NUM_PROCESSES", int)
  index = _from_env(process_id, "MIRAGE_PROCESS_ID", int)
  if count is None or index is None:
    raise InputError("--coordinator_address", "num_processes/process_id",
                     "an explicit coordinator needs both the process count and this process's id")
  if not 0 <= index < count:
    raise InputError("--process_id", "process_id", f"{index} not in [0, {count})")
  jax.distributed.initialize(address, num_processes=count, process_id=index)
  return True


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  return platforms.strip() == "cpu"


def batch_sharding(mesh: Mesh, batch_axes: Any, ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over ``batch_axes``, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def batch_rows(mesh: Mesh, batch_axes: Any, batch_size: int) -> dict[int, tuple[int, int]]:
  """The rows ``[first, stop)`` of a global batch that each process's devices hold.

  Processes whose devices differ only along axes outside ``batch_axes`` (a model axis
  spanning hosts) hold the same rows.

  Raises:
    InputError: a process's devices hold rows that are not one contiguous range.
  """
  held: dict[int, set[int]] = {}
  for device, index in batch_sharding(mesh, batch_axes, 1).devices_indices_map(
      (batch_size,)).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(batch_size)))
  rows = {}
  for process, r in sorted(held.items()):
    first, stop = min(r), max(r) + 1
    if len(r) != stop - first:
      raise InputError("config.mesh", "mesh", f"process {process}'s devices hold batch rows "
                       f"{sorted(r)}, not one contiguous range (order the mesh so that each "
                       "host's devices are adjacent along the batch axes)")
    rows[process] = (first, stop)
  return rows


def process_shard(mesh: Mesh, batch_axes: Any, batch_size: int) -> tuple[int, int]:
  """``(shard_index, shard_count)`` of this process: its rows of every global batch are
  ``[shard_index * B / shard_count, (shard_index + 1) * B / shard_count)`` (``B`` =
  ``batch_size``), the rows its devices hold."""
  first, stop = batch_rows(mesh, batch_axes, batch_size)[jax.process_index()]
  rows = stop - first
  if batch_size % rows or first % rows:
    raise InputError("config.mesh", "mesh", f"process {jax.process_index()} holds batch rows "
                     f"[{first}, {stop}) of {batch_size}: not an equal share")
  return first // rows, batch_size // rows


def check_process_rows(mesh: Mesh, batch_axes: Any, batch_size: int, shard: tuple[int, int],
                       fingerprint: int = 0, where: str = "config.data") -> None:
  """Start-up check, on every process at once: each process feeds the rows its devices hold.

  So the rows fed by two processes are disjoint, or identical where a model axis spans
  hosts, and together cover the global batch; and every process reads the same stream.

  Args:
    shard: this process's ``(shard_index, shard_count)`` as its input pipeline uses them.
    fingerprint: a number that must be equal on every process (e.g. a hash of the data
      config and the number of records).
  Raises:
    InputError: naming the first process that feeds other rows, or another stream.
  """
  expected = batch_rows(mesh, batch_axes, batch_size)
  spans = sorted(set(expected.values()))
  if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or sum(b - a for a, b in spans) != batch_size:
    raise InputError("config.mesh", "mesh", f"the processes' batch rows {spans} overlap "
                     f"partially or do not cover the batch of {batch_size}")
  mine = np.asarray([shard[0], shard[1], fingerprint % 2**31], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
  else:
    every = mine[None]
  for process, (index, count, fp) in enumerate(every.tolist()):
    rows = batch_size // count
    fed = (index * rows, (index + 1) * rows)
    if fed != expected[process]:
      raise InputError(where, "shard_index", f"process {process} feeds batch rows "
                       f"[{fed[0]}, {fed[1]}) (shard {index} of {count}) but its devices hold "
                       f"rows [{expected[process][0]}, {expected[process][1]})")
    if fp != every[0][2]:
      raise InputError(where, "data", f"process {process} reads another data stream than "
                       "process 0 (config.data or the number of records differ)")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, batch_axes: Any,
                 batch_size: int | None = None) -> dict[str, jax.Array]:
  """Host-local batch -> one global ``jax.Array`` per field, sharded over ``batch_axes``.

  Args:
    local: field -> (B_local, ...) array: the rows this process's devices hold
      (:func:`process_shard`); processes holding the same rows pass the same data.
    mesh: the device mesh.
    batch_axes: mesh axis name(s) the batch dimension is split over.
    batch_size: the global batch size B (default: ``B_local`` times the number of distinct
      row ranges, as JAX infers it).
  Returns:
    field -> (B, ...) global array.
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shape = None if batch_size is None else (batch_size,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, batch_axes, v.ndim), v, shape)
  return out


# Process 0 may work for long (an export, a pod compile) while the others wait: a barrier of
# the coordination service, which holds no device collective open; a day is the wait's limit.
_WAIT_S = 24 * 3600
_OUTCOME_BYTES = 1 << 16  # room for the JSON of a result or an error, shared by a broadcast


def on_process_zero(fn: Callable[[], Any], name: str, timeout_s: int = _WAIT_S) -> Any:
  """Runs ``fn()`` on process 0 only; every process returns once it has finished.

  For a step that writes one output (an export, a report): with several processes only
  process 0 writes it and the others wait at a barrier. Every process returns process 0's
  result (it must be JSON-serialisable), and a failure there fails every process: process 0
  raises its own error, the others the same ``InputError`` (so every process exits 2) or a
  ``RuntimeError`` naming process 0's.

  Args:
    fn: the work; must not use collectives (the other processes are not in them).
    name: the barrier's name, unique within the job (every process passes the same).
    timeout_s: how long the others wait for process 0.
  """
  if jax.process_count() == 1:
    return fn()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  result, error, outcome = None, None, np.zeros(_OUTCOME_BYTES, np.uint8)
  if jax.process_index() == 0:
    try:
      result = fn()
      outcome = _encode({"result": result})
    except BaseException as e:  # pylint: disable=broad-except  # reported to every process
      error = e
      outcome = _encode({"input": [e.where, e.field, e.problem]} if isinstance(e, InputError)
                        else {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"})
  ocp.multihost.get_barrier_sync_fn(processes=set(range(jax.process_count())))(
      key=f"mirage_jax:{name}", timeout_ms=int(timeout_s * 1000))
  shared = multihost_utils.broadcast_one_to_all(outcome)
  if error is not None:
    raise error
  outcome = json.loads(bytes(np.asarray(shared)).rstrip(b"\0").decode())
  if "input" in outcome:
    raise InputError(*outcome["input"])
  if "error" in outcome:
    raise RuntimeError(f"process 0 failed at {name!r}: {outcome['error']}")
  return outcome["result"]


def _encode(outcome: dict) -> np.ndarray:
  """``outcome`` as JSON in a fixed-size uint8 buffer (every process broadcasts the same shape)."""
  raw = json.dumps(outcome).encode()
  if len(raw) > _OUTCOME_BYTES:
    raise ValueError(f"on_process_zero: a result of {len(raw)} bytes (at most {_OUTCOME_BYTES})")
  out = np.zeros(_OUTCOME_BYTES, np.uint8)
  out[:len(raw)] = np.frombuffer(raw, np.uint8)
  return out
