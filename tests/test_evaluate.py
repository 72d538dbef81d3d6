"""Evaluation: revisit pairing, the revisit runner (backends, oracle, composite), cost scaling, CLI."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from data_pipelines import procedural
from mirage_jax import geometry, rollout
from mirage_jax.evaluation import report, revisit, scaling
from tests.test_generate import run_cli, save_tiny_export
from tests.test_sample_folders import needs_exr


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return save_tiny_export(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def world(export):
  return rollout.load_world_model(export)


@pytest.fixture(scope="module")
def loop_clip():
  # A 24-frame procedural loop whose last 10 frames revisit the first ones (seed held out of
  # any training set here).
  clip = procedural.render_clip(100001, 24, 32, 32, trajectory="loop")
  return revisit.Trajectory(name="seed100001", fps=10.0, **revisit.fit_clip(clip, (32, 32)))


# ----------------------------------------------------------------------------- pairing


def _walk(xs, yaw_deg=None):
  """Cameras at (x, 1.5, 0) looking along +z (or turned by yaw_deg per frame)."""
  yaw = np.zeros(len(xs)) if yaw_deg is None else np.radians(yaw_deg)
  return np.stack([geometry.look_at([x, 1.5, 0], [x + np.sin(a), 1.5, np.cos(a)], up=(0, 1, 0))
                   for x, a in zip(xs, yaw)])


def test_pairing_out_and_back():
  xs = np.concatenate([np.arange(11) * 0.2, np.arange(9, -1, -1) * 0.2])  # 0..2 m and back
  pairs = revisit.pair_revisits(_walk(xs), max_distance=0.15, max_angle_deg=30, min_gap=4)
  # Frame 10 + k is back at frame 10 - k's place; k = 1 is too close in time (gap 2 < 4).
  # Other frames are 0.2 m from any other place, beyond 0.15 m.
  expected = np.full(21, -1)
  for b in range(12, 21):
    expected[b] = 20 - b
  np.testing.assert_array_equal(pairs, expected)


def test_pairing_picks_the_nearest_first_visit():
  xs = np.array([0.0, 0.1, 0.2, 1.5, 1.5, 1.5, 0.12])
  pairs = revisit.pair_revisits(_walk(xs), max_distance=0.5, min_gap=3)
  assert pairs[-1] == 1  # 0.02 m from frame 1, 0.08 from frame 2, 0.12 from frame 0
  assert np.all(pairs[:-1] == -1)


def test_no_revisit_without_leaving_or_when_facing_away():
  still = _walk(np.zeros(12))
  assert np.all(revisit.pair_revisits(still) == -1)
  # Same place, but it comes back facing the other way: not a revisit of what it saw.
  xs = np.concatenate([np.linspace(0, 2, 6), np.linspace(2, 0, 6)])
  turned = _walk(xs, yaw_deg=np.r_[np.zeros(6), np.full(6, 180.0)])
  assert np.all(revisit.pair_revisits(turned) == -1)


# ----------------------------------------------------------------------------- revisit runner


def test_trivial_composite_reproduces_a_returned_view(loop_clip):
  frames, covered = revisit.trivial_composite(loop_clip)
  assert frames.shape == loop_clip.frames.shape and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames[0], loop_clip.frames[0])
  # The last pose is the first pose: earlier ground-truth points cover it and reproduce it.
  last = loop_clip.poses_c2w[-1]
  np.testing.assert_allclose(last, loop_clip.poses_c2w[0], atol=1e-5)
  assert covered[-1].mean() > 0.9
  err = np.abs(frames[-1].astype(int) - loop_clip.frames[-1].astype(int))[covered[-1]]
  assert np.median(err) <= 2
  # Uncovered pixels hold the previous ground-truth frame.
  for t in (3, 12):
    np.testing.assert_array_equal(frames[t][~covered[t]], loop_clip.frames[t - 1][~covered[t]])


def test_ground_truth_splats_never_lift_depth_holes():
  """A standing camera sees each earlier frame's points at their own pixels: the composite's
  memory covers exactly the pixels with observed depth, never a hole (its placeholder depth
  is finite and > 0, so only the mask keeps it out)."""
  t, h, w = 3, 8, 8
  valid = np.ones((t, h, w), np.uint8)
  valid[:, :, :3] = 0  # a hole in every frame
  truth = revisit.Trajectory(
      name="still", frames=np.random.default_rng(0).integers(0, 255, (t, h, w, 3), dtype=np.uint8),
      depths=np.where(valid > 0, 2.0, 1.0).astype(np.float32),
      intrinsics=np.repeat(geometry.intrinsics_from_fov(60, h, w)[None], t, 0),
      poses_c2w=np.repeat(geometry.look_at([0, 1.5, 0], [0, 1.5, 3], up=(0, 1, 0))[None], t, 0),
      dynamic_masks=np.zeros((t, h, w), np.uint8), depth_valid=valid)
  _, covered = revisit.trivial_composite(truth)
  np.testing.assert_array_equal(covered[1:], valid[1:] > 0)
  _, dense = revisit.trivial_composite(dataclasses.replace(truth, depth_valid=None))
  assert dense[1:].all()


def test_revisit_runner_scores_every_row(world, loop_clip, tmp_path):
  config, ae, dn = world
  # The oracle row runs the configured backend (voxel), so three rollouts cover three kinds.
  runner = revisit.RevisitRunner(config, ae, dn, ["none", "mirage"], len(loop_clip.frames))
  res = runner.run(loop_clip, video_dir=str(tmp_path))
  assert set(res["rows"]) == {"none", "mirage", "oracle", "composite"}
  assert res["revisit_frames"] == int(np.sum(res["pairs"] >= 0)) >= 5
  for name, row in res["rows"].items():
    assert len(row["psnr_per_frame"]) == 24
    for key in ("psnr_all", "ssim_all", "psnr_revisit", "ssim_revisit", "psnr_first_visit"):
      assert math.isfinite(row[key]), (name, key)
    assert os.path.getsize(tmp_path / "seed100001" / f"{name}.mp4") > 0
  rows = res["rows"]
  assert rows["none"]["coverage_revisit"] == 0 and rows["none"]["cache_bytes"] == 0
  assert rows["mirage"]["coverage_revisit"] > 0.3 and rows["mirage"]["cache_bytes"] > 0
  assert math.isfinite(rows["mirage"]["geometric_psnr"]) and 0 < rows["mirage"]["geometric_fraction"] <= 1
  # The oracle's voxel memory holds ground-truth geometry, which covers the revisited views.
  assert rows["oracle"]["backend"] == "voxel"
  assert rows["oracle"]["coverage_revisit"] >= 0.5
  # The composite copies ground truth, far above an untrained model.
  assert rows["composite"]["psnr_revisit"] > rows["none"]["psnr_revisit"] + 5
  # Ground truth against its own first visits: the floor for the first-visit score.
  assert math.isfinite(res["reference"]["psnr_first_visit"])

  report.write_metrics_json(tmp_path / "res.json", res)  # as the CLI's per-process parts
  round_trip = json.loads((tmp_path / "res.json").read_text())  # NaN became null
  summary, curves = revisit.summarize({"a": res, "b": round_trip})
  assert summary["revisit_frames"] == 2 * res["revisit_frames"]
  np.testing.assert_allclose(summary["mirage"]["psnr_revisit"], rows["mirage"]["psnr_revisit"], rtol=1e-6)
  assert curves["oracle"]["psnr"].shape == (24,)

  # Memory Maze style: the first 9 frames are context (memory from ground truth; the chunk
  # of frames 9-10 straddles the boundary) and only later frames are scored.
  res = runner.run(dataclasses.replace(loop_clip, context=9))
  row = res["rows"]["mirage"]
  np.testing.assert_allclose(row["psnr_all"], np.mean(row["psnr_per_frame"][9:]), rtol=1e-6)
  assert res["revisit_frames"] == int(np.sum(res["pairs"][9:] >= 0))


# ----------------------------------------------------------------------------- scaling


def test_box_depth_is_exact():
  K, poses = scaling.loop_trajectory(4, 4, 16, 16)
  depth = scaling.box_depth(K, poses, 16, 16)
  points = np.asarray(geometry.unproject_depth(depth, K, poses))
  on_wall = np.isclose(np.abs(points[..., [0, 2]]), 3.0, atol=1e-4).any(-1) | \
      np.isclose(points[..., 1], 0.0, atol=1e-4) | np.isclose(points[..., 1], 3.0, atol=1e-4)
  assert on_wall.all()
  # The centre pixel of a camera 1 m from the centre looking outward hits the wall 2 m away.
  np.testing.assert_allclose(depth[:, 8, 8], 2.0, rtol=1e-3)


def test_scaling_runner(world, tmp_path):
  config, ae, dn = world
  entries = scaling.run_scaling(config, ae, dn, ["none", "mirage", "voxel"], [8, 16],
                                timed_chunks=1, period=8)
  path = tmp_path / "scaling.json"
  report.write_scaling_json(path, entries)
  got = {(e["backend"], e["frames"]): e for e in report.read_scaling_json(path)}
  assert set(got) == {(b, n) for b in ("none", "mirage", "voxel") for n in (8, 16)}
  assert got["none", 8]["cache_bytes"] == got["none", 16]["cache_bytes"] == 0
  # Append-only: one point per latent pixel of every frame.
  assert got["mirage", 16]["cache_bytes"] == 2 * got["mirage", 8]["cache_bytes"] > 0
  # On a loop path the voxel cache stops growing once the room has been seen.
  assert got["voxel", 16]["cache_bytes"] == got["voxel", 8]["cache_bytes"] > 0
  for e in got.values():
    assert e["chunk_seconds"] > 0 and e["memory_seconds_per_chunk"] <= e["chunk_seconds"]


def test_scaling_rejects_lengths_shorter_than_the_timed_segment(world):
  config, ae, dn = world
  with pytest.raises(Exception, match="lengths"):
    scaling.run_scaling(config, ae, dn, ["none"], [4], timed_chunks=1)


# ----------------------------------------------------------------------------- CLI


@needs_exr
def test_evaluate_cli_revisit_and_refusal(export, tmp_path):
  """``evaluate`` on a dataset with depth holes: the loop clip as a reference sample folder
  whose depth has a hole in every frame (written to memory by the oracle row and frame 0,
  lifted nowhere there). Procedural seeds: tests/test_index_html.py runs them."""
  from data_pipelines import builders, sample_folders  # pylint: disable=g-import-not-at-top
  clip = procedural.render_clip(100001, 24, 32, 32, trajectory="loop")
  valid = np.ones(clip["depths"].shape, np.uint8)
  valid[:, 8:20, 4:16] = 0
  sample_folders.write_sample_folder(tmp_path / "samples" / "loop", dict(clip, depth_valid=valid))
  builders.prepare(builders.make_builder("reference_samples", str(tmp_path / "data"),
                                         source_dir=str(tmp_path / "samples"), num_clips=0))
  out = tmp_path / "revisit"
  args = [f"--checkpoint={export}", "--benchmark=revisit", f"--data_dir={tmp_path / 'data'}",
          "--dataset=reference_samples", "--backends=mirage", f"--output_dir={out}"]
  result = run_cli("mirage_jax.evaluate", *args)
  assert result.returncode == 0, result.stderr
  metrics = json.loads((out / "metrics.json").read_text())
  summary = metrics["revisit"]["summary"]
  assert set(summary) == {"mirage", "oracle", "composite", "reference", "revisit_frames",
                          "first_visit_frames"}
  assert summary["revisit_frames"] >= 5
  assert list(metrics["revisit"]["trajectories"]) == ["0000_loop"]
  for row in ("mirage", "oracle", "composite"):
    assert math.isfinite(summary[row]["psnr_revisit"]), row
  for name in ("quality_vs_frame.png", "ssim_vs_frame.png", "videos/0000_loop/mirage.mp4",
               "videos/0000_loop/oracle.mp4", "videos/0000_loop/composite.mp4",
               "parts/process_0.json"):
    assert (out / name).stat().st_size > 0, name
  assert "psnr_revisit" in result.stdout  # the table
  again = run_cli("mirage_jax.evaluate", *args)
  assert again.returncode == 2 and "not empty" in again.stderr
