"""Device prefetch: the next global batches go to the mesh while the current step runs.

Dispatching a jitted step returns at once, so the host is free while the devices compute.
``DevicePrefetch`` spends that time reading the following host batch and starting its
transfer, so step ``i + 1`` finds its inputs already placed; with ``depth`` 2 a batch has a
whole step to arrive before it is used.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Mapping

import jax


class DevicePrefetch(Iterator[tuple[Mapping[str, Any], dict[str, jax.Array]]]):
  """Iterator of ``(host batch, device batch)`` pairs, in the order of ``host``.

  Each ``next()`` first tops the queue up to ``depth`` placed batches (reading the host
  iterator, then ``to_device``, which only starts the transfers) and then hands out the
  oldest. The host iterator thus runs ``depth`` batches ahead of the step that uses them:
  a run resumes by step (``pipeline.from_config(start_step=...)``), never from this
  iterator's position. An error reading ahead is raised when its batch would have been
  handed out, so a bad record stops the run at the same step as without prefetch.

  Args:
    host: yields host batches (field -> (B_local, ...) NumPy arrays).
    to_device: host batch -> field -> global ``jax.Array`` on the mesh
      (e.g. ``distributed.global_batch``); it must not wait for the transfer.
    depth: batches kept placed ahead (>= 1; 1 overlaps only the host read with the step).
  """

  def __init__(self, host: Iterator[Mapping[str, Any]],
               to_device: Callable[[Mapping[str, Any]], dict[str, jax.Array]], depth: int = 2):
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    self._host, self._to_device, self._depth = host, to_device, depth
    self._queue: collections.deque = collections.deque()
    self._exhausted = False

  def __iter__(self) -> DevicePrefetch:
    return self

  def _fill(self) -> None:
    while not self._exhausted and len(self._queue) < self._depth:
      try:
        local = next(self._host)
        self._queue.append((local, self._to_device(local)))
      except StopIteration:
        self._exhausted = True
      except Exception as e:  # pylint: disable=broad-except  # re-raised in order, below
        self._queue.append(e)
        self._exhausted = True

  def __next__(self) -> tuple[Mapping[str, Any], dict[str, jax.Array]]:
    self._fill()
    if not self._queue:
      raise StopIteration
    item = self._queue.popleft()
    if isinstance(item, Exception):
      raise item
    return item
