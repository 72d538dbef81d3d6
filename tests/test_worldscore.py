"""WorldScore adapter (cases -> our inputs -> its output layout) and the RealEstate10K
reconstruction protocol, on random tiny exports (small family; the Wan family's prompt path:
tests/test_prompts.py)."""

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from data_pipelines import files, procedural
from mirage_jax.errors import InputError
from mirage_jax.evaluation import reconstruction, worldscore as ws
from tests.test_depth_generation import make_depth_export
from tests.test_files import _write_re10k
from tests.test_generate import run_cli, save_tiny_export


def _relative_opencv(camera_path, frames=5, speed=1.0):
  """Last frame's OpenCV camera-to-world in the first frame's OpenCV camera, and all poses."""
  _, w2c = ws.camera_path_w2c(camera_path, frames, speed)
  c2w = ws.opencv_c2w(ws.blender_c2w(w2c))
  return np.linalg.inv(c2w[0]) @ c2w[-1], c2w


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("layout, centre, forward_x", [
    ("push_in", (0, 0, 2.0), 0.0),       # forward along the optical axis (OpenCV +z)
    ("pull_out", (0, 0, -2.0), 0.0),
    ("move_left", (-1.0, 0, 0), 0.0),    # OpenCV +x is right: left is -x, half a move
    ("move_right", (1.0, 0, 0), 0.0),
    ("pan_left", (0, 0, 0), -0.5),       # turns 30 degrees to the left, stays put
    ("pan_right", (0, 0, 0), 0.5),
    ("fixed", (0, 0, 0), 0.0),
])
def test_layouts_land_as_opencv_moves(layout, centre, forward_x):
  rel, c2w = _relative_opencv([layout], speed=2.0)
  np.testing.assert_allclose(rel[:3, 3], centre, atol=1e-9)
  np.testing.assert_allclose(rel[:3, 2][0], forward_x, atol=1e-9)
  assert abs(rel[1, 3]) < 1e-9 and abs(rel[:3, 2][1]) < 1e-9  # no vertical motion
  np.testing.assert_allclose(np.linalg.det(c2w[:, :3, :3]), 1.0, atol=1e-9)  # proper rotations


@pytest.mark.parametrize("layout, side", [("orbit_left", -1), ("orbit_right", 1)])
def test_orbit_circles_a_pivot_one_move_ahead(layout, side):
  rel, c2w = _relative_opencv([layout], frames=7, speed=1.5)
  assert np.sign(rel[0, 3]) == side  # the camera moves to that side
  # The pivot (1.5 ahead of frame 0) is on the last frame's optical axis, 1.5 ahead. (Between
  # keyframes WorldScore interpolates the w2c linearly, so it drifts slightly off axis.)
  p = np.linalg.inv(rel) @ np.array([0, 0, 1.5, 1])
  np.testing.assert_allclose(p[:3], [0, 0, 1.5], atol=1e-9)
  assert abs(rel[:3, 2][0]) == pytest.approx(0.5)  # turned 30 degrees towards it


def test_blender_and_opencv_axes():
  # Frame 0 of every path: WorldScore's identity camera saved as Blender c2w = diag(-1,1,-1);
  # Blender (x right, y up, z back) -> OpenCV (x right, y down, z forward) flips y and z.
  _, w2c = ws.camera_path_w2c(["push_in"], 3)
  np.testing.assert_allclose(ws.blender_c2w(w2c)[0], np.diag([-1.0, 1, -1, 1]))
  np.testing.assert_allclose(ws.opencv_c2w(ws.blender_c2w(w2c))[0], np.diag([-1.0, -1, 1, 1]))
  # Push in moves along the Blender camera's -z (it looks down -z).
  c2w = ws.blender_c2w(w2c)
  step = np.linalg.inv(c2w[0]) @ c2w[-1]
  np.testing.assert_allclose(step[:3, 3], [0, 0, -1], atol=1e-9)


def test_frame_counts_and_interpolation():
  keys, w2c = ws.camera_path_w2c(["move_right", "pan_left", "push_in"], frames=6)
  assert keys.shape == (4, 4, 4) and w2c.shape == (3 * 5 + 1, 4, 4)
  np.testing.assert_allclose(w2c[::5], keys, atol=1e-12)  # keyframes at the anchor frames
  # Translation of the w2c interpolated linearly between keyframes.
  np.testing.assert_allclose(w2c[2, :3, 3], keys[0, :3, 3] + 0.4 * (keys[1, :3, 3] - keys[0, :3, 3]))
  # Each layout is made in the previous keyframe's camera: after pan_left, push_in goes
  # along the turned axis (forward of keyframe 2, in OpenCV of frame 0: left and ahead).
  c2w = ws.opencv_c2w(ws.blender_c2w(keys))
  rel = np.linalg.inv(c2w[2]) @ c2w[3]
  np.testing.assert_allclose(rel[:3, 3], [0, 0, 1], atol=1e-9)
  with pytest.raises(InputError, match="unknown 'spin'"):
    ws.camera_path_w2c(["spin"], 5)


def test_intrinsics_and_center_crop():
  K = ws.intrinsics(3, 64, 48, 500.0)
  np.testing.assert_allclose(K[0], [[500, 0, 32], [0, 500, 24], [0, 0, 1]])
  image = np.zeros((40, 100, 3), np.uint8)
  image[:, 30:70] = 255  # the centred 40x40 square
  out = ws.center_crop(Image.fromarray(image), 20, 20)
  assert out.shape == (20, 20, 3) and out.min() == 255


# ----------------------------------------------------------------------------- case files


def _dataset(root, size=(48, 48)):
  """A WorldScore-Dataset folder: one static and one dynamic case, as its JSON lists them."""
  rng = np.random.default_rng(0)
  for rel in ("static/images/photorealistic/indoor/kitchen/007.png",
              "dynamic/images/photorealistic/rigid/012.jpg"):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / rel)
  kitchen = root / "static/images/photorealistic/indoor/kitchen"
  (kitchen / "008.png").write_bytes((kitchen / "007.png").read_bytes())
  # 007 and 008: the same image and camera path, other prompts.
  static = [dict(image=f"static/images/photorealistic/indoor/kitchen/{name}.png",
                 visual_movement="static", visual_style="photorealistic", scene_type="indoor",
                 camera_path=["push_in"], style="Photorealistic style.",
                 prompt_list=[first, "A stove"], content_list=[["stove"], ["stove"]])
            for name, first in (("007", "A kitchen."), ("008", "A red barn in snow."))]
  dynamic = [dict(image="dynamic/images/photorealistic/rigid/012.jpg",
                  visual_movement="dynamic", visual_style="photorealistic", motion_type="rigid",
                  camera_path=["fixed"], style="Photorealistic style.", prompt="A car drives",
                  masks=["dynamic/masks/012.png"], objects=["car"])]
  (root / "static" / "static.json").write_text(json.dumps(static))
  (root / "dynamic" / "dynamic.json").write_text(json.dumps(dynamic))
  return root


def test_load_cases(tmp_path):
  root = _dataset(tmp_path)
  case, _ = ws.load_cases(root, "static")
  assert case.relative_dir == "static/photorealistic/indoor/kitchen/007"
  assert case.prompts == ["A kitchen. Photorealistic style.", "A stove. Photorealistic style."]
  (dyn,) = ws.load_cases(root, "dynamic")
  assert dyn.relative_dir == "dynamic/photorealistic/rigid/012" and dyn.camera_path == ["fixed"]
  entries = json.loads((root / "static" / "static.json").read_text())
  entries[0]["camera_path"] = ["zoom"]
  (root / "static" / "bad.json").write_text(json.dumps(entries))
  with pytest.raises(InputError, match="camera_path.*unknown layout 'zoom'"):
    ws.load_cases(root, "static", "bad.json")
  with pytest.raises(InputError, match="does not exist"):
    ws.load_cases(root, "static", "missing.json")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("exports"))
  return save_tiny_export(d), make_depth_export(d)


@pytest.mark.slow  # 26-35 s on the loaded 2-core machine (the rollout and depth model compile)
def test_worldscore_generation_end_to_end(exports, tmp_path):
  dn, depth_model = exports
  root = _dataset(tmp_path / "WorldScore-Dataset")
  out = tmp_path / "worldscore_output"
  args = [f"--checkpoint={dn}", f"--depth_model={depth_model}", f"--cases={root}",
          f"--output_dir={out}", "--frames=3", "--resolution=48,48", "--focal_length=40"]
  result = run_cli("mirage_jax.worldscore_generate", *args)
  assert result.returncode == 0, result.stderr
  assert "prompts are not used" in result.stdout  # the small family has no text input
  static = out / "static/photorealistic/indoor/kitchen/007"
  assert sorted(os.listdir(static)) == ["camera_data.json", "frames", "image_data.json",
                                        "input_image.png", "mirage.json", "time.txt", "videos"]
  assert sorted(os.listdir(static / "frames")) == ["000.png", "001.png", "002.png"]
  assert iio.imread(static / "frames" / "001.png").shape == (48, 48, 3)  # --resolution, not 32
  assert os.path.isfile(static / "videos" / "output.mp4")
  image_data = json.loads((static / "image_data.json").read_text())
  assert image_data["total_frames"] == 3 and image_data["num_scenes"] == 1
  assert image_data["anchor_frame_idx"] == [0, 2] and image_data["content_list"] == [["stove"], ["stove"]]
  cams = json.loads((static / "camera_data.json").read_text())
  assert cams["focal_length"] == 40 and cams["scale"] == 1.0 and len(cams["cameras_interp"]) == 3
  # The evaluator's cameras (Blender c2w) and the poses we generated along (OpenCV c2w).
  mirage = json.loads((static / "mirage.json").read_text())
  poses = np.array(mirage["poses_c2w_opencv"])
  np.testing.assert_allclose(poses, ws.opencv_c2w(np.array(cams["cameras_interp"])), atol=1e-6)
  np.testing.assert_allclose((np.linalg.inv(poses[0]) @ poses[-1])[:3, 3], [0, 0, 1], atol=1e-6)
  assert mirage["prompt"] is None and not mirage["prompt_used"]
  dynamic = out / "dynamic/photorealistic/rigid/012"
  assert len(os.listdir(dynamic / "frames")) == 3
  assert "anchor_frame_idx" not in json.loads((dynamic / "image_data.json").read_text())
  # Complete cases are skipped (WorldScore's regenerate: False) without loading the model.
  assert ws.is_complete(static, 3) and not ws.is_complete(static, 4)
  # The small family ignores the prompts: 008 (same image, path and seed) is 007 again.
  other = out / "static/photorealistic/indoor/kitchen/008"
  for i in (1, 2):
    np.testing.assert_array_equal(iio.imread(other / "frames" / f"00{i}.png"),
                                  iio.imread(static / "frames" / f"00{i}.png"))
  os.remove(static / "frames" / "002.png")
  assert not ws.is_complete(static, 3)


@pytest.mark.slow  # ~45 s on the loaded 2-core machine (the rollout and depth model compile)
def test_re10k_reconstruction_end_to_end(exports, tmp_path):
  dn, depth_model = exports
  (tmp_path / "re10k").mkdir()
  for seed in (3, 4):
    clip = procedural.render_clip(seed, 6, 32, 32, trajectory="loop")
    _write_re10k(tmp_path / "re10k" / f"clip{seed}.txt", clip)
  out = tmp_path / "out"
  result = run_cli("mirage_jax.evaluate_re10k", f"--checkpoint={dn}", f"--depth_model={depth_model}",
                   f"--clips={tmp_path / 're10k'}", f"--output_dir={out}", "--num_frames=3",
                   "--stride=2")
  assert result.returncode == 0, result.stderr
  metrics = json.loads((out / "metrics.json").read_text())
  assert sorted(metrics["clips"]) == ["clip3", "clip4"] and metrics["summary"]["clips"] == 2
  for r in metrics["clips"].values():
    assert r["frames"] == 3 and len(r["per_frame"]["psnr"]) == 2 and r["lpips"] is None
  np.testing.assert_allclose(metrics["summary"]["psnr"],
                             np.mean([r["psnr"] for r in metrics["clips"].values()]))
  table = (out / "metrics.md").read_text()
  assert "| clip3 |" in table and " mean |" in table and "no LPIPS weights" in table
  assert iio.imread(out / "videos" / "clip3.mp4", index=None).shape[0] == 3


def test_lpips_scores_the_generated_frames_only(tmp_path):
  """With a scorer, each generated frame (1..T-1) gets its LPIPS; frame 0 (given) none."""
  from mirage_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top
  from tests.fixtures_util import write_random_lpips_weights  # pylint: disable=g-import-not-at-top
  backbone, linear = write_random_lpips_weights(str(tmp_path))
  scorer = lpips.load(backbone, "alex", linear)
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  generated = truth.copy()
  generated[2] = 255 - generated[2]
  s = reconstruction.score_clip(generated, truth, scorer)
  per = s["per_frame"]["lpips"]
  assert len(per) == 2 and per[0] == pytest.approx(0.0, abs=1e-6) and per[1] > 0.0
  assert s["lpips"] == pytest.approx(np.mean(per))


def test_reconstruction_scores():
  truth = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
  same = reconstruction.score_clip(truth, truth)
  assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0) and same["lpips"] is None
  noisy = truth.copy()
  noisy[2] = 255 - noisy[2]  # frame 2 wrong; frame 0 (given) is never scored
  noisy[0] = 0
  s = reconstruction.score_clip(noisy, truth)
  assert s["per_frame"]["psnr"][0] == 100.0 and s["per_frame"]["psnr"][1] < 20
  clip = dict(frames=np.arange(10), depths=np.arange(10), intrinsics=np.arange(10),
              poses_c2w=np.arange(10))
  assert list(reconstruction.select_frames(clip, 3, 4)["frames"]) == [0, 4, 8]


def test_rollout_set_text_refreshes_the_steps_parameters():
  """A new prompt per case without rebuilding (recompiling) the rollout: the cached
  parameters of every mesh follow the model's text."""
  from mirage_jax import rollout  # pylint: disable=g-import-not-at-top

  class Model:
    text = np.zeros(2)
    set_text = lambda self, e: setattr(self, "text", np.asarray(e))
    params = lambda self: (self.text,)

  r = rollout.Rollout(Model())
  mesh = rollout.trajectory_mesh(1)
  r._per_mesh[mesh] = dict(params=r.model.params(), step="compiled")  # pylint: disable=protected-access
  r.set_text(np.ones(2))
  fns = r._per_mesh[mesh]  # pylint: disable=protected-access
  np.testing.assert_array_equal(fns["params"][0], [1, 1])
  assert fns["step"] == "compiled"
  # A family without text refuses prompts (the WorldScore CLI then leaves them unused).
  from experiments import tiny_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config("denoiser")
  from mirage_jax import families  # pylint: disable=g-import-not-at-top
  small = families.world_model(config)
  assert not small.takes_text
  with pytest.raises(InputError, match="has no text input"):
    small.encode_prompts(config, ["a kitchen"])
