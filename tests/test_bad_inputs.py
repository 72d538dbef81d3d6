"""Bad-input corpus: config values, command lines, datasets, checkpoints, exports, output
folders, geometry.npz files and videos.

Each case must fail with one ``InputError`` line naming where (file, flag or config field)
and which field, before any training step; command lines must print exactly that line
and exit with status 2. Outputs must never be left half-written: ``test_export_*`` check
the temporary-name-then-rename contract. (``tests/test_files.py`` holds 36 more geometry.npz
/ RealEstate10K / video cases; the figure in BENCHMARKS.md counts both.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import imageio.v3 as iio
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from data_pipelines import builders, files, pipeline
from mirage_jax import checkpoint
from mirage_jax.errors import InputError
from mirage_jax.evaluation import report, revisit
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import stages as small_stages
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.fixtures_util import synthetic_clip
from tests.test_train import synthetic_sources, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY_DATASET = dict(num_clips=3, frames_per_clip=4, resolution=16, moving_objects=2)


# ----------------------------------------------------------------------------- makers


def _config(**fields):
  """tiny_config() with dotted fields replaced, e.g. ``_config(**{"data.crop": "x"})``."""
  c = tiny_config()
  for dotted, value in fields.items():
    *parents, last = dotted.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[last] = value
  return c


def _train(config, workdir):
  return lambda: loop_lib.train_and_evaluate(config, str(workdir), synthetic_sources(4))


def _save_state(config, workdir: Path, *, step: int = 1) -> None:
  """A checkpoint as training writes it (zeros for the arrays), without running a step."""
  stage = step_lib.make_stage(config)
  setup = step_lib.make_setup(config, stage, mesh_lib.build_mesh(config))
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), setup.abstract)
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), every=1, keep=2, async_save=False)
  ckpt.save(step, state, config)
  ckpt.close()


def _other_model_checkpoint(d: Path):
  _save_state(_config(**{"autoencoder.base_channels": 4}), d / "w")
  return _train(tiny_config(), d / "w")


def _truncated_checkpoint(d: Path):
  _save_state(tiny_config(), d / "w")
  metadata = d / "w" / "checkpoints" / "1" / checkpoint.STATE / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
  return _train(tiny_config(), d / "w")


def _export(d: Path, ae_config, name="export") -> Path:
  """An export directory as ``checkpoint.export_params`` writes it, of a random autoencoder."""
  model = nnx.eval_shape(lambda: autoencoder.Autoencoder(ae_config.autoencoder, nnx.Rngs(0)))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                        nnx.state(model, nnx.Param).to_pure_dict())
  out = d / name
  out.mkdir()
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save((out / "params").absolute(), params)
  (out / "config.json").write_text(json.dumps(
      {"config": json.loads(ae_config.to_json()), "step": 1, "source": "ema", "dtype": None}))
  return out


def _denoiser_with_other_autoencoder(d: Path):
  path = _export(d, _config(**{"autoencoder.base_channels": 4}))
  config = _config(stage="denoiser", **{"denoiser.autoencoder_checkpoint": str(path)})
  return lambda: small_stages.load_frozen_autoencoder(config)


def _export_with_bad_json(d: Path):
  (d / "export").mkdir()
  (d / "export" / "config.json").write_text('{"config": {"stage": ')
  return lambda: checkpoint.load_export(str(d / "export"))


def _export_without_params(d: Path):
  (d / "export").mkdir()
  (d / "export" / "config.json").write_text('{"config": {}, "step": 1}')
  return lambda: checkpoint.load_export(str(d / "export"))


def _a_file(d: Path) -> Path:
  (d / "a_file").write_text("not a folder")
  return d / "a_file"


def _built_dataset(d: Path):
  builder = builders.make_builder("procedural_rooms", str(d / "data"), **TINY_DATASET)
  builders.prepare(builder)
  return builder


def _dataset_with_other_params(d: Path):
  _built_dataset(d)
  config = _config(**{"data.data_dir": str(d / "data"), "data.dataset": "procedural_rooms"})
  config.data.build.update(TINY_DATASET, num_clips=4)
  return lambda: inputs_lib.make_sources(config)


def _truncated_dataset_file(d: Path):
  builder = _built_dataset(d)
  for record_file in Path(builder.data_path).glob("*-train.array_record*"):
    record_file.write_bytes(record_file.read_bytes()[: record_file.stat().st_size // 2])
  source = builders.make_builder("procedural_rooms", str(d / "data"),
                                 **TINY_DATASET).as_data_source("train")
  return lambda: next(pipeline.make_iterator(
      source, num_frames=2, stride=1, resolution=(16, 16), batch_size=1, seed=0,
      read_threads=0))


def _empty_source_dir(d: Path):
  (d / "clips").mkdir()
  return lambda: builders.prepare(builders.make_builder(
      "posed_files", str(d / "data"), source_dir=str(d / "clips"), num_clips=0))


def _batch_that_does_not_split(d: Path):
  config = _config(**{"data.batch_size": 12})  # 8 devices on the batch axes
  stage = step_lib.make_stage(config)
  mesh = mesh_lib.build_mesh(config)
  return lambda: inputs_lib.abstract_batch(config, stage, mesh, mesh_lib.logical_rules(config))


def _npz(d: Path, name="geometry.npz", drop=(), **arrays) -> Path:
  clip = {k: v for k, v in synthetic_clip(0, 4, 8, 8).items() if k != "object_tracks"}
  clip.update(arrays)
  for key in drop:
    clip.pop(key)
  np.savez(d / name, **clip)
  return d / name


def _load(path: Path):
  return lambda: files.load_geometry_npz(path)


def _truncated_video(d: Path):
  path = _npz(d, drop=("frames",))
  iio.imwrite(d / "geometry.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=10)
  data = (d / "geometry.mp4").read_bytes()
  (d / "geometry.mp4").write_bytes(data[: len(data) // 2])
  return _load(path)


def _single_npy(d: Path):
  with open(d / "geometry.npz", "wb") as f:
    np.save(f, np.zeros((4, 8, 8), np.float32))
  return _load(d / "geometry.npz")


_K = synthetic_clip(0, 4, 8, 8)["intrinsics"]
_POSES = synthetic_clip(0, 4, 8, 8)["poses_c2w"]

# name: (make(tmp_path) -> a callable that must raise, text `where` must hold, field)
CASES = {
    # config values
    "config_nonfinite_mode": (lambda d: _train(_config(**{"train.nonfinite": "sometimes"}), d),
                              "config.train.nonfinite", "nonfinite"),
    "config_stage": (lambda d: _train(_config(stage="vae"), d), "config.stage", "stage"),
    "config_mesh_device_count": (lambda d: _train(_config(mesh=dict(data=3, fsdp=1, context=1,
                                                                    tensor=1)), d),
                                 "config.mesh", "mesh"),
    "config_mesh_unknown_axis": (lambda d: _train(_config(mesh=dict(pipeline=2, fsdp=-1)), d),
                                 "config.mesh", "pipeline"),
    "config_batch_does_not_split": (_batch_that_does_not_split, "config.data.batch_size",
                                    "batch_size"),
    "config_resolution": (lambda d: _train(_config(**{"data.resolution": (0, 16)}), d),
                          "config.data", "resolution"),
    "config_crop": (lambda d: _train(_config(**{"data.crop": "diagonal"}), d),
                    "config.data", "crop"),
    "config_denoiser_without_autoencoder": (
        lambda d: lambda: step_lib.make_stage(_config(stage="denoiser")),
        "config.denoiser.autoencoder_checkpoint", "autoencoder_checkpoint"),
    "config_dataset_name": (lambda d: lambda: inputs_lib.make_sources(_config(**{
        "data.dataset": "imagenet", "data.data_dir": str(d)})), "--dataset", "dataset"),
    # datasets
    "dataset_built_with_other_params": (_dataset_with_other_params, "procedural_rooms",
                                        "num_clips"),
    "dataset_file_truncated": (_truncated_dataset_file, "clip source record", "record"),
    "dataset_source_dir_empty": (_empty_source_dir, "clips", "source_dir"),
    "dataset_data_dir_is_a_file": (lambda d: lambda: builders.prepare(builders.make_builder(
        "procedural_rooms", str(_a_file(d)), **TINY_DATASET)), "a_file", "data_dir"),
    # checkpoints and exports
    "checkpoint_of_another_model": (_other_model_checkpoint, "checkpoints/1",
                                    "params[dec][0][conv1][bias]"),
    "checkpoint_truncated": (_truncated_checkpoint, "checkpoints/1", "state"),
    "export_without_checkpoints": (lambda d: lambda: checkpoint.export_params(
        str(d), str(d / "out")), "--workdir", "workdir"),
    "export_config_json_missing": (lambda d: lambda: checkpoint.load_export(str(d)),
                                   str(Path("/")), "config.json"),
    "export_config_json_truncated": (_export_with_bad_json, "export/config.json", "config.json"),
    "export_params_missing": (_export_without_params, "export", "params"),
    "export_of_another_autoencoder": (_denoiser_with_other_autoencoder, "export",
                                      "autoencoder"),
    # output folders
    "workdir_under_a_file": (lambda d: _train(tiny_config(), _a_file(d) / "run"), "a_file/run",
                             "workdir"),
    "output_dir_under_a_file": (lambda d: lambda: revisit.prepare_output_dir(
        str(_a_file(d) / "out"), False), "--output_dir", "output_dir"),
    "output_dir_not_empty": (lambda d: _a_file(d) and (lambda: revisit.prepare_output_dir(
        str(d), False)), "--output_dir", "output_dir"),
    "output_file_in_missing_dir": (lambda d: lambda: report.atomic_output(
        str(d / "missing" / "metrics.json")).__enter__(), "metrics.json", "path"),
    # geometry.npz and videos (beyond tests/test_files.py)
    "npz_single_npy_array": (_single_npy, "geometry.npz", "file"),
    "npz_object_array": (lambda d: _load(_npz(d, extra=np.array([{"a": 1}], dtype=object))),
                         "geometry.npz", "extra"),
    "npz_zero_focal_length": (lambda d: _load(_npz(d, intrinsics=_K * np.array(
        [0, 1, 1], np.float32)[:, None])), "geometry.npz", "intrinsics"),
    "npz_pose_last_row": (lambda d: _load(_npz(d, poses_c2w=_POSES + np.eye(4, dtype=np.float32)[
        3:] * 0.5)), "geometry.npz", "poses_c2w"),
    "npz_masks_float": (lambda d: _load(_npz(d, dynamic_masks=np.zeros((4, 8, 8), np.float32))),
                        "geometry.npz", "dynamic_masks"),
    "npz_two_fps": (lambda d: _load(_npz(d, fps=np.array([10.0, 20.0]))), "geometry.npz", "fps"),
    "video_truncated": (_truncated_video, "geometry.mp4", "frames"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_where_and_field(tmp_path, case):
  make, where, field = CASES[case]
  call = make(tmp_path)
  with pytest.raises(InputError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message
  assert where in info.value.where and info.value.field == field, message


# ----------------------------------------------------------------------------- command lines

CLI_CASES = {
    # name: (module, args, text the single stderr line must hold)
    "config_field_that_does_not_exist": (
        "mirage_jax.main", ["--config.data.bogus=1"], "--config.data.bogus: field 'bogus'"),
    "config_value_of_the_wrong_type": (
        "mirage_jax.main", ["--config.train.steps=many"], "--config.train.steps=many"),
    "stray_positional_argument": ("mirage_jax.main", ["100"], "field 'arguments'"),
    "config_file_missing": ("mirage_jax.main", ["--config=experiments/none.py"], "none.py"),
    "config_stage_argument": ("mirage_jax.main", ["--config=experiments/tiny_cpu.py:vae"], "'vae'"),
    "generate_too_few_frames": ("mirage_jax.generate", ["--checkpoint=x", "--geometry_path=y",
                                                        "--num_frames=1"], "--num_frames"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_command_line_error_is_one_line_and_exit_status_2(tmp_path, case):
  module, args, expected = CLI_CASES[case]
  if module == "mirage_jax.main":  # data_dir too: nothing may land in the repository
    config = [a for a in args if a.startswith("--config=")] or ["--config=experiments/tiny_cpu.py"]
    args = [*config, f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path}/data",
            *[a for a in args if not a.startswith("--config=")]]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2, done.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert expected in lines[0], lines[0]
  assert os.listdir(tmp_path) == []  # refused before doing anything


# ----------------------------------------------------------------------------- no half outputs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A training workdir with one checkpoint (zeros, no step run)."""
  path = tmp_path_factory.mktemp("run")
  _save_state(tiny_config(), path)
  return path


def test_export_that_fails_midway_leaves_nothing(workdir, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError("disk full")
  # config.json is the last file an export writes.
  monkeypatch.setattr(checkpoint, "json", types.SimpleNamespace(dump=fail, dumps=fail))
  with pytest.raises(OSError, match="disk full"):
    checkpoint.export_params(str(workdir), str(tmp_path / "export"))
  assert os.listdir(tmp_path) == []  # no export, no temporary folder


def test_export_never_replaces_an_existing_output(workdir, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(InputError, match="already exists"):
    checkpoint.export_params(str(workdir), str(out))
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  fresh = tmp_path / "fresh"
  assert checkpoint.export_params(str(workdir), str(fresh)) == 1
  assert sorted(os.listdir(fresh)) == ["config.json", "params"]
  assert sorted(os.listdir(tmp_path)) == ["export", "fresh"]  # the temporary name is gone
