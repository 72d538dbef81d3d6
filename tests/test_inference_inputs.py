"""Inference inputs: geometry files with frame 0 only (arrays, first_frame.png, clip.mp4 beside
the file), optional depth, and one-line refusals naming the file and the field."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest

from data_pipelines import files
from mirage_jax.evaluation import inference_inputs
from mirage_jax.errors import InputError
from tests.fixtures_util import synthetic_clip
from tests.test_generate import run_cli, save_tiny_export

T, H, W = 5, 48, 64  # multiples of 16: the mp4 writer keeps the size


@pytest.fixture(scope="module")
def clip():
  return synthetic_clip(3, num_frames=T, height=H, width=W)


def _write(path, **arrays):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)
  return path


def _first_only(clip, depth=True, frames=True, **extra):
  """The arrays of a frame-0-only file: every camera, frame 0's RGB (and depth)."""
  out = dict(intrinsics=clip["intrinsics"], poses_c2w=clip["poses_c2w"], fps=clip["fps"])
  if frames:
    out["frames"] = clip["frames"][:1]
  if depth:
    out["depths"] = clip["depths"][:1]
  return dict(out, **extra)


def _same_as_first_frame(loaded, clip, depth=True):
  assert loaded["frames"].shape == (1, H, W, 3) and loaded["depths"] is None
  np.testing.assert_array_equal(loaded["intrinsics"], clip["intrinsics"].astype(np.float32))
  np.testing.assert_array_equal(loaded["poses_c2w"], clip["poses_c2w"].astype(np.float32))
  if depth:
    np.testing.assert_array_equal(loaded["first_depth"], clip["depths"][0])
  else:
    assert loaded["first_depth"] is None


def test_first_frame_arrays_load_as_the_full_files_first_frame(clip, tmp_path):
  files.save_geometry_npz(tmp_path / "full" / "geometry.npz", clip)
  full = files.load_inference_geometry(tmp_path / "full" / "geometry.npz")
  assert full["frames"].shape == (T, H, W, 3) and full["depths"].shape == (T, H, W)
  first = files.load_inference_geometry(_write(tmp_path / "a" / "geometry.npz", **_first_only(clip)))
  _same_as_first_frame(first, clip)
  for key in ("intrinsics", "poses_c2w", "first_depth"):
    np.testing.assert_array_equal(first[key], full[key])
  np.testing.assert_array_equal(first["frames"][0], full["frames"][0])
  assert first["fps"] == full["fps"] == pytest.approx(10.0)
  # Depth as one (H, W) map; as frame 0's map repeated for every camera (the reference's
  # first-frame files): frame 0's depth only. A shared (3, 3) intrinsics. No fps: the default.
  two_d = _first_only(clip)
  two_d.update(depths=clip["depths"][0], intrinsics=clip["intrinsics"][0])
  del two_d["fps"]
  loaded = files.load_inference_geometry(_write(tmp_path / "b" / "geometry.npz", **two_d))
  _same_as_first_frame(loaded, clip)
  assert loaded["fps"] == files.DEFAULT_FPS
  repeated = _first_only(clip, depths=np.repeat(clip["depths"][:1], T, axis=0))
  _same_as_first_frame(files.load_inference_geometry(_write(tmp_path / "c" / "g.npz", **repeated)), clip)
  # No depth at all, or has_depth False: first_depth None.
  _same_as_first_frame(files.load_inference_geometry(
      _write(tmp_path / "d" / "g.npz", **_first_only(clip, depth=False))), clip, depth=False)
  _same_as_first_frame(files.load_inference_geometry(
      _write(tmp_path / "e" / "g.npz", **_first_only(clip, has_depth=np.bool_(False)))), clip, depth=False)


def test_first_frame_png_and_clip_mp4_beside_the_file(clip, tmp_path):
  png_dir = tmp_path / "png"
  _write(png_dir / "geometry.npz", **_first_only(clip, frames=False))
  iio.imwrite(png_dir / "first_frame.png", clip["frames"][0])
  loaded = files.load_inference_geometry(png_dir / "geometry.npz")
  _same_as_first_frame(loaded, clip)
  np.testing.assert_array_equal(loaded["frames"][0], clip["frames"][0])  # png is lossless
  assert loaded["frames_path"] == str(png_dir / "first_frame.png")
  # clip.mp4 (the reference's name) with every frame; it wins over first_frame.png as in the
  # reference. Lossy: compared with what the video reader gives.
  mp4_dir = tmp_path / "mp4"
  _write(mp4_dir / "geometry.npz", **_first_only(clip, frames=False))
  iio.imwrite(mp4_dir / "clip.mp4", clip["frames"], fps=10)
  iio.imwrite(mp4_dir / "first_frame.png", np.zeros((H, W, 3), np.uint8))
  iio.imwrite(mp4_dir / "other.mp4", clip["frames"][:2], fps=10)  # clip.mp4 is picked by name
  loaded = files.load_inference_geometry(mp4_dir / "geometry.npz")
  assert loaded["frames"].shape == (T, H, W, 3) and loaded["frames_path"] == str(mp4_dir / "clip.mp4")
  np.testing.assert_array_equal(loaded["frames"][0], iio.imread(mp4_dir / "clip.mp4", index=0))
  np.testing.assert_array_equal(loaded["first_depth"], clip["depths"][0])


def test_fit_inputs_keeps_the_first_frame_and_every_camera(clip, tmp_path):
  files.save_geometry_npz(tmp_path / "full.npz", clip)
  full = inference_inputs.fit_inputs(files.load_inference_geometry(tmp_path / "full.npz"), (32, 32), 4)
  first = inference_inputs.fit_inputs(files.load_inference_geometry(
      _write(tmp_path / "first.npz", **_first_only(clip))), (32, 32), 4)
  assert first["depths"] is None and full["depths"].shape == (4, 32, 32)
  for key in ("first_frame", "first_depth", "intrinsics", "poses_c2w"):
    np.testing.assert_array_equal(first[key], full[key])
  assert first["intrinsics"].shape == (4, 3, 3)


def test_depth_holes_reach_the_rollout_mask(clip, tmp_path):
  """A clip's depth holes (``make_geometry`` keeps a dataset clip's ``depth_valid``) come out
  of ``fit_inputs`` at the model's resolution, for generate's ``depth_valid``: every frame's
  from a full file, frame 0's from a frame-0 file (later rows: no depth of their own)."""
  valid = np.ones((T, H, W), np.uint8)
  valid[:, :, :W // 2] = 0  # the left half of every frame
  holey = dict(clip, depth_valid=valid)
  files.save_geometry_npz(tmp_path / "full.npz", holey)
  files.save_first_frame_geometry(tmp_path / "first.npz", holey)
  full = inference_inputs.fit_inputs(files.load_inference_geometry(tmp_path / "full.npz"), (32, 32), 4)
  first = inference_inputs.fit_inputs(files.load_inference_geometry(tmp_path / "first.npz"), (32, 32), 4)
  assert full["depth_valid"].shape == (4, 32, 32) and full["depth_valid"].dtype == bool
  assert not full["depth_valid"][:, :, 0].any() and full["depth_valid"][:, :, -1].all()
  np.testing.assert_array_equal(first["depth_valid"][0], full["depth_valid"][0])
  assert first["depth_valid"][1:].all()
  # No mask in the file: none out (all observed).
  plain = files.load_inference_geometry(_write(tmp_path / "plain.npz", **_first_only(clip)))
  assert plain["depth_valid"] is None
  assert inference_inputs.fit_inputs(plain, (32, 32), 4)["depth_valid"] is None
  bad = _write(tmp_path / "bad.npz", **_first_only(clip, depth_valid=np.full((1, H, W), 2)))
  with pytest.raises(InputError, match="depth_valid.*0/1"):
    files.load_inference_geometry(bad)


@pytest.mark.parametrize("case", ["frames_partial", "depths_partial", "png_wrong_size",
                                  "png_wrong_processed_size", "mp4_unreadable", "mp4_frame_count",
                                  "intrinsics_missing", "poses_wrong_length", "no_frames"])
def test_refusals_name_the_file_and_the_field(clip, tmp_path, case):
  path = tmp_path / "geometry.npz"
  arrays = _first_only(clip)
  where, field = path, case.split("_")[0]
  if case == "frames_partial":  # 1 < N < T frames: the reference accepts 1 or T only
    arrays["frames"] = clip["frames"][:3]
  elif case == "depths_partial":
    arrays["depths"] = clip["depths"][:3]
  elif case.startswith("png"):
    del arrays["frames"]
    where, field = tmp_path / "first_frame.png", "frames"
    iio.imwrite(where, np.zeros((H, W + 2, 3), np.uint8))
    if case == "png_wrong_processed_size":  # no depth: the reference's processed_size
      del arrays["depths"]
      arrays["processed_size"] = np.array([H, W], np.int32)
  elif case.startswith("mp4"):
    del arrays["frames"]
    where, field = tmp_path / "clip.mp4", "frames"
    if case == "mp4_unreadable":
      where.write_bytes(b"not a video")
    else:
      iio.imwrite(where, clip["frames"][:3], fps=10)
  elif case == "intrinsics_missing":
    del arrays["intrinsics"]
  elif case == "poses_wrong_length":
    arrays["poses_c2w"] = clip["poses_c2w"][:3]
    field = "poses_c2w"
  elif case == "no_frames":
    del arrays["frames"]
    field = "frames"
  _write(path, **arrays)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  with pytest.raises(InputError) as e:
    files.load_inference_geometry(path)
  message = str(e.value)
  assert "\n" not in message and str(where) in message and f"'{field}'" in message, message
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing overwritten


def test_missing_depth_is_refused_naming_file_and_depth(clip, tmp_path):
  no_depth = files.load_inference_geometry(
      _write(tmp_path / "g.npz", **_first_only(clip, depth=False)))
  first = files.load_inference_geometry(_write(tmp_path / "f.npz", **_first_only(clip)))
  with pytest.raises(InputError, match=r"g\.npz: field 'depth'.*frame 0.*or estimate it"):
    inference_inputs.require_depth(str(tmp_path / "g.npz"), no_depth, "small", needs_every=False)
  inference_inputs.require_depth(str(tmp_path / "f.npz"), first, "small", needs_every=False)
  with pytest.raises(InputError, match=r"f\.npz: field 'depth'.*--depth_estimator=given"):
    inference_inputs.require_depth(str(tmp_path / "f.npz"), first, "wan", needs_every=True)


def test_loader_for_clips_refuses_a_first_frame_only_file(clip, tmp_path):
  path = _write(tmp_path / "g.npz", **_first_only(clip))
  with pytest.raises(InputError, match=r"g\.npz: field 'frames'.*frame 0 only"):
    files.load_geometry_npz(path)


def test_generate_runs_from_a_first_frame_only_file(clip, tmp_path):
  """The small family needs no future depth (its decoder predicts depth)."""
  export = save_tiny_export(str(tmp_path / "export"))
  # Made by make_geometry --first_frame_only from the user's png, depth and cameras.
  own = tmp_path / "own"
  own.mkdir()
  iio.imwrite(own / "first_frame.png", clip["frames"][0])
  np.save(own / "depth.npy", clip["depths"][0])
  np.savez(own / "cameras.npz", poses_c2w=clip["poses_c2w"], intrinsics=clip["intrinsics"][0])
  geometry = tmp_path / "clip" / "geometry.npz"
  made = run_cli("data_pipelines.make_geometry", f"--frames={own / 'first_frame.png'}",
                 f"--depth={own / 'depth.npy'}", f"--cameras={own / 'cameras.npz'}",
                 f"--output={geometry}", "--first_frame_only")
  assert made.returncode == 0, made.stderr
  with np.load(geometry) as z:
    assert z["frames"].shape == (1, H, W, 3) and z["depths"].shape == (1, H, W)
    assert z["poses_c2w"].shape == (T, 4, 4)
  _same_as_first_frame(files.load_inference_geometry(geometry), clip)
  out = tmp_path / "out"
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={geometry}",
                   f"--output_dir={out}", "--memory=mirage")
  assert result.returncode == 0, result.stderr
  assert iio.imread(out / "video.mp4", index=None).shape == (T, 32, 32, 3)
  assert np.load(out / "depth.npz")["depths"].shape == (T, 32, 32)
  # Without depth (make_geometry --first_frame_only without --depth): one line naming the
  # file and the field, nothing written.
  no_depth = tmp_path / "nodepth" / "geometry.npz"
  made = run_cli("data_pipelines.make_geometry", f"--frames={own / 'first_frame.png'}",
                 f"--cameras={own / 'cameras.npz'}", f"--output={no_depth}", "--first_frame_only")
  assert made.returncode == 0, made.stderr
  assert "depths" not in np.load(no_depth).files
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={no_depth}",
                   f"--output_dir={tmp_path / 'out2'}")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {no_depth}: field 'depth'") and "estimate it" in last, last
  assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "out2")
