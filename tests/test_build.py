"""TFDS builders on Beam and the build CLI: records, splits, reuse, refusal, atomicity, workers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_pipelines
from data_pipelines import build, builders, files
from mirage_jax.errors import InputError
from tests.fixtures_util import synthetic_clip

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_clips=6, frames_per_clip=8, resolution=16, moving_objects=2)
CLIP_FIELDS = ("frames", "depths", "intrinsics", "poses_c2w", "fps", "dynamic_masks", "object_tracks")


@pytest.fixture(autouse=True)
def fake_renderers(monkeypatch):
  """Stand-ins for the renderers: synthetic clips that are a function of the seed only.

  Returns:
    The list of seeds rendered so far; a seed in ``fail_on`` raises instead.
  """
  tfds.disable_progress_bar()
  calls = types.SimpleNamespace(seeds=[], fail_on=set())

  def render_clip(seed, num_frames, height, width, *, trajectory="loop", moving_objects=0):
    del trajectory
    if seed in calls.fail_on:
      raise RuntimeError(f"renderer died on seed {seed}")
    calls.seeds.append(seed)
    return {**synthetic_clip(seed, num_frames, height, width, moving_objects),
            "caption": f"room {seed}" if seed % 2 else ""}

  def rollout_clip(seed, num_frames, height, width, maze_size=9):
    return synthetic_clip(seed + 1000 * maze_size, num_frames, height, width)

  for name, fn in (("procedural", render_clip), ("memory_maze", rollout_clip)):
    module = types.ModuleType(f"data_pipelines.{name}")
    setattr(module, fn.__name__, fn)
    module.require = lambda where: None  # the fake renderer needs no extra
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(data_pipelines, name, module, raising=False)
  return calls


def _records(builder, split):
  source = builder.as_data_source(split)
  return [builders.record_to_clip(source[i]) for i in range(len(source))]


def _tree_digest(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_records_equal_the_generated_clips(tmp_path):
  builder, reused = build.build("procedural_rooms", str(tmp_path), **TINY)
  assert not reused
  expected_splits = {"train": [0, 1, 2, 3], "validation": [4], "test": [5]}
  for split, indices in expected_splits.items():
    records = _records(builder, split)
    assert sorted(int(r["index"]) for r in records) == indices
    for record in records:
      i = int(record["index"])
      clip = synthetic_clip(i, 8, 16, 16, moving_objects=2)
      assert record["clip_id"] == f"seed{i}" and record["has_depth"]
      assert record["caption"] == (f"room {i}" if i % 2 else "")
      for key in CLIP_FIELDS:
        np.testing.assert_array_equal(record[key], clip[key], err_msg=key)
        assert record[key].dtype == np.asarray(clip[key]).dtype, key
  # The read-only loader sees the same dataset without knowing its parameters.
  loaded = builders.load(str(tmp_path), "procedural_rooms")
  assert {s: loaded.info.splits[s].num_examples for s in builders.SPLITS} == {"train": 4, "validation": 1, "test": 1}
  np.testing.assert_array_equal(_records(loaded, "test")[0]["frames"], _records(builder, "test")[0]["frames"])


def test_dataset_built_before_captions_reads_empty_captions(tmp_path, monkeypatch):
  """A dataset whose records have no ``caption`` feature (built before it) still loads; its
  clips read back with caption ""."""
  features, to_record = builders.clip_features, builders.to_record

  def without_caption(*a):
    return tfds.features.FeaturesDict({k: v for k, v in features(*a).items() if k != "caption"})

  with monkeypatch.context() as m:
    m.setattr(builders, "clip_features", without_caption)
    m.setattr(builders, "to_record", lambda *a: {k: v for k, v in to_record(*a).items()
                                                 if k != "caption"})
    build.build("procedural_rooms", str(tmp_path), num_clips=3, frames_per_clip=2, resolution=8)
  loaded = builders.load(str(tmp_path), "procedural_rooms")
  assert "caption" not in loaded.info.features
  [clip] = _records(loaded, "test")
  assert clip["caption"] == "" and clip["frames"].shape == (2, 8, 8, 3)


def test_rebuild_with_the_same_config_reuses(tmp_path, fake_renderers):
  build.build("procedural_rooms", str(tmp_path), **TINY)
  before = _tree_digest(tmp_path)
  rendered = len(fake_renderers.seeds)
  builder, reused = build.build("procedural_rooms", str(tmp_path), **TINY)
  assert reused and len(fake_renderers.seeds) == rendered
  assert _tree_digest(tmp_path) == before
  assert builder.info.splits["train"].num_examples == 4


def test_other_config_at_the_same_place_is_refused_and_untouched(tmp_path):
  build.build("procedural_rooms", str(tmp_path), **TINY)
  before = _tree_digest(tmp_path)
  with pytest.raises(InputError) as info:
    build.build("procedural_rooms", str(tmp_path), **{**TINY, "resolution": 8})
  assert "resolution" in str(info.value) and "default/1.1.0" in str(info.value)
  assert _tree_digest(tmp_path) == before
  # Another config name is another dataset, side by side.
  _, reused = build.build("procedural_rooms", str(tmp_path), "small", **{**TINY, "resolution": 8})
  assert not reused


def test_build_that_dies_leaves_no_complete_dataset(tmp_path, fake_renderers):
  fake_renderers.fail_on = {3}
  with pytest.raises(Exception, match="renderer died on seed 3"):
    build.build("procedural_rooms", str(tmp_path), **TINY)
  assert not list(tmp_path.rglob("dataset_info.json"))
  assert not list(tmp_path.rglob("*.array_record*"))
  with pytest.raises(InputError, match="no complete dataset"):
    builders.load(str(tmp_path), "procedural_rooms")
  fake_renderers.fail_on = set()
  _, reused = build.build("procedural_rooms", str(tmp_path), **TINY)
  assert not reused


def _digest(record: dict) -> str:
  """SHA-256 of a decoded record: every field's name, dtype, shape and bytes."""
  h = hashlib.sha256()
  for key, value in sorted(record.items()):
    value = np.ascontiguousarray(value)
    h.update(f"{key}:{value.dtype}:{value.shape}:".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def _content_digests(builder) -> dict[str, list[str]]:
  """Per split, in stored order, the digest of each decoded record.

  Decoded, not raw: the stored proto's map order depends on the writing process's hash seed.
  """
  return {split: [_digest(r) for r in builder.as_data_source(split)] for split in builders.SPLITS}


@pytest.mark.slow  # Starts Beam worker processes.
def test_two_beam_workers_write_the_records_of_one(tmp_path, monkeypatch):
  monkeypatch.undo()  # The real renderer: worker processes do not see the test's stand-ins.
  params = dict(num_clips=5, frames_per_clip=3, resolution=8, moving_objects=1)
  one, _ = build.build("procedural_rooms", str(tmp_path / "one"), **params)
  two, reused = build.build(
      "procedural_rooms", str(tmp_path / "two"), beam_runner="DirectRunner",
      beam_options=["direct_num_workers=2", "direct_running_mode=multi_processing"], **params)
  assert not reused
  assert two.info.metadata["params"] == one.info.metadata["params"]
  a, b = _content_digests(one), _content_digests(two)
  assert {s: len(d) for s, d in a.items()} == {"train": 3, "validation": 1, "test": 1}
  assert a == b  # Same records in the same order.
  assert len({d for ds in a.values() for d in ds}) == 5  # Distinct clips: the hash sees content.


def test_bad_size_and_dataset_arguments(tmp_path):
  with pytest.raises(InputError, match="num_clips"):
    build.build("procedural_rooms", str(tmp_path), **{**TINY, "num_clips": 2})
  with pytest.raises(InputError, match="dataset"):
    build.build("no_such_dataset", str(tmp_path), **TINY)


def test_bad_beam_runner_and_options_are_input_errors(tmp_path, monkeypatch):
  cases = [(dict(beam_runner="NoSuchRunner"), "--beam_runner", "NoSuchRunner"),
           (dict(beam_runner="no_such_package.Runner"), "--beam_runner", "no_such_package"),
           (dict(beam_options=["no_such_option=1"]), "--beam_options", "no_such_option")]
  for kwargs, where, text in cases:
    with pytest.raises(InputError, match=where) as info:
      build.build("procedural_rooms", str(tmp_path), **kwargs, **TINY)
    assert text in str(info.value)
  # A runner whose extra is missing (as DataflowRunner without apache-beam[gcp]).
  monkeypatch.setitem(builders._RUNNER_NEEDS, "DirectRunner", ("no_such_module_for_beam", "gcp"))
  with pytest.raises(InputError, match=r"DirectRunner needs pip install 'apache-beam\[gcp\]=="):
    build.build("procedural_rooms", str(tmp_path), beam_runner="DirectRunner", **TINY)
  # apache-beam itself missing.
  monkeypatch.setitem(sys.modules, "apache_beam", None)
  with pytest.raises(InputError, match=r"\.\[beam\]"):
    build.build("procedural_rooms", str(tmp_path), **TINY)
  assert not list(tmp_path.iterdir())  # Refused before anything was written.


def test_training_refuses_a_missing_dataset_with_its_build_command(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from experiments import tiny_cpu  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config("autoencoder")
  with config.unlocked():
    config.data.dataset, config.data.data_dir = "procedural_rooms", str(tmp_path / "data")
    config.data.build.update(TINY)
  with pytest.raises(InputError, match="no dataset built there") as info:
    inputs_lib.make_sources(config)
  assert not (tmp_path / "data").exists()  # Training built nothing.
  command = str(info.value).split("build it first: ", 1)[1].split()
  assert command[:3] == ["python", "-m", "data_pipelines.build"]
  with flagsaver.flagsaver():  # The command it gives builds exactly the dataset wanted.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *command[3:]])
    assert build.main() == 0
  sources = inputs_lib.make_sources(config)
  assert (len(sources["train"]), len(sources["validation"])) == (4, 1)


def test_memory_maze_builder_passes_maze_size(tmp_path):
  builder, _ = build.build("memory_maze", str(tmp_path), num_clips=3, frames_per_clip=4, resolution=8, maze_size=11)
  record = _records(builder, "test")[0]
  np.testing.assert_array_equal(record["frames"], synthetic_clip(2 + 11000, 4, 8, 8)["frames"])
  assert builder.info.metadata["params"]["maze_size"] == 11


def test_posed_files_builder_reads_npz_and_re10k(tmp_path):
  src = tmp_path / "clips"
  for i in range(3):
    files.save_geometry_npz(src / f"room{i}" / "geometry.npz", synthetic_clip(i, 4, 8, 10 + i))
  from tests.test_files import _write_re10k  # pylint: disable=g-import-not-at-top
  _write_re10k(src / "re10k.txt", synthetic_clip(7, 3, 6, 8))
  builder, _ = build.build("posed_files", str(tmp_path / "data"), num_clips=0, source_dir=str(src))
  records = [r for s in builders.SPLITS for r in _records(builder, s)]
  assert sorted(r["clip_id"] for r in records) == ["re10k.txt", "room0/geometry.npz",
                                                   "room1/geometry.npz", "room2/geometry.npz"]
  for record in records:
    clip = files.load_clip(src / record["clip_id"])
    assert record["has_depth"] == clip["has_depth"] == (record["clip_id"] != "re10k.txt")
    for key in ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks"):
      np.testing.assert_array_equal(record[key], clip[key])


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "data_pipelines.build", *args], cwd=REPO, env=env,
                        capture_output=True, text=True)


def test_cli_refuses_a_different_existing_dataset_with_one_line(tmp_path):
  build.build("procedural_rooms", str(tmp_path), **TINY)
  before = _tree_digest(tmp_path)
  result = _cli("--dataset=procedural_rooms", f"--data_dir={tmp_path}", "--num_clips=6",
                "--frames_per_clip=8", "--resolution=32", "--moving_objects=2")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "procedural_rooms/default/1.1.0" in lines[0] and "field 'resolution'" in lines[0]
  assert _tree_digest(tmp_path) == before


def test_cli_bad_flag_value_exits_non_zero(tmp_path):
  result = _cli("--dataset=procedural_rooms", f"--data_dir={tmp_path}", "--num_clips=1")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --num_clips: field 'num_clips': need at least 3 (one per split), got 1"]


def test_cli_refuses_an_unknown_beam_runner_with_one_line(tmp_path):
  result = _cli("--dataset=procedural_rooms", f"--data_dir={tmp_path}", "--beam_runner=NoSuchRunner")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: --beam_runner: field 'beam_runner': unknown or not installed 'NoSuchRunner'"), result.stderr
  assert not list(tmp_path.iterdir())


def test_cli_main_builds_then_reuses(tmp_path, capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  args = ["prog", "--dataset=procedural_rooms", f"--data_dir={tmp_path}", "--num_clips=6",
          "--frames_per_clip=4", "--resolution=8", "--beam_runner=DirectRunner"]
  with flagsaver.flagsaver():
    for _ in range(2):
      flags.FLAGS.unparse_flags()
      flags.FLAGS(args)
      assert build.main() == 0
  out = capsys.readouterr().out.splitlines()
  done = [line for line in out if line.startswith(("built", "reused"))]
  assert done[0].startswith(f"built {tmp_path}/procedural_rooms/default/1.1.0 (train 4, validation 1, test 1) ")
  assert done[1].startswith("reused the complete dataset")


def _latent_digests(folder: Path) -> dict[str, list[str]]:
  """Per latent-clip file, a SHA-256 of each decoded record (.npz bytes hold zip timestamps)."""
  from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
  from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
  return {path.name: [_digest(latent_clips.decode_record(r))
                      for r in ards.ArrayRecordDataSource([str(path)])]
          for path in sorted(folder.glob("*.array_record"))}


@pytest.mark.slow  # Starts Beam worker processes.
def test_latent_encoding_on_two_beam_workers_writes_the_files_of_one(tmp_path):
  from data_pipelines import encode_latents  # pylint: disable=g-import-not-at-top
  from experiments import wan22_ti2v_5b  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import convert as wan_convert  # pylint: disable=g-import-not-at-top
  from mirage_jax import weight_files  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import original_layout  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  release = tmp_path / "release"
  release.mkdir()
  dit = original_layout.random_original(wan_dit.original_layout(wan_dit.wan_dit_config("tiny")), 0,
                                        keep=lambda k: wan_dit.key_group(k) == "dit")
  vae = original_layout.random_original(wan_vae.original_layout(wan_vae.wan_vae_config("tiny")), 1)
  weight_files.write_safetensors(str(release / "dit.safetensors"), dit)
  weight_files.write_safetensors(str(release / "vae.safetensors"), vae)
  wan_convert.convert(str(tmp_path / "export"), dit=str(release / "dit.safetensors"),
                      vae=str(release / "vae.safetensors"), variant="tiny",
                      configs=wan22_ti2v_5b.export_configs("tiny"))
  build.build("procedural_rooms", str(tmp_path / "data"), num_clips=5, frames_per_clip=6,
              resolution=16)
  common = dict(data_dir=str(tmp_path / "data"), dataset="procedural_rooms", config_name="default",
                vae=str(tmp_path / "export" / "vae"), target_frames=5, preceding_frames=1,
                text_len=2, text_dim=8, num_shards=2)
  one = encode_latents.run(output_dir=str(tmp_path / "one"), **common)
  two = encode_latents.run(output_dir=str(tmp_path / "two"), beam_runner="DirectRunner",
                           beam_options=["direct_num_workers=2",
                                         "direct_running_mode=multi_processing"], **common)
  assert one == two == {"train": 3, "validation": 1}
  a, b = _latent_digests(tmp_path / "one"), _latent_digests(tmp_path / "two")
  # Clip i goes to file i % 2: train clips {0, 2} and {1}, validation clip 0.
  assert {k: len(v) for k, v in a.items()} == {
      "train-00000-of-00002.array_record": 2, "train-00001-of-00002.array_record": 1,
      "validation-00000-of-00002.array_record": 1}
  assert a == b
  with pytest.raises(InputError, match="already holds complete latent clips"):
    encode_latents.run(output_dir=str(tmp_path / "one"), **common)
