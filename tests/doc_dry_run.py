"""Checks documented ``python -m <module> --flags...`` commands without running their work.

  python -m tests.doc_dry_run COMMANDS.json

COMMANDS.json is a list of argument lists, each ``["<module>", "--flag=value", ...]``. For
each, in a forked child (the heavy imports are done once, before the forks), the module is
run as ``__main__`` with ``errors.run_app`` replaced by "parse the flags, then check": the
module's own flag parser (``errors.parse_flags``: an unknown flag, a bad value or a config
override naming no field exits 2 with one line), no positional words, every
``--config`` file loaded with its overrides, and the start-up checks each entry point makes
before any work that needs the pod, the bucket or the data (below, ``_CHECKS``). Prints one
JSON line per command: ``{"argv": [...], "status": N, "stderr": "..."}``.

Used by tests/test_doc_commands.py for the commands that need a pod, a cluster or hours.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile


def _config_values() -> list:
  """The parsed ``config_flags`` values (ConfigDicts), loaded with their overrides."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = []
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    if isinstance(value, ml_collections.ConfigDict):
      value.get("stage")  # config_flags defers a file that failed to load to the first read
      out.append(value)
  return out


def _check_main(module_globals) -> None:
  """mirage_jax.main: the stage's own config checks (a denoiser without its autoencoder
  export, window sizes, memory settings) as training makes them before any data or mesh."""
  del module_globals
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mirage_jax import families  # pylint: disable=g-import-not-at-top
  from mirage_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS["config"].value
  if not flags.FLAGS["workdir"].value:
    raise InputError("--workdir", "workdir", "required")
  families.make_stage(config)


def _check_aot(module_globals) -> None:
  """mirage_jax.aot: the topology's devices (libtpu, compile-only) and the config's mesh on
  them; the compile itself (minutes for a pod config) is left out."""
  del module_globals
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mirage_jax import aot  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS["config"].value
  devices = aot.topology_devices(flags.FLAGS["topology"].value, flags.FLAGS["num_slices"].value)
  mesh_lib.build_mesh(config, devices)


def _check_main_job(module_globals) -> None:
  """mirage_jax.main_job: both stages' configs from its ``--config`` (``FILE[:VARIANT]``), as
  the job loads them (``load_configs``)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if flags.FLAGS["family"].value == "small":
    module_globals["load_configs"](flags.FLAGS["config"].value, flags.FLAGS["workdir"].value)


def _check_build(module_globals) -> None:
  """data_pipelines.build: its folders (``check_paths``), the Beam runner, its extra and its options."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  module_globals["check_paths"](f["dataset"].value, f["data_dir"].value, f["source_dir"].value,
                                f["beam_runner"].value)
  builders.beam_options(f["beam_runner"].value, f["beam_options"].value)


def _check_cut_clips(module_globals) -> None:
  """data_pipelines.cut_clips: the clip settings and the Beam runner and its options."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  module_globals["settings"]().check()
  builders.beam_options(flags.FLAGS["beam_runner"].value, flags.FLAGS["beam_options"].value)


_CHECKS = {
    "mirage_jax.main": _check_main,
    "mirage_jax.aot": _check_aot,
    "mirage_jax.main_job": _check_main_job,
    "data_pipelines.build": _check_build,
    "data_pipelines.cut_clips": _check_cut_clips,
}


def _dry(module: str, args: list[str]) -> None:
  """Runs in the child: exits 0 when the command would start, else 2 with one line."""
  from mirage_jax import errors  # pylint: disable=g-import-not-at-top

  def fake_run_app(main):
    rest = errors.parse_flags(sys.argv)

    def check() -> int:
      if len(rest) > 1:
        raise errors.InputError("command line", "arguments", f"unexpected {rest[1:]}")
      _config_values()
      _CHECKS.get(module, lambda g: None)(main.__globals__)
      return 0
    errors.run_cli(check)
    sys.exit(0)

  errors.run_app = fake_run_app  # every command line's entry (imported by it when it runs)
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
  sys.exit(0)  # a module without run_app under __main__


def main() -> None:
  commands = json.loads(open(sys.argv[1]).read())
  # Imported once here, shared by the forked children.
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  import ml_collections  # pylint: disable=g-import-not-at-top,unused-import
  from mirage_jax import errors  # pylint: disable=g-import-not-at-top,unused-import
  for argv in commands:
    with tempfile.TemporaryFile("w+") as err:
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        os.dup2(err.fileno(), 2)
        os.dup2(err.fileno(), 1)
        try:
          _dry(argv[0], argv[1:])
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # pylint: disable=broad-except
          print(f"{type(e).__name__}: {e}", file=sys.stderr)
          code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
      _, status = os.waitpid(pid, 0)
      err.seek(0)
      print(json.dumps({"argv": argv, "status": os.waitstatus_to_exitcode(status),
                        "stderr": err.read()[-3000:]}), flush=True)


if __name__ == "__main__":
  main()
