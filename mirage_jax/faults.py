"""Test-only fault points: the trainer interrupts itself at a named moment.

Fault tests (``tests/test_faults.py``, ``tests/test_checkpoint.py``, ``tests/test_gcs.py``)
need a kill or a SIGTERM at an exact moment of a training run. Rather than race the trainer
from outside (polling its files), they set one environment variable for the trainer process::

  MIRAGE_FAULT_AT=<point>:<step>:<action>

points (where the trainer calls :func:`at`):
  ``step``    after step <step> ran and its metrics (if due) were written, before the loop
              checks for preemption and saves a due checkpoint (``training/loop.py``);
  ``saving``  inside the async checkpoint save of step <step> (``checkpoint.Checkpointer``,
              Orbax's background thread): its arrays are written, Orbax has not committed
              it yet (its temporary folder, or on Cloud Storage its folder without
              ``commit_success.txt``, is on disk). Async saves only (the default).
actions:
  ``kill``    SIGKILL to this process (nothing runs after it);
  ``term``    SIGTERM to this process (what a preemption sends: the loop saves and exits 0);
  ``raise``   raises :class:`FaultInjected` where the point is.

Unset (always, outside tests) every call is one dictionary lookup and does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "MIRAGE_FAULT_AT"
POINTS = ("step", "saving")
ACTIONS = ("kill", "term", "raise")


class FaultInjected(RuntimeError):
  """Raised by the ``raise`` action."""


def spec(point: str, step: int, action: str) -> str:
  """The value of ``MIRAGE_FAULT_AT`` for one fault (checked as :func:`at` checks it)."""
  value = f"{point}:{int(step)}:{action}"
  _parse(value)
  return value


def _parse(value: str) -> tuple[str, int, str]:
  parts = value.split(":")
  if len(parts) != 3 or parts[0] not in POINTS or not parts[1].isdigit() or parts[2] not in ACTIONS:
    raise ValueError(f"{ENV}={value!r}: expected <point>:<step>:<action> with point in "
                     f"{POINTS}, step an integer, action in {ACTIONS}")
  return parts[0], int(parts[1]), parts[2]


def at(point: str, step: int) -> None:
  """Fault point ``point`` at ``step``: acts if ``MIRAGE_FAULT_AT`` names it, else nothing."""
  value = os.environ.get(ENV)
  if not value:
    return
  want_point, want_step, action = _parse(value)
  if (point, int(step)) != (want_point, want_step):
    return
  # Said on stderr first, so a test can tell the fault fired from an unrelated crash.
  print(f"{ENV}={value}: fault injected", file=sys.stderr, flush=True)
  if action == "raise":
    raise FaultInjected(f"{ENV}={value}")
  os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
