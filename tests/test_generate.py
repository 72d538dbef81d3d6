"""generate CLI: end to end on a tiny geometry.npz, refusal to overwrite, bad inputs."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from data_pipelines import files, procedural
from experiments import tiny_cpu
from mirage_jax.evaluation import revisit
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_export(path: str, model: nnx.Module, config: ml_collections.ConfigDict) -> None:
  """An export directory as ``checkpoint.export_params`` writes it, from a model in memory."""
  os.makedirs(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(path, "params")),
               nnx.state(model, nnx.Param).to_pure_dict())
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": config.to_dict(), "step": 0, "source": "params", "dtype": None}, f)


def save_tiny_export(directory: str) -> str:
  """Randomly initialised tiny autoencoder + denoiser exports; returns the denoiser's path.

  One Euler step per chunk keeps compilation and sampling cheap in tests.
  """
  ae_config = tiny_cpu.get_config("autoencoder")
  ae_path = os.path.join(directory, "ae_export")
  _save_export(ae_path, autoencoder.Autoencoder(ae_config.autoencoder, nnx.Rngs(0)), ae_config)
  config = tiny_cpu.get_config("denoiser")
  config.denoiser.autoencoder_checkpoint = ae_path
  config.sampler = ml_collections.ConfigDict(dict(num_steps=1, method="euler", shift=1.0,
                                                 guidance_scale=0.0))
  dn_path = os.path.join(directory, "dn_export")
  _save_export(dn_path, denoiser.Denoiser(config.denoiser.model, nnx.Rngs(1)), config)
  return dn_path


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=None)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return save_tiny_export(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def geometry_npz(tmp_path_factory):
  # 40x48 (not the model's 32x32): generate must resize and crop frame 0 and the intrinsics.
  clip = procedural.render_clip(7, 6, 40, 48, trajectory="loop")
  path = tmp_path_factory.mktemp("clip") / "geometry.npz"
  files.save_geometry_npz(path, clip)
  return str(path)


def test_generate_end_to_end(export, geometry_npz, tmp_path):
  out = tmp_path / "out"
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={geometry_npz}",
                   f"--output_dir={out}", "--memory=mirage", "--num_frames=5", "--object_slots")
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == ["depth.mp4", "depth.npz", "objects.npz", "timings.json",
                                     "video.gif", "video.mp4"]
  frames = iio.imread(out / "video.mp4", index=None)
  assert frames.shape == (5, 32, 32, 3)
  assert iio.imread(out / "video.gif", index=None).shape[1:3] == (32, 32)
  depth = np.load(out / "depth.npz")
  assert depth["depths"].shape == (5, 32, 32) and np.all(depth["depths"] > 0)
  # Intrinsics follow the resize (40x48 -> cover 32x32 = 32x38) and the centre crop of 3 columns.
  K = files.load_geometry_npz(geometry_npz)["intrinsics"][0]
  s = 38 / 48
  np.testing.assert_allclose(depth["intrinsics"][0, 0, 0], K[0, 0] * s, rtol=1e-5)
  np.testing.assert_allclose(depth["intrinsics"][0, 0, 2], K[0, 2] * s - 3, rtol=1e-5)
  objects = np.load(out / "objects.npz")
  assert objects["dynamic"].shape == (5, 16, 16)
  assert objects["object_positions"].shape == (5, 8, 3) and objects["object_idents"].shape == (5, 8)
  timings = json.loads((out / "timings.json").read_text())
  assert timings["backend"] == "mirage" and timings["num_frames"] == 5
  assert timings["object_slots"] and timings["mask_dynamic"]  # slots keep moving content out
  assert len(timings["chunks"]) == 2  # 4 generated frames in chunks of 2
  for chunk in timings["chunks"]:
    assert chunk["chunk_seconds"] > 0 and 0 < chunk["memory_seconds"] < chunk["chunk_seconds"]
  # Append-only: frame 0 plus 4 frames, every latent pixel of 8x8 a point.
  assert timings["chunks"][-1]["cache_bytes"] == timings["cache_bytes"] > timings["chunks"][0]["cache_bytes"] > 0


def test_refuses_non_empty_output_dir(export, geometry_npz, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={geometry_npz}",
                   f"--output_dir={out}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --output_dir: field 'output_dir'")
  assert "--overwrite" in result.stderr
  assert os.listdir(out) == ["keep.txt"]


def test_prepare_output_dir_overwrite(tmp_path):
  (tmp_path / "x").write_text("1")
  with pytest.raises(Exception, match="not empty"):
    revisit.prepare_output_dir(str(tmp_path), overwrite=False)
  revisit.prepare_output_dir(str(tmp_path), overwrite=True)
  revisit.prepare_output_dir(str(tmp_path / "new" / "dir"), overwrite=False)
  assert (tmp_path / "new" / "dir").is_dir()
  with pytest.raises(Exception, match="not a directory"):
    revisit.prepare_output_dir(str(tmp_path / "x"), overwrite=True)


def test_bad_geometry_file_is_one_line_error(export, geometry_npz, tmp_path):
  data = dict(np.load(geometry_npz))
  del data["poses_c2w"]
  bad = tmp_path / "bad.npz"
  np.savez(bad, **data)
  result = run_cli("mirage_jax.generate", f"--checkpoint={export}", f"--geometry_path={bad}",
                   f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: {bad}: field 'poses_c2w'")
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()  # nothing created for a run that never started
