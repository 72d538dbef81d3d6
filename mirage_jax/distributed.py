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

import os
from typing import Any, Mapping

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


def local_batch_size(global_batch_size: int, where: str = "config.train.batch_size") -> int:
  """This process's share of the global batch (every process loads the same amount)."""
  count = jax.process_count()
  if global_batch_size % count:
    raise InputError(where, "batch_size",
                     f"global batch {global_batch_size} not divisible by {count} processes")
  return global_batch_size // count


def batch_sharding(mesh: Mesh, batch_axes: Any, ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over ``batch_axes``, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, batch_axes: Any) -> dict[str, jax.Array]:
  """Host-local batch -> one global ``jax.Array`` per field, sharded over ``batch_axes``.

  Args:
    local: field -> (B_local, ...) array; process ``p`` holds rows
      ``[p * B_local, (p + 1) * B_local)`` of the global batch.
    mesh: the device mesh.
    batch_axes: mesh axis name(s) the batch dimension is split over.
  Returns:
    field -> (B_local * process_count, ...) global array.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axes, np.ndim(v)),
                                                    np.asarray(v))
          for k, v in local.items()}
