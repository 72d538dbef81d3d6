"""Moving-objects benchmark: re-entry events, per-frame scores on synthetic clips, the CLI."""

import dataclasses
import json
import math

import numpy as np
import pytest

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.evaluation import lpips, objects_benchmark, revisit
from tests.test_generate import run_cli, save_tiny_export

T, H, W = 12, 16, 16
DEPTH = 2.0
# Object 1 is seen at frames 0-2, leaves, and re-enters at frame 8 (absent 5 frames);
# object 2 is seen at every frame, so it never re-enters.
VISIBLE_1 = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], bool)


def _synthetic_clip() -> objects_benchmark.ObjectClip:
  """A still camera facing a textured wall 2 m away; two flat-coloured 3x3 objects on it."""
  rng = np.random.default_rng(0)
  background = np.repeat(rng.integers(60, 200, (1, H, W, 3), dtype=np.uint8), T, axis=0)
  frames, masks = background.copy(), np.zeros((T, H, W), np.uint8)
  K = geometry.intrinsics_from_fov(60.0, H, W)
  c2w = np.eye(4, dtype=np.float32)
  tracks = np.zeros((2, T, 3), np.float32)
  for t in range(T):
    for k, (row, col, colour, shown) in enumerate([(4, 2 + t, (250, 20, 20), VISIBLE_1[t]),
                                                  (11, 6, (20, 20, 250), True)]):
      # Pixel (u, v) is centred at (u + 0.5, v + 0.5); the square's centre pixel lifts to the
      # centroid of its nine pixels (depth is constant).
      centre = np.array([col + 1.5, row + 1.5, 1.0]) * DEPTH
      tracks[k, t] = np.linalg.solve(K, centre)
      if shown:
        frames[t, row:row + 3, col:col + 3] = colour
        masks[t, row:row + 3, col:col + 3] = k + 1
  truth = revisit.Trajectory(name="synthetic", frames=frames, depths=np.full((T, H, W), DEPTH, np.float32),
                             intrinsics=np.repeat(K[None], T, 0).astype(np.float32),
                             poses_c2w=np.repeat(c2w[None], T, 0), dynamic_masks=masks, context=4)
  return objects_benchmark.ObjectClip(truth, background, tracks)


def _rollout(frames, dynamic, clip):
  return dict(frames=frames, depths=clip.truth.depths, dynamic=dynamic)


# ----------------------------------------------------------------------------- events


def test_reentry_events_on_a_hand_made_visibility():
  visible = np.array([
      [1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1],  # re-enters at 6 and 15 (not 9: gap 1)
      [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0],  # first entry at 6 is no re-entry; 14 is
      [1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # gap 3 < 4 at frame 6
  ], bool)
  assert objects_benchmark.reentry_events(visible, first=1, gap=4) == [(0, 6), (0, 15), (1, 14)]
  # Events before the first scored frame are left out.
  assert objects_benchmark.reentry_events(visible, first=7, gap=4) == [(0, 15), (1, 14)]
  assert objects_benchmark.reentry_events(visible, first=1, gap=3) == [(0, 6), (0, 15), (1, 14), (2, 6)]
  # Frames b..b+2 where the object is visible.
  assert objects_benchmark.reentry_frames(visible, [(0, 6), (1, 14)]) == [(0, 6), (0, 7), (1, 14)]


def test_visibility_needs_enough_pixels():
  masks = np.zeros((3, 8, 8), np.uint8)
  masks[0, :2, :2] = 1  # 4 pixels
  masks[1, 0, :3] = 1   # 3 pixels
  masks[2, 5:, 5:] = 2
  np.testing.assert_array_equal(objects_benchmark.object_visibility(masks, 2, 4),
                                [[True, False, False], [False, False, True]])


# ----------------------------------------------------------------------------- scores


def test_ground_truth_generation_scores_perfectly():
  clip = _synthetic_clip()
  dynamic = (clip.truth.dynamic_masks > 0).astype(np.float32)
  s = objects_benchmark.score_objects(_rollout(clip.truth.frames, dynamic, clip), clip, np.full(T, -1))
  assert (s["reentry_events"], s["reentry_frames"], s["revisit_frames"]) == (1, 3, 0)
  assert s["object_psnr_reentry"] == pytest.approx(100.0)
  assert s["static_psnr_all"] == pytest.approx(100.0)
  assert math.isnan(s["static_psnr_revisit"])  # no revisit frame
  assert s["object_detection_rate"] == 1.0 and s["identity_consistency"] == 1.0
  # Two components per frame (both objects); the nearest is object 1 itself.
  assert s["object_position_error_m"] < 1e-4


def test_static_background_generation_loses_the_object():
  clip = _synthetic_clip()
  s = objects_benchmark.score_objects(_rollout(clip.background, np.zeros((T, H, W), np.float32), clip), clip,
                            np.full(T, -1))
  assert s["identity_consistency"] == 0.0
  assert s["object_psnr_reentry"] < 20.0
  assert s["object_detection_rate"] == 0.0 and math.isnan(s["object_position_error_m"])
  assert s["static_psnr_all"] == pytest.approx(100.0)  # the background itself is right


def test_a_ghost_lowers_static_revisit_psnr():
  clip = _synthetic_clip()
  pairs = np.full(T, -1)
  pairs[6] = 1  # frame 6 revisits frame 1 (the camera is still; pairs are given here)
  dynamic = (clip.truth.dynamic_masks > 0).astype(np.float32)
  clean = objects_benchmark.score_objects(_rollout(clip.truth.frames, dynamic, clip), clip, pairs)
  ghosted = clip.truth.frames.copy()
  old = clip.truth.dynamic_masks[1] == 1  # object 1 where it was at frame 1, gone by frame 6
  ghosted[6][old] = clip.truth.frames[1][old]
  ghost = objects_benchmark.score_objects(_rollout(ghosted, dynamic, clip), clip, pairs)
  assert clean["revisit_frames"] == 1 and clean["static_psnr_revisit"] == pytest.approx(100.0)
  assert ghost["static_psnr_revisit"] < 30.0
  assert ghost["object_psnr_reentry"] == clean["object_psnr_reentry"]  # frame 6 is no re-entry


def test_detection_error_and_identity_swap():
  clip = _synthetic_clip()
  # The object is painted one pixel to the right with the other object's colour.
  frames = clip.truth.frames.copy()
  dynamic = np.zeros((T, H, W), np.float32)
  for t in range(8, 11):  # the re-entry frames
    frames[t][clip.truth.dynamic_masks[t] == 1] = clip.background[t][clip.truth.dynamic_masks[t] == 1]
    frames[t, 4:7, 3 + t:6 + t] = (20, 20, 250)
    dynamic[t, 4:7, 3 + t:6 + t] = 1.0
  s = objects_benchmark.score_objects(_rollout(frames, dynamic, clip), clip, np.full(T, -1))
  assert s["identity_consistency"] == 0.0  # nearest colour is object 2's
  assert s["object_detection_rate"] == 1.0
  pixel = DEPTH / clip.truth.intrinsics[0, 0, 0]  # metres per pixel at the wall
  assert s["object_position_error_m"] == pytest.approx(pixel, rel=1e-3)


def test_summary_means_over_trajectories_and_adds_counts():
  rows = lambda v: {"voxel": dict({k: v for k in objects_benchmark.SCALARS})}
  counts = lambda *n: dict(zip(("revisit_frames", "ghost_frames", "reentry_events", "reentry_frames"), n))
  results = {"a": dict(rows=rows(1.0), **counts(2, 5, 1, 3)),
             "b": dict(rows=rows(None), **counts(1, 0, 0, 0)),
             "c": dict(rows=rows(3.0), **counts(0, 1, 2, 4))}
  s = objects_benchmark.summarize(results)
  assert s["voxel"]["object_psnr_reentry"] == 2.0  # None (NaN in JSON) is skipped
  assert (s["revisit_frames"], s["ghost_frames"], s["reentry_events"], s["reentry_frames"]) == (3, 6, 3, 7)


def test_unknown_row_is_refused():
  with pytest.raises(InputError, match="object_rows.*unknown 'rgb'"):
    objects_benchmark.check_rows(["voxel", "rgb"])


# ----------------------------------------------------------------------------- CLI


def test_evaluate_cli_objects_and_refusal(tmp_path):
  export = save_tiny_export(str(tmp_path / "export"))
  out = tmp_path / "objects"
  args = [f"--checkpoint={export}", "--benchmark=objects", "--procedural_seeds=200000:200001",
          "--num_frames=10", "--object_context=3", f"--output_dir={out}"]
  result = run_cli("mirage_jax.evaluate", *args)
  assert result.returncode == 0, result.stderr
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["benchmark"] == "objects"
  traj = metrics["trajectories"]["seed200000"]
  assert traj["num_objects"] == 2 and traj["context"] == 3 and traj["num_frames"] == 10
  assert set(traj["rows"]) == {"mirage", "voxel", "voxel+objects"}
  summary = metrics["summary"]
  for row in ("mirage", "voxel", "voxel+objects"):
    assert set(summary[row]) == set(objects_benchmark.SCALARS)
    assert summary[row]["cache_bytes"] > 0 and math.isfinite(summary[row]["static_psnr_all"])
    assert (out / "videos" / "seed200000" / f"{row}.mp4").stat().st_size > 0
  assert "object_psnr_reentry" in result.stdout  # the table
  # No LPIPS weights given: nothing computed, and the table says so.
  assert metrics["lpips"] is None and all(summary[r]["lpips_revisit"] is None for r in summary
                                          if isinstance(summary[r], dict))  # NaN in JSON
  assert lpips.NO_WEIGHTS in result.stdout

  bad = run_cli("mirage_jax.evaluate", *args[:-1], f"--output_dir={tmp_path / 'bad'}",
                "--object_rows=voxel,rgb")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "error: --object_rows: field 'object_rows': unknown 'rgb' (known: mirage, voxel, voxel+objects)"]
  assert not (tmp_path / "bad").exists()  # refused before anything was written
  # A bad LPIPS weight file: one line naming the file and the field, before the model loads.
  junk = tmp_path / "alexnet.pth"
  junk.write_bytes(b"junk")
  bad = run_cli("mirage_jax.evaluate", *args[:-1], f"--output_dir={tmp_path / 'bad'}",
                f"--lpips_backbone={junk}")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      f"error: {junk}: field 'file': not a torch zip file (File is not a zip file) nor a legacy "
      "torch file"]
  assert not (tmp_path / "bad").exists()


def test_slot_position_error_uses_the_nearest_live_slot():
  clip = _synthetic_clip()
  dynamic = (clip.truth.dynamic_masks > 0).astype(np.float32)
  out = _rollout(clip.truth.frames, dynamic, clip)
  s = objects_benchmark.score_objects(out, clip, np.full(T, -1))
  assert math.isnan(s["slot_position_error_m"])  # a row without slots
  # Slot 0 is 0.3 m off object 1, slot 1 is empty (its position must be ignored), slot 2 far.
  positions = np.zeros((T, 3, 3), np.float32)
  positions[:, 0] = clip.object_tracks[0] + np.array([0.3, 0.0, 0.0])
  positions[:, 2] = clip.object_tracks[0] + 5.0
  out.update(object_positions=positions, object_idents=np.tile([[4, -1, 7]], (T, 1)))
  s = objects_benchmark.score_objects(out, clip, np.full(T, -1))
  assert s["slot_position_error_m"] == pytest.approx(0.3, abs=1e-5)


def _clip_with_objects_in_front() -> objects_benchmark.ObjectClip:
  """The synthetic clip with the objects 0.5 m in front of the wall."""
  clip = _synthetic_clip()
  depths = np.where(clip.truth.dynamic_masks > 0, DEPTH - 0.5, DEPTH).astype(np.float32)
  return objects_benchmark.ObjectClip(dataclasses.replace(clip.truth, depths=depths), clip.background,
                            clip.object_tracks)


def test_ghost_region_is_where_objects_stood_before():
  t = _clip_with_objects_in_front().truth
  ghost = objects_benchmark.ghost_regions(t.dynamic_masks, t.depths, t.intrinsics, t.poses_c2w)
  # A still camera: the region is every earlier footprint, minus what objects cover now.
  footprints = np.logical_or.accumulate(t.dynamic_masks > 0, axis=0)
  expected = np.zeros_like(ghost)
  expected[1:] = footprints[:-1] & (t.dynamic_masks[1:] == 0)
  np.testing.assert_array_equal(ghost, expected)
  assert ghost[6].sum() > 0  # object 1 slid right, then left the view
  # Objects on the surface itself hide nothing.
  flat = _synthetic_clip().truth
  assert not objects_benchmark.ghost_regions(flat.dynamic_masks, flat.depths, flat.intrinsics,
                                   flat.poses_c2w).any()


def test_a_ghost_lowers_ghost_psnr():
  clip = _clip_with_objects_in_front()
  dynamic = (clip.truth.dynamic_masks > 0).astype(np.float32)
  clean = objects_benchmark.score_objects(_rollout(clip.truth.frames, dynamic, clip), clip, np.full(T, -1))
  assert clean["ghost_frames"] > 0 and clean["ghost_psnr"] == pytest.approx(100.0)
  ghosted = clip.truth.frames.copy()
  for t in range(4, T):  # every scored frame keeps object 1 where it stood at frame 1
    old = (clip.truth.dynamic_masks[1] == 1) & (clip.truth.dynamic_masks[t] == 0)
    ghosted[t][old] = clip.truth.frames[1][old]
  ghost = objects_benchmark.score_objects(_rollout(ghosted, dynamic, clip), clip, np.full(T, -1))
  assert ghost["ghost_psnr"] < 30.0


def test_slot_identity_kept_across_an_observed_exit_and_reentry():
  visible = np.array([[1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1]], bool)  # re-entries at 5 and 11
  tracks = np.zeros((1, 12, 3), np.float32)
  positions = np.full((12, 2, 3), 9.0, np.float32)  # slot 1 is always far away
  positions[:, 0] = 0.3
  idents = np.tile(np.array([[3, 8]], np.int32), (12, 1))
  kw = dict(visible=visible, tracks=tracks, positions=positions, gap=3)
  assert objects_benchmark.slot_identity_kept(idents=idents, last=12, **kw) == [True, True]
  assert objects_benchmark.slot_identity_kept(idents=idents, last=8, **kw) == [True]  # 11 was generated
  swapped = idents.copy()
  swapped[5:, 0] = 4  # a new slot took the object back at frame 5
  assert objects_benchmark.slot_identity_kept(idents=swapped, last=12, **kw) == [False, True]
  lost = idents.copy()
  lost[11, 0] = -1  # nothing within the gate at frame 11
  assert objects_benchmark.slot_identity_kept(idents=lost, last=12, **kw) == [True, False]


def test_claims_need_margins():
  row = lambda ghost, psnr, ident: dict(ghost_psnr=ghost, object_psnr_reentry=psnr,
                                        identity_consistency=ident)
  counts = dict(revisit_frames=10, ghost_frames=8, reentry_events=2, reentry_frames=5)
  summary = dict(counts, mirage=row(19.0, 16.0, 0.3), voxel=row(20.0, 16.0, 0.3),
                 **{"voxel+objects": row(20.0, 16.4, 0.5)})
  assert list(objects_benchmark.claims(summary).values()) == [True, False, True]  # +0.4 dB < 0.5 dB
  summary.update(voxel=row(18.0, 16.0, 0.3), **{"voxel+objects": row(18.0, 17.0, None)})
  assert list(objects_benchmark.claims(summary).values()) == [False, True, False]  # no score: no claim
  assert objects_benchmark.claims(dict(counts, voxel=row(1, 1, 1))) == {}
