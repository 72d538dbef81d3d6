"""Atomic file output: write to a temporary name beside the target, then rename over it.

A reader never sees a half-written file, and a failed write leaves any previous file as it
was. The one home of this idea: report writers, videos, generated arrays and dataset files
all go through :func:`atomic_output`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from mirage_jax.errors import InputError


def _default_mode() -> int:
  """The mode ``open(path, "w")`` would give a new file: 0o666 minus the process umask."""
  umask = os.umask(0)  # the only portable way to read it is to set it
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside ``path``; on success it replaces ``path``.

  The temporary name keeps ``path``'s extension (writers pick formats by it). The file gets
  the mode a plain write would give it (``mkstemp`` creates 0600, which would leave every
  output private to its writer). On any exception the temporary file is removed and
  ``path`` is left as it was.

  Raises:
    InputError: the directory does not exist or is not writable.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  base, ext = os.path.splitext(os.path.basename(path))
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=directory)
  except OSError as e:
    raise InputError(path, "path", f"cannot create a file in {directory}: "
                     f"{e.strerror or e}") from e
  try:
    os.fchmod(fd, _default_mode())
  finally:
    os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
