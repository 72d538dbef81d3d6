"""data_pipelines.make_geometry: a geometry.npz from a built dataset's clip (that drives
generate) and from one's own frames/depth/cameras; one-line errors; no silent overwrite."""

import os

import imageio.v3 as iio
import numpy as np
import pytest

from data_pipelines import builders, files, make_geometry, procedural
from mirage_jax.errors import InputError
from tests.test_generate import run_cli, save_tiny_export

# 3 clips: one per split (TFDS refuses empty splits).
DATASET = dict(num_clips=3, frames_per_clip=6, resolution=32, moving_objects=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  builders.prepare(builders.make_builder("procedural_rooms", str(d), **DATASET))
  return str(d)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return save_tiny_export(str(tmp_path_factory.mktemp("export")))


def _record(data_dir: str, split: str, index: int) -> dict:
  return builders.record_to_clip(builders.load(data_dir, "procedural_rooms").as_data_source(split)[index])


def _re10k_text(clip: dict) -> str:
  """The clip's cameras as a RealEstate10K camera file (intrinsics normalised by the size)."""
  _, h, w, _ = clip["frames"].shape
  lines = ["https://example.com/video"]
  for i, (k, c2w) in enumerate(zip(clip["intrinsics"], clip["poses_c2w"])):
    w2c = np.linalg.inv(c2w.astype(np.float64))[:3]
    row = [k[0, 0] / w, k[1, 1] / h, k[0, 2] / w, k[1, 2] / h, 0.0, 0.0, *w2c.reshape(-1)]
    lines.append(" ".join([str(1000 + 33_333 * i)] + [repr(float(x)) for x in row]))
  return "\n".join(lines) + "\n"


@pytest.fixture
def own_files(tmp_path):
  """first_frame.png, its depth.npy (H, W) and cameras.txt of 5 cameras; and the clip they came from."""
  clip = procedural.render_clip(11, 5, 24, 32, trajectory="loop")
  iio.imwrite(tmp_path / "first_frame.png", clip["frames"][0])
  np.save(tmp_path / "depth.npy", clip["depths"][0])
  (tmp_path / "cameras.txt").write_text(_re10k_text(clip))
  return tmp_path, clip


def test_dataset_clip_drives_generate(data_dir, export, tmp_path):
  out = tmp_path / "clip" / "geometry.npz"
  result = run_cli("data_pipelines.make_geometry", f"--data_dir={data_dir}", "--split=test",
                   "--clip=0", "--frame_range=1:5", f"--output={out}")
  assert result.returncode == 0, result.stderr
  record = _record(data_dir, "test", 0)
  made = files.load_geometry_npz(out)
  for key in ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks"):
    np.testing.assert_array_equal(made[key], record[key][1:5], err_msg=key)
  np.testing.assert_array_equal(made["object_tracks"], record["object_tracks"][:, 1:5])
  assert made["known_frames"] == made["known_depths"] == 4 and made["has_depth"]

  # What generate does with it, in this process (the generate command line reading the
  # dataset's geometry.npz runs in tests/test_doc_commands.py's README chain).
  from mirage_jax import families, memory, rollout  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import inference_inputs  # pylint: disable=g-import-not-at-top
  config, ae, dn = rollout.load_world_model(export)
  clip = inference_inputs.fit_inputs(files.load_inference_geometry(str(out)),
                                     config.data.resolution)
  np.testing.assert_allclose(clip["poses_c2w"], record["poses_c2w"][1:5])
  backend = config.memory.backend
  r = rollout.make_rollout(config, ae, dn, backend=backend, **memory.capacity_for(
      backend, 4, families.world_model(config).memory_config(config)))
  made = r.generate(clip["first_frame"], clip["first_depth"], clip["intrinsics"],
                    clip["poses_c2w"], progress=False)
  assert made["frames"].shape == (4, 32, 32, 3) and made["depths"].shape == (4, 32, 32)
  assert np.isfinite(made["depths"]).all()


def test_own_first_frame_depth_and_re10k_cameras(own_files):
  d, clip = own_files
  made = make_geometry.from_files(str(d / "first_frame.png"), str(d / "depth.npy"),
                                  str(d / "cameras.txt"))
  assert made["frames"].shape == (5, 24, 32, 3)
  # Frames and depth beyond the one known repeat it, and the file says so.
  np.testing.assert_array_equal(made["frames"], np.repeat(clip["frames"][:1], 5, axis=0))
  np.testing.assert_array_equal(made["depths"], np.repeat(clip["depths"][:1], 5, axis=0))
  assert made["known_frames"] == made["known_depths"] == 1
  np.testing.assert_allclose(made["poses_c2w"], clip["poses_c2w"], atol=1e-5)
  np.testing.assert_allclose(made["intrinsics"], clip["intrinsics"], rtol=1e-6)
  np.testing.assert_allclose(made["fps"], 30.0, rtol=1e-3)  # 33 333 us between timestamps


def test_own_video_depths_and_npz_cameras_through_the_cli(own_files):
  d, clip = own_files
  iio.imwrite(d / "frames.gif", clip["frames"][:3], loop=0)
  np.savez(d / "depths.npz", depths=clip["depths"][:3])
  np.savez(d / "cams.npz", poses_c2w=clip["poses_c2w"], intrinsics=clip["intrinsics"][0], fps=10.0)
  out = d / "geometry.npz"
  args = [f"--frames={d / 'frames.gif'}", f"--depth={d / 'depths.npz'}",
          f"--cameras={d / 'cams.npz'}", f"--output={out}"]
  result = run_cli("data_pipelines.make_geometry", *args)
  assert result.returncode == 0, result.stderr
  made = files.load_geometry_npz(out)
  assert (made["known_frames"], made["known_depths"], float(made["fps"])) == (3, 3, 10.0)
  np.testing.assert_array_equal(made["depths"][:3], clip["depths"][:3])
  np.testing.assert_array_equal(made["depths"][3:], np.repeat(clip["depths"][2:3], 2, axis=0))

  # An existing output is never replaced without --overwrite, and is left as it was.
  before = out.read_bytes()
  result = run_cli("data_pipelines.make_geometry", *args[:2], f"--cameras={d / 'cameras.txt'}",
                   f"--output={out}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {out}: field 'output': exists (pass "
                                                "--overwrite to replace it)"]
  assert out.read_bytes() == before
  result = run_cli("data_pipelines.make_geometry", *args[:2], f"--cameras={d / 'cameras.txt'}",
                   f"--output={out}", "--overwrite")
  assert result.returncode == 0, result.stderr
  assert out.read_bytes() != before


def test_posed_files_build_refuses_a_partial_file(own_files, tmp_path):
  d, _ = own_files
  made = make_geometry.from_files(str(d / "first_frame.png"), str(d / "depth.npy"),
                                  str(d / "cameras.txt"))
  source = tmp_path / "source"
  files.save_geometry_npz(source / "mine" / "geometry.npz", made)
  with pytest.raises(InputError, match="known_frames.*only 1 of 5 frames"):
    builders._file_clip(0, root=str(source), paths=(str(source / "mine" / "geometry.npz"),))


def _write(d, name, make):
  make(d / name)
  return str(d / name)


BAD_OWN = {
    # name: (frames, depth, cameras) makers -> (file named, field named, words in the problem)
    "frames_missing": (lambda d: str(d / "nope.png"), None, None, "nope.png", "frames", "does not exist"),
    "frames_not_an_image": (lambda d: _write(d, "f.txt", lambda p: p.write_text("x")), None, None,
                            "f.txt", "frames", "expected an image"),
    "depth_zero": (None, lambda d: _write(d, "z.npy", lambda p: np.save(p, np.zeros((24, 32)))), None,
                   "z.npy", "depth", "768 values not finite and > 0"),
    "depth_wrong_size": (None, lambda d: _write(d, "s.npy", lambda p: np.save(p, np.ones((12, 32)))),
                         None, "s.npy", "depth", "size 12x32 differs from the frames' 24x32"),
    "depth_npz_two_arrays": (None, lambda d: _write(d, "t.npz", lambda p: np.savez(p, a=1, b=2)), None,
                             "t.npz", "depth", "expected an array named depth or depths"),
    "cameras_npz_without_poses": (None, None, lambda d: _write(
        d, "c.npz", lambda p: np.savez(p, intrinsics=np.eye(3))), "c.npz", "poses_c2w", "missing"),
    "cameras_not_rigid": (None, None, lambda d: _write(d, "c.npz", lambda p: np.savez(
        p, intrinsics=np.eye(3), poses_c2w=np.tile(2 * np.eye(4), (5, 1, 1)))), "c.npz", "poses_c2w", ""),
    "cameras_one_only": (None, None, lambda d: _write(d, "c.npz", lambda p: np.savez(
        p, intrinsics=np.eye(3), poses_c2w=np.eye(4)[None])), "c.npz", "poses_c2w", "at least 2"),
    "cameras_re10k_short_line": (None, None, lambda d: _write(
        d, "c.txt", lambda p: p.write_text("url\n1 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.5 0.5\n")),
        "c.txt", "line 2", "expected 19 numbers"),
    "more_frames_than_cameras": (None, lambda d: _write(d, "m.npy", lambda p: np.save(
        p, np.ones((6, 24, 32)))), None, "m.npy", "depth", "6 frames but"),
}


@pytest.mark.parametrize("case", sorted(BAD_OWN))
def test_bad_own_inputs_name_file_and_field(own_files, case):
  d, _ = own_files
  frames, depth, cameras, name, field, words = BAD_OWN[case]
  args = [frames(d) if frames else str(d / "first_frame.png"), depth(d) if depth else str(d / "depth.npy"),
          cameras(d) if cameras else str(d / "cameras.txt")]
  with pytest.raises(InputError) as e:
    make_geometry.from_files(*args)
  assert os.path.basename(e.value.where) == name and e.value.field == field, str(e.value)
  assert words in e.value.problem and "\n" not in str(e.value)


@pytest.mark.parametrize("split,index,frame_range,field,words", [
    ("test", 1, None, "clip", "index 1 not in the test split's 1 clips"),
    ("tests", 0, None, "split", "no split 'tests'"),
    ("test", 0, "3:4", "frame_range", "need a:b"),
    ("test", 0, "0:9", "frame_range", "<= 6"),
])
def test_bad_dataset_inputs(data_dir, split, index, frame_range, field, words):
  with pytest.raises(InputError) as e:
    make_geometry.from_dataset(data_dir, "procedural_rooms", "default", split, index, frame_range)
  assert e.value.field == field and words in e.value.problem, str(e.value)


def test_missing_dataset_and_mixed_modes_are_one_line(tmp_path):
  out = tmp_path / "g.npz"
  result = run_cli("data_pipelines.make_geometry", f"--data_dir={tmp_path}", f"--output={out}")
  assert result.returncode == 2 and "field 'dataset': no complete dataset here" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  result = run_cli("data_pipelines.make_geometry", f"--data_dir={tmp_path}", "--frames=a.png",
                   f"--output={out}")
  assert result.returncode == 2 and "give either --data_dir" in result.stderr
  result = run_cli("data_pipelines.make_geometry", "--frames=a.png", f"--output={out}")
  assert result.returncode == 2 and "--depth: field 'depth': required" in result.stderr
  assert not out.exists()
