r"""Builds a posed-clip dataset (TFDS, ArrayRecord) from a renderer or files on disk, on Beam.

In this process (Beam's DirectRunner, one worker):

  python -m data_pipelines.build --dataset=procedural_rooms --data_dir=DIR --num_clips=N \
      [--frames_per_clip=64 --resolution=64 --moving_objects=0 --config_name=default]

On several local processes, or on a cluster (README: "Dataset builds on Beam"):

  ... --beam_runner=DirectRunner \
      --beam_options=direct_num_workers=8,direct_running_mode=multi_processing
  ... --beam_runner=DataflowRunner --beam_options=project=P,region=R,temp_location=gs://B/tmp,...

Every runner and worker count writes the same records (data_pipelines/builders.py).

Files on disk: ``--dataset=posed_files --source_dir=FOLDER`` (geometry.npz / RealEstate10K
.txt; --num_clips=0 takes every file). The reference's sample folders (clip.mp4, depth.zip,
pose.npz, ...; ``data_pipelines/sample_folders.py``): ``--dataset=reference_samples
--source_dir=FOLDER --num_clips=0`` (needs the ``samples`` extra); a broken folder is skipped
with a warning naming the file, the build goes on. Its FOLDER may be ``gs://bucket/prefix``.

``--data_dir`` may be ``gs://bucket/prefix``: with a local runner the dataset is built in a
local temporary folder, then uploaded (``dataset_info.json`` last, which marks it complete).

Every build writes into a temporary folder renamed into place at the end: a build that dies
leaves nothing that looks complete. A complete dataset with the same parameters is reused; one
with other parameters at the same place is an error and is left untouched.
"""

from __future__ import annotations

import time
from typing import Sequence

import tensorflow_datasets as tfds
from absl import flags, logging

from data_pipelines import builders
from mirage_jax import paths
from mirage_jax.errors import InputError, run_app

_DATASET = flags.DEFINE_string("dataset", None, "procedural_rooms | memory_maze | posed_files | "
                               "reference_samples.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to build into.")
_CONFIG_NAME = flags.DEFINE_string("config_name", "default", "Name of this dataset config.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 16, "Clips over all splits (posed_files, "
                                  "reference_samples: 0 = all).")
_FRAMES = flags.DEFINE_integer("frames_per_clip", 64, "Frames per clip (renderers).")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Height = width in pixels (renderers).")
_MOVING = flags.DEFINE_integer("moving_objects", 0, "Moving objects per room (procedural_rooms).")
_TRAJECTORY = flags.DEFINE_string("trajectory", "loop", "Camera path (procedural_rooms).")
_MAZE_SIZE = flags.DEFINE_integer("maze_size", 9, "Maze size (memory_maze).")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "Clip i is rendered with seed first_seed + i.")
_SOURCE_DIR = flags.DEFINE_string("source_dir", "", "Folder of clip files (posed_files) or sample "
                                  "folders (reference_samples).")
_BEAM_RUNNER = flags.DEFINE_string(
    "beam_runner", "", "Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, "
    "...); empty: Beam's DirectRunner in this process.")
_BEAM_OPTIONS = flags.DEFINE_list(
    "beam_options", [], "Beam pipeline options, comma-separated name=value (e.g. "
    "direct_num_workers=2,direct_running_mode=multi_processing or project=...,region=...).")


# Datasets whose --source_dir may be gs:// with a local runner (their readers read URLs).
REMOTE_SOURCES = ("reference_samples",)


def check_paths(dataset: str, data_dir: str, source_dir: str, runner: str) -> None:
  """Refuses, in one line naming the flag, folders the build cannot use (no I/O).

  With a local runner (``builders.LOCAL_RUNNERS``), ``gs://`` source folders only for
  ``REMOTE_SOURCES`` (posed_files reads local files: copy them down); a ``gs://`` data_dir is
  built locally and uploaded. A cluster runner's workers cannot reach this machine's disk:
  there the folders must be storage every worker reads (README, "Dataset builds on Beam").
  """
  if runner in builders.LOCAL_RUNNERS and dataset not in REMOTE_SOURCES:
    paths.require_local(source_dir, "--source_dir", "copy the folder to a local disk first")


def build(dataset: str, data_dir: str, config_name: str = "default", *, beam_runner: str = "",
          beam_options: Sequence[str] = (), **params) -> tuple[tfds.core.DatasetBuilder, bool]:
  """Builds or reuses one dataset (see the module docstring).

  Args:
    dataset, data_dir, config_name: which dataset, where.
    beam_runner, beam_options: where the clips are made (``builders.beam_options``).
    **params: ClipsConfig fields (num_clips, frames_per_clip, resolution, ...).
  Returns:
    (builder of the dataset, True if an existing complete one was reused).
  """
  builder = builders.make_builder(dataset, data_dir, config_name, **params)
  return builder, builders.prepare(builder, beam_runner, beam_options)


def main() -> int:
  """The CLI: builds as the flags say and prints where the dataset is and its split sizes."""
  for flag in (_DATASET, _DATA_DIR):
    if not flag.value:
      raise InputError(f"--{flag.name}", flag.name, "is required")
  check_paths(_DATASET.value, _DATA_DIR.value, _SOURCE_DIR.value, _BEAM_RUNNER.value)
  for flag in (_SOURCE_DIR, _DATA_DIR):  # a bad bucket: one line now, not a TFDS traceback later
    paths.check_reachable(flag.value or None, f"--{flag.name}")
  tfds.disable_progress_bar()
  if not flags.FLAGS["verbosity"].present:  # TFDS logs routine notes as warnings: keep stderr for errors.
    logging.set_verbosity(logging.ERROR)
  start = time.perf_counter()
  builder, reused = build(
      _DATASET.value, _DATA_DIR.value, _CONFIG_NAME.value, beam_runner=_BEAM_RUNNER.value,
      beam_options=_BEAM_OPTIONS.value,
      num_clips=_NUM_CLIPS.value, frames_per_clip=_FRAMES.value, resolution=_RESOLUTION.value,
      moving_objects=_MOVING.value, trajectory=_TRAJECTORY.value, maze_size=_MAZE_SIZE.value,
      first_seed=_FIRST_SEED.value, source_dir=_SOURCE_DIR.value)
  # posed_files with fewer than 3 files lacks a split (TFDS refuses empty ones).
  sizes = ", ".join(f"{s} {builder.info.splits[s].num_examples}"
                    for s in ("train", "validation", "test") if s in builder.info.splits)
  if reused:
    print(f"reused the complete dataset at {builder.data_path} ({sizes}); nothing was built")
  else:
    print(f"built {builder.data_path} ({sizes}) in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  run_app(main)
