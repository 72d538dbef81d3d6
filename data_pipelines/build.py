r"""Builds a posed-clip dataset (TFDS, ArrayRecord) from a renderer or files on disk.

One process:

  python -m data_pipelines.build --dataset=procedural_rooms --data_dir=DIR --num_clips=N \
      [--frames_per_clip=64 --resolution=64 --moving_objects=0 --config_name=default]

Several processes (or machines sharing DIR): run shard k of n in each, then merge once:

  python -m data_pipelines.build ... --num_shards=4 --shard_index=k    # k = 0..3, in parallel
  python -m data_pipelines.build ... --num_shards=4 --merge

Shard k renders the clips with ``index % n == k`` into ``DIR/_shards/k-of-n``; the merge copies
their records (no rendering) into ``DIR/<dataset>/<config_name>/<version>``, equal to a
one-process build. The shard folders stay; delete them once the merge is done.

Files on disk: ``--dataset=posed_files --source_dir=FOLDER`` (geometry.npz / RealEstate10K
.txt; --num_clips=0 takes every file).

Every build writes into a temporary folder renamed into place at the end: a build that dies
leaves nothing that looks complete. A complete dataset with the same parameters is reused; one
with other parameters at the same place is an error and is left untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import tensorflow_datasets as tfds
from absl import app, flags, logging

from mirage_jax.errors import InputError, parse_flags, run_cli

_DATASET = flags.DEFINE_string("dataset", None, "procedural_rooms | memory_maze | posed_files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to build into.")
_CONFIG_NAME = flags.DEFINE_string("config_name", "default", "Name of this dataset config.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 16, "Clips over all splits (posed_files: 0 = all).")
_FRAMES = flags.DEFINE_integer("frames_per_clip", 64, "Frames per clip (renderers).")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Height = width in pixels (renderers).")
_MOVING = flags.DEFINE_integer("moving_objects", 0, "Moving objects per room (procedural_rooms).")
_TRAJECTORY = flags.DEFINE_string("trajectory", "loop", "Camera path (procedural_rooms).")
_MAZE_SIZE = flags.DEFINE_integer("maze_size", 9, "Maze size (memory_maze).")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "Clip i is rendered with seed first_seed + i.")
_SOURCE_DIR = flags.DEFINE_string("source_dir", "", "Folder of clip files (posed_files).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Split the build over this many processes.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard in [0, num_shards).")
_MERGE = flags.DEFINE_bool("merge", False, "Merge the num_shards finished shards into the dataset.")


def shard_data_dir(data_dir: str, shard_index: int, num_shards: int) -> str:
  """Where shard ``shard_index`` of ``num_shards`` is built."""
  return str(Path(data_dir) / "_shards" / f"{shard_index}-of-{num_shards}")


def build(dataset: str, data_dir: str, config_name: str = "default", *, num_shards: int = 1,
          shard_index: int = 0, merge: bool = False, progress: bool = False,
          **params) -> tuple[tfds.core.DatasetBuilder, bool]:
  """Builds, reuses or merges one dataset (see the module docstring).

  Args:
    dataset, data_dir, config_name: which dataset, where.
    num_shards, shard_index, merge: build shard ``shard_index`` of ``num_shards`` alone, or
      merge the finished shards (``merge``), or the whole dataset (``num_shards == 1``).
    progress: show a tqdm bar over the clips.
    **params: ClipsConfig fields (num_clips, frames_per_clip, resolution, ...).
  Returns:
    (builder of the dataset or shard built, True if an existing complete one was reused).
  """
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top

  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise InputError("--shard_index", "shard_index",
                     f"expected 0 <= shard_index < num_shards, got {shard_index} of {num_shards}")

  def make(where, **kwargs):
    return builders.make_builder(dataset, where, config_name, progress=progress, **params, **kwargs)

  if merge:
    shards = [make(shard_data_dir(data_dir, i, num_shards), shard=(i, num_shards)) for i in range(num_shards)]
    builder = make(data_dir, merge_from=[str(s.data_path) for s in shards])
    if not builders.check_same_params(builder):  # Not merged before: all shards must be done.
      for i, shard in enumerate(shards):
        if not builders.check_same_params(shard):
          raise InputError(shard.data_path, "shard", f"missing or incomplete: run "
                           f"--shard_index={i} --num_shards={num_shards} first")
  elif num_shards > 1:
    builder = make(shard_data_dir(data_dir, shard_index, num_shards), shard=(shard_index, num_shards))
  else:
    builder = make(data_dir)
  return builder, builders.prepare(builder)


def main(argv: list[str]) -> int:
  """The CLI: builds as the flags say and prints where the dataset is and its split sizes."""
  if len(argv) > 1:
    raise InputError("command line", "arguments", f"unexpected {argv[1:]} (all options are --flags)")
  for flag in (_DATASET, _DATA_DIR):
    if not flag.value:
      raise InputError(f"--{flag.name}", flag.name, "is required")
  tfds.disable_progress_bar()  # One bar of our own over the clips instead of TFDS's per split.
  if not flags.FLAGS["verbosity"].present:  # TFDS logs routine notes as warnings: keep stderr for errors.
    logging.set_verbosity(logging.ERROR)
  start = time.perf_counter()
  builder, reused = build(
      _DATASET.value, _DATA_DIR.value, _CONFIG_NAME.value, num_shards=_NUM_SHARDS.value,
      shard_index=_SHARD_INDEX.value, merge=_MERGE.value, progress=True,
      num_clips=_NUM_CLIPS.value, frames_per_clip=_FRAMES.value, resolution=_RESOLUTION.value,
      moving_objects=_MOVING.value, trajectory=_TRAJECTORY.value, maze_size=_MAZE_SIZE.value,
      first_seed=_FIRST_SEED.value, source_dir=_SOURCE_DIR.value)
  # A shard may lack a split (TFDS refuses empty ones).
  sizes = ", ".join(f"{s} {builder.info.splits[s].num_examples}"
                    for s in ("train", "validation", "test") if s in builder.info.splits)
  if reused:
    print(f"reused the complete dataset at {builder.data_path} ({sizes}); nothing was built")
  else:
    print(f"built {builder.data_path} ({sizes}) in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: run_cli(lambda: main(argv)), flags_parser=parse_flags)
