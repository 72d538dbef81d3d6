"""The reference's sample folders: reader, writer, depth holes, broken folders, the Beam build
(local and on Cloud Storage)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import build, builders, clip as clip_lib
from mirage_jax import paths
from mirage_jax.errors import InputError
from tests import test_gcs
from tests.fixtures_util import synthetic_clip
from tests.test_gcs import gcs  # pylint: disable=unused-import  # the emulator fixture

from data_pipelines import sample_folders as sf

# The tests that write or read EXR depth need the "samples" extra (openexr).
needs_exr = pytest.mark.skipif(not importlib.util.find_spec("OpenEXR"),
                               reason="pip install -e '.[samples]' (openexr)")

T, H, W = 5, 8, 12


def holey_clip(seed: int) -> dict:
  """A tiny clip as the reference's folders hold it: binary masks, half-float depth with holes
  (NaN, +inf, 0 and a negative value), a caption."""
  clip = synthetic_clip(seed, T, H, W, moving_objects=1)
  depths = clip["depths"].astype(np.float16).astype(np.float32)  # what an EXR of halves holds
  depths[1, :2, :3], depths[2, 0, 0], depths[3, 1, 1], depths[4, 2, 2] = np.nan, np.inf, 0.0, -1.0
  with np.errstate(invalid="ignore"):
    valid = np.isfinite(depths) & (depths > 0)
  return dict(clip, depths=depths, depth_valid=valid.astype(np.uint8),
              dynamic_masks=(clip["dynamic_masks"] > 0).astype(np.uint8), caption=f"room {seed}")


def _tree_digest(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_clip(got: dict, want: dict) -> None:
  valid = np.asarray(want["depth_valid"]) > 0
  np.testing.assert_array_equal(got["depth_valid"], want["depth_valid"])
  np.testing.assert_array_equal(got["depths"][valid], want["depths"][valid])
  assert np.all(got["depths"][~valid] == clip_lib.PLACEHOLDER_DEPTH)
  for key in ("frames", "poses_c2w", "intrinsics", "dynamic_masks"):
    np.testing.assert_array_equal(got[key], np.asarray(want[key]).astype(got[key].dtype), err_msg=key)
  assert got["caption"] == want["caption"]


def test_validate_clip_takes_depth_holes_only_through_depth_valid():
  clip = holey_clip(0)
  raw = dict(clip, depth_valid=None)
  with pytest.raises(InputError, match="depths.*non-finite"):  # a source claiming dense depth
    clip_lib.validate_clip(raw, "src")
  checked = clip_lib.validate_clip(clip, "src")
  assert np.isfinite(checked["depths"]).all() and checked["depth_valid"].dtype == np.uint8
  assert np.all(checked["depths"][clip["depth_valid"] == 0] == clip_lib.PLACEHOLDER_DEPTH)
  lying = dict(clip, depth_valid=np.ones_like(clip["depth_valid"]))  # NaN marked as observed
  with pytest.raises(InputError, match="depths"):
    clip_lib.validate_clip(lying, "src")
  assert clip_lib.validate_clip(synthetic_clip(1, T, H, W), "src")["depth_valid"].all()
  with pytest.raises(InputError, match="depth_valid.*only 0.0%"):
    clip_lib.check_depth_coverage(np.zeros((T, H, W)), "src")
  # One rule for every writer of memory: static and observed.
  assert clip_lib.liftable(np.array([0, 1, 0, 0]), np.array([1, 1, 0, 1])).tolist() == [True, False, False, True]


@needs_exr
def test_folder_round_trip_and_the_reference_conventions(tmp_path):
  clip = holey_clip(3)
  order = np.array([3, 0, 4, 1, 2])  # pose/intrinsics entries out of frame order
  sf.write_sample_folder(tmp_path / "00000000", clip, entry_order=order)
  got = sf.read_sample_folder(tmp_path / "00000000")
  _assert_same_clip(got, clip)
  assert got["has_depth"] and got["fps"] == np.float32(10.0)
  with np.load(tmp_path / "00000000" / "intrinsics.npz") as f:  # fx, fy, cx, cy per entry
    np.testing.assert_array_equal(f["inds"], order)
    np.testing.assert_allclose(f["data"][1], [clip["intrinsics"][0][0, 0], clip["intrinsics"][0][1, 1],
                                              clip["intrinsics"][0][0, 2], clip["intrinsics"][0][1, 2]])
  with zipfile.ZipFile(tmp_path / "00000000" / "depth.zip") as z:  # one half-float Z per frame
    import OpenEXR  # pylint: disable=g-import-not-at-top
    assert OpenEXR.File(io.BytesIO(z.read("00002.exr"))).channels()["Z"].pixels.dtype == np.float16


def _replace_member(path: Path, member: str, data: bytes) -> None:
  with zipfile.ZipFile(path) as z:
    entries = {n: z.read(n) for n in z.namelist()}
  entries[member] = data
  with zipfile.ZipFile(path, "w") as z:
    for n, d in entries.items():
      z.writestr(n, d)


def _corrupt(folder: Path, case: str) -> None:
  """Breaks one file of a good folder the way real data breaks."""
  if case == "truncated zip":
    data = (folder / "depth.zip").read_bytes()
    (folder / "depth.zip").write_bytes(data[: len(data) // 2])
  elif case == "EXR of wrong size":
    _replace_member(folder / "depth.zip", "00002.exr", sf._encode_exr(np.ones((H + 1, W))))  # pylint: disable=protected-access
  elif case == "pose count mismatch":
    with np.load(folder / "pose.npz") as f:
      inds, data = f["inds"], f["data"]
    keep = inds != 4  # frame 4 without a pose
    np.savez(folder / "pose.npz", inds=inds[keep], data=data[keep])
  elif case == "corrupt mp4":
    data = (folder / "clip.mp4").read_bytes()
    (folder / "clip.mp4").write_bytes(data[:48] + b"\0" * (len(data) - 48))
  elif case == "depth almost all holes":
    with zipfile.ZipFile(folder / "depth.zip", "w") as z:
      for i in range(T):
        z.writestr(f"{i:05d}.exr", sf._encode_exr(np.zeros((H, W))))  # pylint: disable=protected-access
  elif case == "mask all moving":
    with zipfile.ZipFile(folder / "mask.zip", "w") as z:
      for i in range(T):
        z.writestr(f"{i:05d}.png", sf._encode_png(np.full((H, W), 255, np.uint8)))  # pylint: disable=protected-access
  else:
    raise ValueError(case)


BROKEN = {  # case -> (file named in the reason, words of the reason)
    "truncated zip": ("depth.zip", "unreadable zip"),
    "EXR of wrong size": ("depth.zip", "00002.exr.*depth map is 12x9"),
    "pose count mismatch": ("pose.npz", "4 entries for the 5 frames.*without one: 4"),
    "corrupt mp4": ("clip.mp4", "unreadable video"),
    "depth almost all holes": ("depth.zip", "only 0.0% of the depth is valid"),
    "mask all moving": ("mask.zip", "100% moving"),
}


def make_folders(root: Path) -> tuple[dict[str, dict], dict[str, str]]:
  """Good folders (clip ids -> clip) and broken ones (clip id -> case), interleaved so every
  split keeps a good clip. One good folder has an EXR that does not decode: kept, that frame
  without depth (as the reference reads it)."""
  good, broken = {}, {}
  cases = list(BROKEN)
  for i in range(10):
    name = f"{i:08d}"
    clip = holey_clip(i)
    sf.write_sample_folder(root / name, clip)
    if i in (1, 3, 4, 5, 6, 7):
      broken[name] = cases.pop()
      _corrupt(root / name, broken[name])
    else:
      good[name] = clip
  _replace_member(root / "00000002" / "depth.zip", "00003.exr", b"not an exr")
  good["00000002"] = dict(good["00000002"], depth_valid=good["00000002"]["depth_valid"].copy())
  good["00000002"]["depth_valid"][3] = 0
  return good, broken


@needs_exr
def test_broken_folders_are_refused_with_one_line_naming_the_file(tmp_path):
  good, broken = make_folders(tmp_path)
  for name, case in broken.items():
    with pytest.raises(InputError) as info:
      sf.read_sample_folder(tmp_path / name)
    message = str(info.value)
    file, reason = BROKEN[case]
    assert "\n" not in message and f"{name}/{file}" in message, (case, message)
    assert re.search(reason, message), (case, message)
  got = sf.read_sample_folder(tmp_path / "00000002")
  _assert_same_clip(got, good["00000002"])


@needs_exr
@pytest.mark.slow  # Starts Beam worker processes (~35 s on the loaded 2-core machine).
def test_build_on_two_workers_skips_broken_folders_and_reads_back_exactly(tmp_path):
  source = tmp_path / "samples"
  good, broken = make_folders(source)
  before = _tree_digest(source)
  data_dir = str(tmp_path / "data")
  builder, reused = build.build(
      "reference_samples", data_dir, source_dir=str(source), num_clips=0,
      beam_runner="DirectRunner",
      beam_options=["direct_num_workers=2", "direct_running_mode=multi_processing"])
  assert not reused
  records = {}
  for split in builders.SPLITS:
    for record in builder.as_data_source(split):
      clip = builders.record_to_clip(record)
      records[clip["clip_id"]] = clip
  assert sorted(records) == sorted(good)  # the broken ones skipped, the build finished
  for name, clip in records.items():
    _assert_same_clip(clip, good[name])
    assert clip["has_depth"] and clip["fps"] == np.float32(10.0), (name, clip["fps"])
  assert _tree_digest(source) == before  # the source folders are read, never written
  # The same build again reuses what is there; nothing already built is rewritten.
  built = _tree_digest(Path(data_dir))
  shutil.rmtree(source / "00000000")  # even if the source changed meanwhile
  _, reused = build.build("reference_samples", data_dir, source_dir=str(source), num_clips=0)
  assert reused and _tree_digest(Path(data_dir)) == built


@needs_exr
def test_gcs_sample_folders_build_into_gcs(gcs, tmp_path):
  """Sample folders on Cloud Storage (the suite's emulator) build into a gs:// data_dir in
  this process: the records a local build stores (each folder read locally), a broken folder
  skipped with the words it gets locally, the complete dataset reused by the same build."""
  del gcs
  local = tmp_path / "samples"
  clips = {f"{i:08d}": holey_clip(i) for i in range(4)}  # index 1 breaks; each split keeps one
  for name, clip in clips.items():
    sf.write_sample_folder(local / name, clip)
  _corrupt(local / "00000001", "pose count mismatch")
  bucket = f"gs://{test_gcs.BUCKET}/samples_build"
  source = f"{bucket}/samples"
  paths.upload_tree(str(local), source)
  assert sf.find_sample_folders(source) == [f"{source}/{name}" for name in clips]
  with pytest.raises(InputError) as remote:
    sf.read_sample_folder(f"{source}/00000001")
  with pytest.raises(InputError) as here:
    sf.read_sample_folder(local / "00000001")
  assert str(remote.value) == str(here.value).replace(str(local), source)

  data_dir = f"{bucket}/data"
  builder, reused = build.build("reference_samples", data_dir, source_dir=source, num_clips=0)
  assert not reused and str(builder.data_path).startswith(data_dir)
  records = {}
  for split in builders.SPLITS:
    for record in builders.load(data_dir, "reference_samples").as_data_source(split):
      clip = builders.record_to_clip(record)
      records[clip["clip_id"]] = clip
  assert sorted(records) == ["00000000", "00000002", "00000003"]
  for name, got in records.items():
    want = builders.to_record(sf.read_sample_folder(local / name), name, int(name))
    for key in ("frames", "depths", "depth_valid", "dynamic_masks", "intrinsics", "poses_c2w"):
      np.testing.assert_array_equal(got[key], np.asarray(want[key]).astype(got[key].dtype), err_msg=key)
    assert (got["caption"], got["fps"], got["index"]) == (want["caption"], want["fps"], want["index"])
    _assert_same_clip(got, clips[name])
  assert builder.info.splits["train"].num_examples == 1  # index 1 skipped, index 0 kept
  _, reused = build.build("reference_samples", data_dir, source_dir=source, num_clips=0)
  assert reused


def test_latent_static_mask_keeps_holes_and_their_bilinear_neighbours_out():
  from data_pipelines import encode_latents  # pylint: disable=g-import-not-at-top
  valid = np.ones((1, 8, 8), np.uint8)
  valid[0, 0, 0] = 0  # one hole in the top-left 2x2 block of latent cell (0, 0)
  dyn = np.zeros((1, 8, 8), np.uint8)
  dyn[0, 6:, 6:] = 1  # latent cell (3, 3) moves
  got = encode_latents.latent_static_mask(dyn, valid, 4, 4)[0]
  want = np.ones((4, 4), bool)
  want[0, 0] = want[3, 3] = False
  np.testing.assert_array_equal(got, want)
  valid[0, 3, 3] = 0  # a hole that cell (1, 1)'s bilinear taps (rows/cols 2..3) blend in
  assert not encode_latents.latent_static_mask(dyn, valid, 4, 4)[0, 1, 1]


def test_reference_frames_are_picked_with_the_reference_rule_and_defaults():
  from data_pipelines import encode_latents as el  # pylint: disable=g-import-not-at-top
  from mirage_jax import geometry  # pylint: disable=g-import-not-at-top
  assert (el.REF_VOXEL_SIZE, el.REF_IOU_THRESHOLD, el.REF_MAX_COUNT, el.REF_STRIDE, el.REF_MIN_GAP) == (
      0.1, 0.04, 8, 2, 2)  # the reference's data_config: 10 x 0.01, eps_iou, max_refs, K_ref_stride
  assert el.reference_candidates(12, range(4, 8)) == [0, 1, 2, 9, 10, 11]
  # A camera sliding sideways along a wall 2 m ahead, 0.6 m per frame; targets 0 and 8.
  n, h, w = 9, 32, 32
  c2w = np.stack([geometry.look_at([0.6 * i, 0, 0], [0.6 * i, 0, 1], up=(0, -1, 0)) for i in range(n)])
  K = np.broadcast_to(geometry.intrinsics_from_fov(60.0, h, w), (n, 3, 3))
  depths = np.full((n, h, w), 2.0, np.float32)
  pick = lambda cands, targets, **kw: el.select_references(depths, K, c2w, cands, targets, **kw)
  picked, ious = pick(list(range(1, 8)), [0, 8], stride=1)
  assert picked == [1, 7, 2, 6, 3, 5]  # best first; frame 4 (half way) is below IoU 0.04
  # Scored per target frame (frame 1 against frame 0 alone), not against the targets' union.
  assert ious[0] == pick([1], [0], stride=1)[1][0] == pytest.approx(0.6)
  assert pick(list(range(1, 8)), [0, 8])[0] == [1, 7, 3, 5]  # default stride 2: 1, 3, 5, 7
  assert pick(list(range(1, 8)), [0, 8], max_refs=2)[0] == [1, 7]
  keep = np.ones((n, h, w), bool)
  keep[1] = False  # frame 1 all moving or holes: no points, no overlap
  assert 1 not in pick([1, 7], [0, 8], keep=keep, stride=1)[0]
