"""TFDS builders and the build CLI: records, splits, reuse, refusal, atomicity, shards + merge."""

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
    return synthetic_clip(seed, num_frames, height, width, moving_objects)

  def rollout_clip(seed, num_frames, height, width, maze_size=9):
    return synthetic_clip(seed + 1000 * maze_size, num_frames, height, width)

  for name, fn in (("procedural", render_clip), ("memory_maze", rollout_clip)):
    module = types.ModuleType(f"data_pipelines.{name}")
    setattr(module, fn.__name__, fn)
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
      for key in CLIP_FIELDS:
        np.testing.assert_array_equal(record[key], clip[key], err_msg=key)
        assert record[key].dtype == np.asarray(clip[key]).dtype, key
  # The read-only loader sees the same dataset without knowing its parameters.
  loaded = builders.load(str(tmp_path), "procedural_rooms")
  assert {s: loaded.info.splits[s].num_examples for s in builders.SPLITS} == {"train": 4, "validation": 1, "test": 1}
  np.testing.assert_array_equal(_records(loaded, "test")[0]["frames"], _records(builder, "test")[0]["frames"])


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
  assert "resolution" in str(info.value) and "default/1.0.0" in str(info.value)
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


def test_shards_then_merge_equal_a_single_build(tmp_path):
  single, _ = build.build("procedural_rooms", str(tmp_path / "single"), **TINY)
  sharded = str(tmp_path / "sharded")
  # 4 shards of 6 clips: some shards have empty validation/test splits.
  for k in range(3):
    build.build("procedural_rooms", sharded, num_shards=4, shard_index=k, **TINY)
  with pytest.raises(InputError, match=r"3-of-4.*field 'shard'.*--shard_index=3"):
    build.build("procedural_rooms", sharded, num_shards=4, merge=True, **TINY)
  build.build("procedural_rooms", sharded, num_shards=4, shard_index=3, **TINY)
  merged, reused = build.build("procedural_rooms", sharded, num_shards=4, merge=True, **TINY)
  assert not reused
  assert merged.info.metadata["params"] == single.info.metadata["params"]
  for split in builders.SPLITS:
    a, b = _records(merged, split), _records(single, split)
    assert [r["clip_id"] for r in a] == [r["clip_id"] for r in b]  # Same order, too.
    for ra, rb in zip(a, b):
      for key in CLIP_FIELDS:
        np.testing.assert_array_equal(ra[key], rb[key])
  assert build.build("procedural_rooms", sharded, num_shards=4, merge=True, **TINY)[1]


def test_bad_shard_and_size_arguments(tmp_path):
  with pytest.raises(InputError, match="shard_index"):
    build.build("procedural_rooms", str(tmp_path), num_shards=2, shard_index=2, **TINY)
  with pytest.raises(InputError, match="num_shards"):
    build.build("procedural_rooms", str(tmp_path), num_shards=8, shard_index=7, **TINY)
  with pytest.raises(InputError, match="num_clips"):
    build.build("procedural_rooms", str(tmp_path), **{**TINY, "num_clips": 2})
  with pytest.raises(InputError, match="dataset"):
    build.build("no_such_dataset", str(tmp_path), **TINY)


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
  assert "procedural_rooms/default/1.0.0" in lines[0] and "field 'resolution'" in lines[0]
  assert _tree_digest(tmp_path) == before


def test_cli_bad_flag_value_exits_non_zero(tmp_path):
  result = _cli("--dataset=procedural_rooms", f"--data_dir={tmp_path}", "--num_clips=1")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --num_clips: field 'num_clips': need at least 3 (one per split), got 1"]


def test_cli_main_builds_shards_and_merges(tmp_path, capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  common = ["prog", "--dataset=procedural_rooms", f"--data_dir={tmp_path}", "--num_clips=6",
            "--frames_per_clip=4", "--resolution=8", "--num_shards=2"]
  with flagsaver.flagsaver():
    for extra in ("--shard_index=0", "--shard_index=1", "--merge", "--merge"):
      flags.FLAGS.unparse_flags()
      argv = flags.FLAGS(common + [extra])
      assert build.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  done = [line for line in out if line.startswith(("built", "reused"))]
  # 6 clips: validation = {4} (shard 0), test = {5} (shard 1); a shard lists only its splits.
  assert done[0].startswith(f"built {tmp_path}/_shards/0-of-2/procedural_rooms/default/1.0.0 (train 2, validation 1) ")
  assert done[1].startswith(f"built {tmp_path}/_shards/1-of-2/procedural_rooms/default/1.0.0 (train 2, test 1) ")
  assert done[2].startswith(f"built {tmp_path}/procedural_rooms/default/1.0.0 (train 4, validation 1, test 1)")
  assert done[3].startswith("reused the complete dataset")
