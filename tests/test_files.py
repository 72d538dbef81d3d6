"""Readers of posed clips on disk: round trips, layouts, and one test per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from data_pipelines import files
from mirage_jax.errors import InputError
from tests.fixtures_util import synthetic_clip

T, H, W = 4, 8, 10


def _clip(seed=0):
  return synthetic_clip(seed, T, H, W, moving_objects=2)


def _write_npz(path: Path, drop=(), **overrides) -> Path:
  """geometry.npz from a synthetic clip; ``overrides`` replace arrays, ``drop`` removes keys."""
  arrays = {k: v for k, v in _clip().items() if k != "object_tracks"}
  arrays.update(overrides)
  for key in drop:
    arrays.pop(key)
  np.savez(path, **arrays)
  return path


def _write_re10k(path: Path, clip, stamps=None, lines=None) -> Path:
  """A RealEstate10K camera file for ``clip`` and its frames as <stem>/<timestamp>.png."""
  t, h, w, _ = clip["frames"].shape
  stamps = list(range(1000, 1000 + 33_333 * t, 33_333)) if stamps is None else stamps
  if lines is None:
    lines = []
    for i, stamp in enumerate(stamps):
      K, w2c = clip["intrinsics"][i], np.linalg.inv(clip["poses_c2w"][i].astype(np.float64))
      nums = [K[0, 0] / w, K[1, 1] / h, K[0, 2] / w, K[1, 2] / h, 0.0, 0.0, *w2c[:3].reshape(-1)]
      lines.append(" ".join([str(stamp)] + [repr(float(x)) for x in nums]))
  path.write_text("\n".join(["https://www.youtube.com/watch?v=abc"] + lines) + "\n")
  folder = path.with_suffix("")
  folder.mkdir(exist_ok=True)
  for stamp, frame in zip(stamps, clip["frames"]):
    iio.imwrite(folder / f"{stamp}.png", frame)
  return path


# ----------------------------------------------------------------------------- good inputs


def test_save_then_load_round_trips_every_field(tmp_path):
  clip = _clip()
  path = tmp_path / "geometry.npz"
  files.save_geometry_npz(path, clip)
  back = files.load_geometry_npz(path)
  for key in ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks", "object_tracks"):
    np.testing.assert_array_equal(back[key], clip[key], err_msg=key)
  assert back["fps"] == clip["fps"] and back["has_depth"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["geometry.npz"]  # No temp file left.


def test_captions_from_the_npz_or_a_file_beside_it(tmp_path):
  """``caption`` in the npz wins; else <stem>.caption.txt, else caption.txt; find_clips
  does not take caption files for RealEstate10K camera files."""
  (tmp_path / "a").mkdir()
  files.save_geometry_npz(tmp_path / "a" / "geometry.npz", {**_clip(), "caption": " a red room "})
  assert files.load_clip(tmp_path / "a" / "geometry.npz")["caption"] == "a red room"
  (tmp_path / "b").mkdir()
  files.save_geometry_npz(tmp_path / "b" / "geometry.npz", _clip())
  assert files.load_clip(tmp_path / "b" / "geometry.npz")["caption"] == ""
  (tmp_path / "b" / "caption.txt").write_text("a hallway,\n  then a door\n")
  assert files.load_clip(tmp_path / "b" / "geometry.npz")["caption"] == "a hallway, then a door"
  (tmp_path / "b" / "geometry.caption.txt").write_text("its own")
  assert files.load_clip(tmp_path / "b" / "geometry.npz")["caption"] == "its own"
  _write_re10k(tmp_path / "c.txt", synthetic_clip(7, 3, 6, 8))
  (tmp_path / "c.caption.txt").write_text("a house")
  assert files.load_clip(tmp_path / "c.txt")["caption"] == "a house"
  assert [p.relative_to(tmp_path).as_posix() for p in files.find_clips(tmp_path)] == [
      "a/geometry.npz", "b/geometry.npz", "c.txt"]
  (tmp_path / "c.caption.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
  with pytest.raises(InputError) as e:
    files.load_clip(tmp_path / "c.txt")
  assert e.value.field == "caption" and str(e.value.where).endswith("c.caption.txt")
  assert "\n" not in str(e.value)
  with pytest.raises(InputError, match="caption"):
    files.load_geometry_npz(_write_npz(tmp_path / "n.npz", caption=np.arange(3)))


def test_save_refuses_a_bad_clip_and_keeps_the_old_file(tmp_path):
  path = tmp_path / "geometry.npz"
  files.save_geometry_npz(path, _clip())
  before = path.read_bytes()
  bad = _clip()
  bad["depths"] = -bad["depths"]
  with pytest.raises(InputError, match="depths"):
    files.save_geometry_npz(path, bad)
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["geometry.npz"]


def test_single_intrinsics_is_shared_by_all_frames(tmp_path):
  K = _clip()["intrinsics"][0]
  clip = files.load_geometry_npz(_write_npz(tmp_path / "geometry.npz", intrinsics=K))
  assert clip["intrinsics"].shape == (T, 3, 3)
  np.testing.assert_array_equal(clip["intrinsics"][-1], K)


@pytest.mark.parametrize("video_name", ["geometry.gif", "rgb.gif"])
def test_frames_from_a_video_beside_the_npz(tmp_path, video_name):
  clip = _clip()
  iio.imwrite(tmp_path / video_name, clip["frames"])  # GIF quantises colours: compare with a re-read.
  loaded = files.load_geometry_npz(_write_npz(tmp_path / "geometry.npz", drop=("frames",)))
  assert loaded["frames"].shape == (T, H, W, 3) and loaded["frames"].dtype == np.uint8
  np.testing.assert_array_equal(loaded["frames"], files.read_video(tmp_path / video_name))


def test_re10k_from_image_folder(tmp_path):
  clip = _clip()
  stamps = [0, 100_000, 200_000, 300_000]  # 10 fps.
  loaded = files.load_re10k(_write_re10k(tmp_path / "scene.txt", clip, stamps))
  np.testing.assert_array_equal(loaded["frames"], clip["frames"])
  np.testing.assert_allclose(loaded["intrinsics"], clip["intrinsics"], rtol=1e-5)
  np.testing.assert_allclose(loaded["poses_c2w"], clip["poses_c2w"], atol=1e-5)
  assert loaded["fps"] == pytest.approx(10.0)
  assert not loaded["has_depth"] and np.all(loaded["depths"] == files.PLACEHOLDER_DEPTH)


def test_re10k_from_video_beside(tmp_path):
  clip = _clip()
  path = _write_re10k(tmp_path / "scene.txt", clip)
  for p in path.with_suffix("").iterdir():
    p.unlink()
  path.with_suffix("").rmdir()
  iio.imwrite(tmp_path / "scene.gif", clip["frames"])
  loaded = files.load_re10k(path)
  assert loaded["frames"].shape == (T, H, W, 3)
  assert [p.name for p in files.find_clips(tmp_path)] == ["scene.txt"]


# ----------------------------------------------------------------------------- bad inputs

_BAD_POSE = _clip()["poses_c2w"].copy()
_BAD_POSE[1, :3, :3] *= 1.1
_NAN_DEPTH = _clip()["depths"].copy()
_NAN_DEPTH[2, 3, 4] = np.nan
_INF_POSE = _clip()["poses_c2w"].copy()
_INF_POSE[0, 0, 3] = np.inf
_NAN_K = _clip()["intrinsics"].copy()
_NAN_K[1, 0, 0] = np.nan
_ZERO_DEPTH = _clip()["depths"].copy()
_ZERO_DEPTH[0, 0, 0] = 0.0


def _truncated(tmp_path):
  path = _write_npz(tmp_path / "geometry.npz")
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return path


def _garbage(tmp_path):
  path = tmp_path / "geometry.npz"
  path.write_bytes(b"this is not a zip archive" * 10)
  return path


def _empty(tmp_path):
  path = tmp_path / "geometry.npz"
  path.write_bytes(b"")
  return path


def _video(tmp_path, name, frames):
  iio.imwrite(tmp_path / name, frames)
  return _write_npz(tmp_path / "geometry.npz", drop=("frames",))


def _unreadable_video(tmp_path):
  (tmp_path / "geometry.mp4").write_bytes(b"not a video at all")
  return _write_npz(tmp_path / "geometry.npz", drop=("frames",))


def _two_videos(tmp_path):
  for name in ("a.gif", "b.gif"):
    iio.imwrite(tmp_path / name, _clip()["frames"])
  return _write_npz(tmp_path / "geometry.npz", drop=("frames",))


def _re10k_lines(tmp_path, edit):
  """A RE10K file whose camera lines were passed through ``edit(lines) -> lines``."""
  path = _write_re10k(tmp_path / "scene.txt", _clip())
  head, *lines = path.read_text().splitlines()
  path.write_text("\n".join([head] + edit(lines)) + "\n")
  return path


def _re10k_rotation(lines):
  parts = lines[0].split()
  parts[7] = str(float(parts[7]) * 1.5)  # First entry of the w2c rotation.
  return [" ".join(parts)] + lines[1:]


def _re10k_missing_image(tmp_path):
  path = _write_re10k(tmp_path / "scene.txt", _clip())
  next(path.with_suffix("").glob("*.png")).unlink()
  return path


BAD_NPZ = {
    # name: (make(tmp_path) -> path to load, file name expected in the message, field)
    "missing_depths": (lambda d: _write_npz(d / "geometry.npz", drop=("depths",)), "geometry.npz", "depths"),
    "missing_poses": (lambda d: _write_npz(d / "geometry.npz", drop=("poses_c2w",)), "geometry.npz", "poses_c2w"),
    "missing_intrinsics": (lambda d: _write_npz(d / "geometry.npz", drop=("intrinsics",)), "geometry.npz", "intrinsics"),
    "missing_fps": (lambda d: _write_npz(d / "geometry.npz", drop=("fps",)), "geometry.npz", "fps"),
    "frames_float_dtype": (lambda d: _write_npz(d / "geometry.npz", frames=np.zeros((T, H, W, 3), np.float32)), "geometry.npz", "frames"),
    "frames_no_channels": (lambda d: _write_npz(d / "geometry.npz", frames=np.zeros((T, H, W), np.uint8)), "geometry.npz", "frames"),
    "depths_text_dtype": (lambda d: _write_npz(d / "geometry.npz", depths=np.full((T, H, W), "x")), "geometry.npz", "depths"),
    "depths_wrong_rank": (lambda d: _write_npz(d / "geometry.npz", depths=np.ones((T, H * W), np.float32)), "geometry.npz", "depths"),
    "depths_int_dtype": (lambda d: _write_npz(d / "geometry.npz", depths=np.ones((T, H, W), np.int32)), "geometry.npz", "depths"),
    "frame_count_mismatch": (lambda d: _write_npz(d / "geometry.npz", depths=np.ones((T - 1, H, W), np.float32)), "geometry.npz", "depths"),
    "frame_size_mismatch": (lambda d: _write_npz(d / "geometry.npz", depths=np.ones((T, H, W + 1), np.float32)), "geometry.npz", "depths"),
    "intrinsics_count": (lambda d: _write_npz(d / "geometry.npz", intrinsics=_clip()["intrinsics"][:2]), "geometry.npz", "intrinsics"),
    "intrinsics_nan": (lambda d: _write_npz(d / "geometry.npz", intrinsics=_NAN_K), "geometry.npz", "intrinsics"),
    "poses_count": (lambda d: _write_npz(d / "geometry.npz", poses_c2w=_clip()["poses_c2w"][:2]), "geometry.npz", "poses_c2w"),
    "poses_inf": (lambda d: _write_npz(d / "geometry.npz", poses_c2w=_INF_POSE), "geometry.npz", "poses_c2w"),
    "poses_not_orthonormal": (lambda d: _write_npz(d / "geometry.npz", poses_c2w=_BAD_POSE), "geometry.npz", "poses_c2w"),
    "depths_nan": (lambda d: _write_npz(d / "geometry.npz", depths=_NAN_DEPTH), "geometry.npz", "depths"),
    "depths_zero": (lambda d: _write_npz(d / "geometry.npz", depths=_ZERO_DEPTH), "geometry.npz", "depths"),
    "fps_negative": (lambda d: _write_npz(d / "geometry.npz", fps=np.float32(-1)), "geometry.npz", "fps"),
    "masks_wrong_shape": (lambda d: _write_npz(d / "geometry.npz", dynamic_masks=np.zeros((T, H, W + 1), np.uint8)), "geometry.npz", "dynamic_masks"),
    "truncated_npz": (_truncated, "geometry.npz", "file"),
    "garbage_npz": (_garbage, "geometry.npz", "file"),
    "empty_npz": (_empty, "geometry.npz", "file"),
    "no_such_file": (lambda d: d / "geometry.npz", "geometry.npz", "file"),
    "no_frames_no_video": (lambda d: _write_npz(d / "geometry.npz", drop=("frames",)), "geometry.npz", "frames"),
    "video_frame_count": (lambda d: _video(d, "geometry.gif", _clip()["frames"][:2]), "geometry.gif", "frames"),
    "video_frame_size": (lambda d: _video(d, "geometry.gif", np.zeros((T, H, W + 2, 3), np.uint8)), "geometry.gif", "frames"),
    "video_unreadable": (_unreadable_video, "geometry.mp4", "frames"),
    "two_videos": (_two_videos, "geometry.npz", "frames"),
    "re10k_columns": (lambda d: _re10k_lines(d, lambda ls: [ls[0], ls[1].rsplit(" ", 1)[0]] + ls[2:]), "scene.txt", "line 3"),
    "re10k_not_a_number": (lambda d: _re10k_lines(d, lambda ls: [ls[0].replace(" ", " abc ", 1).rsplit(" ", 1)[0]] + ls[1:]), "scene.txt", "line 2"),
    "re10k_nan": (lambda d: _re10k_lines(d, lambda ls: [ls[0].rsplit(" ", 1)[0] + " nan"] + ls[1:]), "scene.txt", "line 2"),
    "re10k_timestamps": (lambda d: _re10k_lines(d, lambda ls: [ls[1], ls[0]] + ls[2:]), "scene.txt", "line 3"),
    "re10k_rotation": (lambda d: _re10k_lines(d, _re10k_rotation), "scene.txt", "line 2"),
    "re10k_no_cameras": (lambda d: _re10k_lines(d, lambda ls: []), "scene.txt", "cameras"),
    "re10k_missing_image": (_re10k_missing_image, "scene", "frames"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, case):
  make, file_name, field = BAD_NPZ[case]
  path = make(tmp_path)
  with pytest.raises(InputError) as info:
    files.load_clip(path)
  message = str(info.value)
  assert "\n" not in message
  assert file_name in message and f"field '{field}'" in message, message
