"""User-facing errors: one line naming the file (or flag) and the field, then a non-zero exit."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")


class InputError(ValueError):
  """Bad user input: ``<where>: field '<field>': <problem>``.

  ``where`` is a file path, a flag (``--config.train.steps``) or a dataset name.
  """

  def __init__(self, where: str, field: str, problem: str):
    self.where, self.field, self.problem = str(where), field, problem
    super().__init__(f"{where}: field '{field}': {problem}")


def settings_dataclass(cls: type[_T], settings: Any, where: str) -> _T:
  """A frozen settings dataclass ``cls`` from itself, an ``ml_collections.ConfigDict`` or a
  mapping; an unknown or missing field is an ``InputError`` at ``where``."""
  if isinstance(settings, cls):
    return settings
  if hasattr(settings, "to_dict"):
    settings = settings.to_dict()
  if not isinstance(settings, Mapping):
    raise InputError(where, "<config>", f"expected a {cls.__name__}, ConfigDict or dict, got "
                     f"{type(settings).__name__}")
  fields = dataclasses.fields(cls)
  known = {f.name for f in fields}
  unknown = sorted(set(settings) - known)
  if unknown:
    raise InputError(where, unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
  missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in settings]
  if missing:
    raise InputError(where, missing[0], "missing")
  return cls(**dict(settings))


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run(main, flags_parser=parse_flags)``: a bad command line is one line and exit 2.

  absl alone reports a bad flag value on two lines with status 1, and ml_collections raises
  a traceback for a config override that names no field (``--config.data.bogus=1``).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    key = str(e).strip("\"'")
    names = [a.split("=")[0] for a in argv[1:] if key in a.split("=")[0].split(".")]
    error = InputError(names[0] if names else "command line", key, "no such config field")
  except Exception as e:  # pylint: disable=broad-except
    # Anything else comes from a flag value or the config file it names (a syntax error,
    # get_config raising): keep the flag's own words and the last line of a traceback.
    head, _, trace = str(e).partition("Traceback (most recent call last):")
    last = [line for line in trace.splitlines() if line.strip()][-1:] or [f"({type(e).__name__})"]
    error = InputError("command line", "flags", " ".join((head + " " + last[0]).split())
                       if trace else f"{type(e).__name__}: {' '.join(head.split())}")
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def load_config_file(path: str, flag: str):
  """The experiment config module at file ``path`` (its ``get_config(arg)`` builds configs).

  Loaded by path, as ml_collections' ``--config`` flag does, so that the library does not
  import ``experiments/``.

  Raises:
    InputError: naming ``flag`` for a missing file, the file for one that fails to load.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(flag, flag.lstrip("-"), f"{path} does not exist")
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: name it
    raise InputError(path, "get_config", f"failed to load: {e}") from e
  return module


def run_cli(main: Callable[[], int | None]) -> None:
  """Run ``main``; an InputError becomes one line on stderr and exit status 2."""
  try:
    code = main()
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)


def run_app(main: Callable[[], int | None]) -> None:
  """A command line's entry (``if __name__ == "__main__": run_app(_main)``): absl parses the
  flags with :func:`parse_flags`, a positional word is refused (every option is a --flag),
  and an InputError from either is one line on stderr and exit status 2."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def entry(argv: list[str]) -> None:
    def checked():
      if len(argv) > 1:  # absl leaves unknown words here; the command would ignore them
        raise InputError("command line", "arguments",
                         f"unexpected {argv[1:]} (all options are --flags)")
      return main()
    run_cli(checked)
  app.run(entry, flags_parser=parse_flags)
