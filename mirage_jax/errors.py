"""User-facing errors: one line naming the file (or flag) and the field, then a non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable


class InputError(ValueError):
  """Bad user input: ``<where>: field '<field>': <problem>``.

  ``where`` is a file path, a flag (``--config.train.steps``) or a dataset name.
  """

  def __init__(self, where: str, field: str, problem: str):
    self.where, self.field, self.problem = str(where), field, problem
    super().__init__(f"{where}: field '{field}': {problem}")


def run_cli(main: Callable[[], int | None]) -> None:
  """Run ``main``; an InputError becomes one line on stderr and exit status 2."""
  try:
    code = main()
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)
