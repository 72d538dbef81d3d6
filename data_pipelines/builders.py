"""TFDS builders of posed clips, written as ArrayRecord without TensorFlow.

One builder per source:

* ``procedural_rooms``: ``data_pipelines.procedural.render_clip`` (seed = first_seed + index).
* ``memory_maze``: ``data_pipelines.memory_maze.rollout_clip`` (needs the ``memory_maze`` extra).
* ``posed_files``: every ``geometry.npz`` / RealEstate10K ``.txt`` under ``source_dir``
  (``data_pipelines/files.py``), in sorted path order.
* ``reference_samples``: every sample folder of the reference's data pipeline (``clip.mp4``,
  ``depth.zip``, ``pose.npz``, ... annotated by ViPE; ``data_pipelines/sample_folders.py``)
  under ``source_dir``, in sorted path order. A broken folder is skipped, not fatal: its one-
  line reason (naming the file) is logged as a warning and counted (Beam counter
  ``skipped_clips``); the build goes on with the others.

Each record is one clip in the format of ``data_pipelines/clip.py`` plus three fields; see
``clip_features`` for the feature spec. ``builder.as_data_source(split)`` returns a random-
access source of such dicts of NumPy arrays, ready for ``grain.MapDataset.source``.

Splits: clip ``index`` in ``[0, num_clips)`` goes to ``test`` if it is among the last
``n_eval = max(1, num_clips // 10)`` indices, to ``validation`` if among the ``n_eval`` before
those, else to ``train`` (a function of index and num_clips only, so every worker agrees).

Generation runs on Apache Beam: each split is ``Create(indices) | Reshuffle | Map(make
record)``, so the clips are rendered by whatever runner ``prepare`` is given (in process by
default; ``--direct_num_workers`` processes, or Dataflow / Flink / Spark workers at scale).
Records are keyed by ``index`` and TFDS orders them by a hash of the key, so every runner and
worker count writes the same records in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import files
from data_pipelines.clip import Clip, validate_clip
from mirage_jax import paths
from mirage_jax.errors import InputError

SPLITS = ("train", "validation", "test")
FILE_FORMAT = "array_record"
# Runners whose workers share this machine's disk: a gs:// data_dir is built locally, then
# uploaded (``prepare``).
LOCAL_RUNNERS = ("", "DirectRunner", "PrismRunner")
# Marks a dataset version complete (TFDS's is_prepared, ``load``): uploaded last.
_INFO_FILE = "dataset_info.json"


@dataclasses.dataclass(eq=False)
class ClipsConfig(tfds.core.BuilderConfig):
  """What a dataset holds; each builder reads only the fields in its ``PARAMS``.

  Attributes:
    num_clips: clips in all splits together (posed_files: 0 = every file found).
    frames_per_clip: T (renderers).
    resolution: H = W in pixels (renderers).
    moving_objects: moving objects per procedural room.
    trajectory: procedural camera path ("loop", ...; see data_pipelines.procedural).
    maze_size: Memory Maze size (9, 11, 13, 15).
    first_seed: clip ``index`` i is rendered with seed ``first_seed + i``.
    source_dir: posed_files: the folder searched for clip files.
  """
  num_clips: int = 16
  frames_per_clip: int = 64
  resolution: int = 64
  moving_objects: int = 0
  trajectory: str = "loop"
  maze_size: int = 9
  first_seed: int = 0
  source_dir: str = ""


def split_of(index: int, num_clips: int) -> str:
  """The split of clip ``index`` (see the module docstring)."""
  n_eval = max(1, num_clips // 10)
  if index >= num_clips - n_eval:
    return "test"
  if index >= num_clips - 2 * n_eval:
    return "validation"
  return "train"


def clip_features(num_frames: int | None, height: int | None, width: int | None) -> tfds.features.FeaturesDict:
  """The record spec; ``None`` sizes vary per record.

  frames (T,H,W,3) uint8, depths (T,H,W) float32, intrinsics (T,3,3) float32 (pixels),
  poses_c2w (T,4,4) float32 (OpenCV c2w), fps () float32, dynamic_masks (T,H,W) uint8,
  object_tracks (K,T,3) float32 (K = 0 without moving objects), has_depth () bool (False:
  depths are clip.PLACEHOLDER_DEPTH), depth_valid (T,H,W) uint8 (0 = a depth hole, holding
  the placeholder), caption () text ("" = none; bytes when read; absent from datasets built
  before it: ``record_to_clip`` gives ""), clip_id () text (bytes when read), index () int64.
  """
  t, h, w = num_frames, height, width
  tensor = tfds.features.Tensor
  # Zlib only where it pays: frames and masks compress well, float depth barely does.
  zlib = tfds.features.Encoding.ZLIB
  return tfds.features.FeaturesDict({
      "frames": tensor(shape=(t, h, w, 3), dtype=np.uint8, encoding=zlib),
      "depths": tensor(shape=(t, h, w), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
      "intrinsics": tensor(shape=(t, 3, 3), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
      "poses_c2w": tensor(shape=(t, 4, 4), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
      "fps": tfds.features.Scalar(dtype=np.float32),
      "dynamic_masks": tensor(shape=(t, h, w), dtype=np.uint8, encoding=zlib),
      # Zlib also because TFDS's BYTES decoding fails on an empty (K = 0) variable-shape array.
      "object_tracks": tensor(shape=(None, t, 3), dtype=np.float32, encoding=zlib),
      "has_depth": tfds.features.Scalar(dtype=np.bool_),
      "depth_valid": tensor(shape=(t, h, w), dtype=np.uint8, encoding=zlib),
      "caption": tfds.features.Text(),
      "clip_id": tfds.features.Text(),
      "index": tfds.features.Scalar(dtype=np.int64),
  })


def to_record(clip: Clip, clip_id: str, index: int) -> dict[str, Any]:
  """A validated clip plus ids -> one record of ``clip_features``."""
  t = clip["frames"].shape[0]
  return {
      **{k: clip[k] for k in ("frames", "depths", "intrinsics", "poses_c2w", "fps", "dynamic_masks")},
      "object_tracks": clip.get("object_tracks", np.zeros((0, t, 3), np.float32)),
      "has_depth": bool(clip.get("has_depth", True)),
      "depth_valid": clip.get("depth_valid", np.ones(clip["depths"].shape, np.uint8)),
      "caption": str(clip.get("caption", "")),
      "clip_id": clip_id,
      "index": index,
  }


class _ClipsBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared machinery: config params, splits, the Beam transform of each split."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release: posed clips with depth, poses, masks.",
                   "1.1.0": "A caption per clip (\"\" where the source has none) and the depth "
                            "validity mask depth_valid (0 at depth holes)."}
  # Config fields that define this dataset (stored in metadata.json, compared on reuse).
  PARAMS: tuple[str, ...] = ()

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup touches the `importlib_resources` backport, which is not installed
    # on Python >= 3.9; the class's source file is all it needs.
    return epath.Path(inspect.getfile(cls))

  def params(self) -> dict[str, Any]:
    """The config fields that define the dataset."""
    return {k: getattr(self.builder_config, k) for k in self.PARAMS}

  def _feature_sizes(self) -> tuple[int | None, int | None, int | None]:
    c = self.builder_config
    return c.frames_per_clip, c.resolution, c.resolution

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip().splitlines()[0],
        features=clip_features(*self._feature_sizes()),
        metadata=tfds.core.MetadataDict(params=self.params()),
    )

  def num_clips(self) -> int:
    """Clips in the whole dataset (all splits)."""
    return self.builder_config.num_clips

  def clip_maker(self) -> Callable[[int], tuple[Clip, str]]:
    """A picklable ``index -> (validated clip, clip_id)``; Beam ships it to the workers."""
    raise NotImplementedError

  # True: a clip whose maker raises InputError is skipped (logged, counted), not fatal.
  SKIP_BAD_CLIPS = False

  def _split_generators(self, dl_manager):
    del dl_manager
    n = self.num_clips()
    make = self.clip_maker()
    by_split = {split: [i for i in range(n) if split_of(i, n) == split] for split in SPLITS}
    # TFDS refuses empty splits (posed_files with fewer than 3 files has some).
    return {split: _records_transform(indices, make, self.SKIP_BAD_CLIPS)
            for split, indices in by_split.items() if indices}

  def _generate_examples(self):
    raise NotImplementedError("_split_generators returns the Beam transforms")


def _keyed_record(index: int, make: Callable[[int], tuple[Clip, str]]) -> tuple[int, dict]:
  clip, clip_id = make(index)
  return index, to_record(clip, clip_id, index)


def _keyed_record_or_skip(index: int, make: Callable[[int], tuple[Clip, str]]):
  """[(index, record)], or [] with a logged, counted reason when the clip is bad input."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  try:
    return [_keyed_record(index, make)]
  except InputError as e:
    logging.warning("skipped clip %d: %s", index, e)
    beam.metrics.Metrics.counter("reference_samples", "skipped_clips").inc()
    return []


def _records_transform(indices: list[int], make: Callable[[int], tuple[Clip, str]],
                       skip_bad: bool = False):
  """Beam: () -> (index, record) of each clip index; Reshuffle spreads the clips over workers.

  ``skip_bad``: clips whose maker raises InputError are left out (see SKIP_BAD_CLIPS).
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  if skip_bad:
    return beam.Create(indices) | beam.Reshuffle() | beam.FlatMap(_keyed_record_or_skip, make)
  return beam.Create(indices) | beam.Reshuffle() | beam.Map(_keyed_record, make)


def _procedural_clip(index: int, *, name: str, first_seed: int, frames_per_clip: int,
                     resolution: int, trajectory: str, moving_objects: int) -> tuple[Clip, str]:
  from data_pipelines import procedural  # pylint: disable=g-import-not-at-top
  seed = first_seed + index
  clip = procedural.render_clip(seed, frames_per_clip, resolution, resolution,
                                trajectory=trajectory, moving_objects=moving_objects)
  return validate_clip(clip, f"{name} seed {seed}"), f"seed{seed}"


def _memory_maze_clip(index: int, *, name: str, first_seed: int, frames_per_clip: int,
                      resolution: int, maze_size: int) -> tuple[Clip, str]:
  from data_pipelines import memory_maze  # pylint: disable=g-import-not-at-top
  seed = first_seed + index
  clip = memory_maze.rollout_clip(seed, frames_per_clip, resolution, resolution,
                                  maze_size=maze_size)
  return validate_clip(clip, f"{name} seed {seed}"), f"seed{seed}"


def _file_clip(index: int, *, root: str, paths: tuple[str, ...]) -> tuple[Clip, str]:
  path = Path(paths[index])
  clip = files.load_clip(path)
  t = len(clip["frames"])
  for key in files.KNOWN_FIELDS:  # frames repeated to fill a camera path are no training data
    if key in clip and int(clip[key]) < t:
      raise InputError(path, key, f"only {int(clip[key])} of {t} frames have their own data "
                       "(a generate input made by data_pipelines.make_geometry, not a training clip)")
  return clip, files.clip_name(path, Path(root))


class ProceduralRooms(_ClipsBuilder):
  """Procedural rooms: rendered RGB, exact depth, camera paths, optional moving objects."""

  PARAMS = ("num_clips", "frames_per_clip", "resolution", "moving_objects", "trajectory", "first_seed")

  def clip_maker(self):
    c = self.builder_config
    return functools.partial(_procedural_clip, name=self.name, first_seed=c.first_seed,
                             frames_per_clip=c.frames_per_clip, resolution=c.resolution,
                             trajectory=c.trajectory, moving_objects=c.moving_objects)


class MemoryMaze(_ClipsBuilder):
  """Memory Maze rollouts (MuJoCo): egocentric RGB, depth and camera poses."""

  PARAMS = ("num_clips", "frames_per_clip", "resolution", "maze_size", "first_seed")

  def clip_maker(self):
    # Here, not on a worker: a missing extra or renderer is the user's one-line error.
    from data_pipelines import memory_maze  # pylint: disable=g-import-not-at-top
    memory_maze.require("--dataset")
    c = self.builder_config
    return functools.partial(_memory_maze_clip, name=self.name, first_seed=c.first_seed,
                             frames_per_clip=c.frames_per_clip, resolution=c.resolution,
                             maze_size=c.maze_size)


class PosedFiles(_ClipsBuilder):
  """Posed clips read from geometry.npz / RealEstate10K files, stored at their own size."""

  PARAMS = ("source_dir", "num_clips")

  def _feature_sizes(self):
    return None, None, None

  @staticmethod
  def _find(root: str) -> list:
    """The clip sources under ``root``, in sorted path order."""
    return files.find_clips(root)

  @functools.cached_property
  def _paths(self) -> list:
    root = self.builder_config.source_dir
    found = self._find(root)
    n = self.builder_config.num_clips
    if n > len(found):
      raise InputError(root, "num_clips", f"asked for {n} clips, the folder holds {len(found)}")
    return found[:n] if n else found

  def num_clips(self):
    return len(self._paths)

  def clip_maker(self):
    # Workers read the files by path: at scale the folder must be on storage they all see.
    return functools.partial(_file_clip, root=self.builder_config.source_dir,
                             paths=tuple(str(p) for p in self._paths))


def _sample_folder_clip(index: int, *, root: str, paths: tuple[str, ...]) -> tuple[Clip, str]:
  from data_pipelines import sample_folders  # pylint: disable=g-import-not-at-top
  folder = paths[index]
  return sample_folders.read_sample_folder(folder), sample_folders.folder_id(folder, root)


class ReferenceSamples(PosedFiles):
  """The reference's ViPE-annotated sample folders: video, EXR depth with holes, poses, masks, captions."""

  SKIP_BAD_CLIPS = True

  @staticmethod
  def _find(root: str) -> list[str]:
    from data_pipelines import sample_folders  # pylint: disable=g-import-not-at-top
    return sample_folders.find_sample_folders(root)

  def clip_maker(self):
    sample_folders = importlib.import_module("data_pipelines.sample_folders")
    sample_folders._exr()  # pylint: disable=protected-access  # here: a missing extra is one line
    return functools.partial(_sample_folder_clip, root=self.builder_config.source_dir,
                             paths=tuple(str(p) for p in self._paths))


BUILDERS = {b.name: b for b in (ProceduralRooms, MemoryMaze, PosedFiles, ReferenceSamples)}


# ----------------------------------------------------------------------------- build & load


def make_builder(dataset: str, data_dir: str, config_name: str = "default", **kwargs) -> _ClipsBuilder:
  """A builder for ``dataset`` (a key of BUILDERS) with a ClipsConfig from ``kwargs``.

  ``kwargs`` holds ClipsConfig fields.
  """
  if dataset not in BUILDERS:
    raise InputError("--dataset", "dataset", f"unknown {dataset!r}; expected one of {sorted(BUILDERS)}")
  config = ClipsConfig(name=config_name, **kwargs)
  if dataset not in ("posed_files", "reference_samples") and config.num_clips < 3:
    raise InputError("--num_clips", "num_clips", f"need at least 3 (one per split), got {config.num_clips}")
  return BUILDERS[dataset](data_dir=data_dir, config=config)


def build_command(builder: _ClipsBuilder) -> str:
  """The ``data_pipelines.build`` command line that builds ``builder``'s dataset."""
  args = [f"--dataset={builder.name}", f"--data_dir={builder.data_dir_root}",
          f"--config_name={builder.builder_config.name}"]
  args += [f"--{k}={v}" for k, v in builder.params().items()]
  return "python -m data_pipelines.build " + " ".join(args)


def stored_params(builder: tfds.core.DatasetBuilder) -> dict[str, Any] | None:
  """The params a complete dataset at ``builder.data_path`` was built with; None if absent."""
  if not builder.is_prepared():
    return None
  metadata = epath.Path(builder.data_path) / "metadata.json"  # epath: gs:// too
  if not metadata.is_file():
    raise InputError(builder.data_path, "metadata.json", "missing: not a dataset written by this code")
  return json.loads(metadata.read_text())["params"]


def check_same_params(builder: _ClipsBuilder) -> bool:
  """True if a complete dataset built with ``builder.params()`` sits at its path.

  Returns:
    False if there is no complete dataset there.
  Raises:
    InputError: a complete dataset with other params sits there (it is left untouched).
  """
  stored = stored_params(builder)
  if stored is None:
    return False
  wanted = json.loads(json.dumps(builder.params()))  # Same JSON types as the stored side.
  differ = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  if differ:
    raise InputError(builder.data_path, ", ".join(differ),
                     f"the dataset there was built with {[stored.get(k) for k in differ]}, this "
                     f"build asks for {[wanted.get(k) for k in differ]}; choose another --data_dir "
                     "or --config_name (nothing was changed)")
  return True


# Runners that need more than apache-beam itself: a module to import and Beam's extra for it.
_RUNNER_NEEDS = {
    "DataflowRunner": ("apache_beam.runners.dataflow.internal.apiclient", "gcp"),
}


@contextlib.contextmanager
def _quiet_root_logging():
  """Beam's imports log routine notes (optional GCP clients) that would bury one-line errors."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    yield
  finally:
    root.setLevel(level)


def beam_options(runner: str = "", options: Sequence[str] = ()) -> Any:
  """Beam ``PipelineOptions`` for a build, validated before anything runs.

  Args:
    runner: a Beam runner name (``DirectRunner``, ``DataflowRunner``, ``FlinkRunner``,
      ``SparkRunner``, ... or a fully qualified class); empty: Beam's DirectRunner in process.
    options: Beam pipeline options, each ``--name=value`` or ``name=value`` (e.g.
      ``direct_num_workers=2``, ``direct_running_mode=multi_processing``, ``project=...``).
  Raises:
    InputError: apache-beam, or what the runner needs, is not installed; the runner or an
      option is unknown.
  """
  with _quiet_root_logging():
    try:
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise InputError("--beam_runner", "beam_runner", "dataset builds run on Apache Beam: pip "
                       f"install -e '.[beam]' ({e})") from e
    if runner:
      try:
        beam.runners.create_runner(runner)
      except (ValueError, ImportError, AttributeError) as e:
        raise InputError("--beam_runner", "beam_runner", f"unknown or not installed "
                         f"{runner!r} ({str(e).splitlines()[0]})") from e
      module, extra = _RUNNER_NEEDS.get(runner.rsplit(".", 1)[-1], (None, None))
      try:
        if module:
          importlib.import_module(module)
      except ImportError as e:
        raise InputError("--beam_runner", "beam_runner", f"{runner} needs pip install "
                         f"'apache-beam[{extra}]=={beam.__version__}' ({e})") from e
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  flags = [o if o.startswith("--") else f"--{o}" for o in options if o]
  if runner:
    flags.append(f"--runner={runner}")
  parsed = PipelineOptions(flags)
  known = parsed.get_all_options()
  unknown = sorted(set(parsed.get_all_options(retain_unknown_options=True)) - set(known))
  if unknown:
    raise InputError("--beam_options", ", ".join(unknown), "not a Beam pipeline option")
  return parsed


def prepare(builder: _ClipsBuilder, runner: str = "", options: Sequence[str] = ()) -> bool:
  """Builds the dataset on Beam unless the same one is already complete.

  TFDS writes into a temporary folder and renames it into place at the end, so a build that
  dies leaves no complete-looking dataset.

  A ``gs://`` data_dir with a local runner (``LOCAL_RUNNERS``): built in a local temporary
  folder, then uploaded (``_prepare_and_upload``); a cluster runner's workers write there
  themselves.

  Args:
    builder: from ``make_builder``.
    runner, options: the Beam runner and pipeline options (see ``beam_options``); by default
      the clips are made in this process.
  Returns:
    True if an existing complete dataset was reused, False if it was built now.
  Raises:
    InputError: a complete dataset with other params already sits at the same path (it is
      left untouched); bad Beam runner or options.
  """
  pipeline_options = beam_options(runner, options)
  if check_same_params(builder):
    return True
  builder.num_clips()  # Fails early on bad inputs (posed_files: the source folder).
  config = tfds.download.DownloadConfig(beam_options=pipeline_options)
  try:
    if paths.is_remote(builder.data_dir_root) and runner in LOCAL_RUNNERS:
      _prepare_and_upload(builder, config)
    else:
      builder.download_and_prepare(file_format=FILE_FORMAT, download_config=config)
  except OSError as e:  # data_dir is a file, read-only, full, ...
    raise InputError(builder.data_path, "data_dir", f"cannot build the dataset there "
                     f"({type(e).__name__}: {e})") from e
  return False


def _prepare_and_upload(builder: _ClipsBuilder, config) -> None:
  """Builds ``builder``'s dataset in a local temporary data_dir and uploads it to its URL.

  Cloud Storage has no renames (TFDS writes into a temporary folder and renames it) and
  ArrayRecord writes local files only. So: the same builder class and config build locally
  (the same records), then each file is uploaded, ``dataset_info.json`` last: until it is
  there the dataset is not complete to any reader, and the next build replaces the files.
  """
  remote = os.fspath(builder.data_path)
  root = tempfile.mkdtemp(prefix="mirage_build_")
  try:
    local = type(builder)(data_dir=root, config=builder.builder_config)
    local.download_and_prepare(file_format=FILE_FORMAT, download_config=config)
    paths.remove_tree(remote)  # an upload cut short before (not complete: no dataset_info.json)
    paths.upload_tree(os.fspath(local.data_path), remote, last=(_INFO_FILE,))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  builder.info.read_from_directory(builder.data_path)  # its splits, as the uploaded files say


def load(data_dir: str, dataset: str, config_name: str = "default") -> tfds.core.DatasetBuilder:
  """A read-only builder for a built dataset (features and splits restored from disk).

  ``load(...).as_data_source(split)`` gives the records; the version is the newest on disk.
  """
  root = epath.Path(data_dir) / dataset / config_name
  versions = sorted(root.glob("*.*.*/dataset_info.json"), key=lambda p: tfds.core.Version(p.parent.name))
  if not versions:
    raise InputError(root, "dataset", "no complete dataset here (build it with data_pipelines.build)")
  return tfds.builder_from_directory(str(versions[-1].parent))


def record_to_clip(record: dict[str, Any]) -> Clip:
  """A record read back -> the clip dict with NumPy scalars, ``clip_id`` and ``caption`` as
  str (``caption`` "" in datasets built before the field).

  (``as_data_source`` returns scalars as Python float/bool/int and text as bytes.) Records of
  datasets built before ``depth_valid`` and ``caption`` existed read as all-valid depth and
  an empty caption.
  """
  clip = dict(record)
  clip["fps"] = np.float32(clip["fps"])
  clip["has_depth"] = np.bool_(clip["has_depth"])
  clip["index"] = np.int64(clip["index"])
  for key in ("clip_id", "caption"):
    if isinstance(clip.get(key), bytes):
      clip[key] = clip[key].decode()
  clip.setdefault("caption", "")
  if clip.get("depth_valid") is None:
    clip["depth_valid"] = np.ones(np.shape(clip["depths"]), np.uint8)
  return clip
