"""The Memory Maze protocol (Po et al. 2025, scaled down): given frames as clean context,
held-out seeds, the table beside the paper's figures, and one-line errors for a missing
extra. Rendering is faked where the memory_maze extra would be needed (CI has none); the
end-to-end CLI run needs the extra and is skipped without it."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from data_pipelines import memory_maze, procedural
from experiments import tiny_cpu
from mirage_jax import geometry, rollout
from mirage_jax import families
from mirage_jax.errors import InputError
from mirage_jax.evaluation import lpips
from mirage_jax.evaluation import memory_maze_protocol as protocol
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser
from tests.fixtures_util import write_random_lpips_weights
from tests.test_generate import ROOT, run_cli, save_tiny_export
from tests.conftest import xla_flags


@pytest.fixture(scope="module")
def models():
  config = tiny_cpu.get_config("denoiser")
  ae = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))
  dn = denoiser.Denoiser(config.denoiser.model, nnx.Rngs(1))
  return config, ae, dn


def test_given_frames_are_the_clean_context(models):
  # With no memory, what follows the given frames depends on them only: the first frame
  # (different in the two runs) is forgotten once frames 1-2 are given as context.
  config, ae, dn = models
  assert config.denoiser.target_frames == 2 and config.denoiser.context_frames == 1
  h, w = config.data.resolution
  r = rollout.make_rollout(config, ae, dn, backend="none", capacity=1024)
  n = 6
  K = np.repeat(geometry.intrinsics_from_fov(70, h, w)[None], n, 0)
  poses = np.stack([geometry.look_at([0.1 * i, 1.5, 0], [0.1 * i, 1.5, 3], up=(0, 1, 0))
                    for i in range(n)])
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 255, (3, h, w, 3), dtype=np.uint8)
  depths = np.full((3, h, w), 3.0, np.float32)
  other = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

  def run(frame0, given):
    return r.generate_batch([frame0], [depths[0]], [K], [poses], progress=False,
                            oracle_frames=[(gt, depths)], given_frames=[given])[0]["frames"]
  # Chunks are frames 1-2, 3-4, 5: frames 1-2 given, so 3-5 follow from frame 2's encoding.
  a, b = run(gt[0], 3), run(other, 3)
  np.testing.assert_array_equal(a[3:], b[3:])
  # Given only to memory (the `none` backend ignores it), frame 0 carries through.
  a0, b0 = run(gt[0], 0), run(other, 0)
  assert np.abs(a0[3:].astype(int) - b0[3:]).mean() > 1.0
  with pytest.raises(InputError, match="given_frames"):
    run(gt[0], 4)  # more than the ground-truth frames passed


def test_trajectory_renders_explore_at_64_and_gives_half():
  calls = []

  def fake_render(seed, num_frames, height, width, *, policy):
    calls.append((seed, num_frames, height, width, policy))
    return procedural.render_clip(seed, num_frames, height, width, trajectory="loop")
  t = protocol.trajectory(7, 5, (32, 32), render=fake_render)
  assert calls == [(7, 10, 64, 64, "explore")]
  assert t.frames.shape == (10, 32, 32, 3) and t.depths.shape == (10, 32, 32)
  assert t.context == 5 and t.name == "maze7"
  # Intrinsics follow the 64 -> 32 resize.
  clip = fake_render(7, 10, 64, 64, policy="explore")
  np.testing.assert_allclose(t.intrinsics[0, 0, 0], clip["intrinsics"][0, 0, 0] / 2, rtol=1e-5)


def _maze_config(first_seed=0, num_clips=64):
  c = tiny_cpu.get_config("denoiser,memory_maze")
  c.data.build.update(first_seed=first_seed, num_clips=num_clips)
  return c


def test_held_out_seeds_must_not_overlap_training_mazes():
  protocol.check_seeds(range(1_000_000, 1_000_004), _maze_config())
  protocol.check_seeds(range(64, 70), _maze_config())  # just past 0..63
  with pytest.raises(InputError, match="overlap the training mazes 0:64"):
    protocol.check_seeds(range(60, 70), _maze_config())
  with pytest.raises(InputError, match="overlap"):
    protocol.check_seeds(range(5, 6), _maze_config(first_seed=5, num_clips=3))
  # A model trained on other data has no maze seeds to avoid.
  protocol.check_seeds(range(0, 4), tiny_cpu.get_config("denoiser"))
  for bad in (0, 501):
    with pytest.raises(InputError, match="memory_maze_context"):
      protocol.check_context(bad)


def test_memory_maze_variant_of_the_tiny_config():
  ae, dn = tiny_cpu.get_config("autoencoder,memory_maze"), tiny_cpu.get_config("denoiser,memory_maze")
  assert ae.data.dataset == dn.data.dataset == "memory_maze"
  assert tuple(dn.data.resolution) == (64, 64) and dn.data.build.resolution == 64
  # 4x downsampling at 64x64: the 32x32 config's 16x16 latents, so the same denoiser cost.
  assert autoencoder.downsample_factor(ae.autoencoder) == 4
  assert dn.data.num_frames == dn.denoiser.memory_frames + dn.denoiser.target_frames
  with pytest.raises(ValueError, match="variant"):
    tiny_cpu.get_config("denoiser,nope")


def test_table_puts_rows_beside_the_paper():
  s = lambda p, q: dict(psnr_all=p, ssim_all=q, psnr_revisit=p, coverage_revisit=0.5)
  metrics = {protocol.GROUP: dict(summary=dict(none=s(11.0, 0.2), voxel=s(14.5, 0.4),
                                               oracle=s(17.0, 0.5), composite=s(20.0, 0.7),
                                               reference={}, revisit_frames=3),
                                  trajectories={"maze1": {}, "maze2": {}}),
             "protocol": protocol.describe(100, range(1_000_000, 1_000_002), (64, 64))}
  text = protocol.format_table(metrics)
  lines = text.splitlines()
  assert "2 held-out mazes" in lines[0] and "100 frames given, 100 generated" in lines[0]
  assert "400 given, 400 generated" in lines[0] and "LPIPS: not scored" in lines[0]
  rows = {line.split("|")[1].strip(): line for line in lines[3:]}
  assert "14.500" in rows["voxel (ours)"] and "0.400" in rows["voxel (ours)"]
  assert "11.000" in rows["none (memory model, memory off)"]
  assert "17.000" in rows["oracle (memory written from ground truth)"]
  paper = rows["Po et al. 2025: their model (SSM + local attention)"]
  assert "30.800" in paper and "0.898" in paper and "0.069" in paper
  assert "26.400" in rows["Po et al. 2025: causal transformer"]
  assert "32.600" in rows["Po et al. 2025: full-context upper bound"]
  # No LPIPS weights: our rows' LPIPS cells say so (no number, no bare dash); the paper's stays.
  for name, line in rows.items():
    cells = [c.strip() for c in line.split("|")[1:-1]]
    lpips_cell = cells[protocol.COLUMNS.index("lpips")]
    assert lpips_cell == ("0.069" if "SSM" in name else "-" if name.startswith("Po et al.")
                          else lpips.NO_WEIGHTS), (name, lpips_cell)
  # With weights: the number.
  metrics["lpips"] = dict(net="alex", backbone="/w/alexnet.pth", linear="/w/alex.pth", version="0.1")
  metrics[protocol.GROUP]["summary"]["voxel"]["lpips_all"] = 0.25
  text = protocol.format_table(metrics)
  assert "LPIPS: v0.1 alex." in text and lpips.NO_WEIGHTS not in text
  assert "0.250" in next(line for line in text.splitlines() if "voxel (ours)" in line)


def _fake_missing(tmp_path, error: str) -> dict:
  """Environment whose `import memory_maze` fails with ``error`` (a missing package or a
  missing OpenGL library), in front of the real one."""
  fake = tmp_path / "fake" / "memory_maze"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(f"raise {error}\n")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(),
              PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{ROOT}")


@pytest.mark.parametrize("error", ["ImportError('No module named memory_maze')",
                                   "RuntimeError(\"OSMesa library not found: libOSMesa.so\")"])
def test_missing_extra_or_osmesa_is_one_line_naming_the_install_step(tmp_path, error):
  env = _fake_missing(tmp_path, error)
  commands = [
      ["mirage_jax.evaluate", "--benchmark=memory_maze", f"--checkpoint={tmp_path}/none",
       f"--output_dir={tmp_path}/out"],
      ["mirage_jax.main_job", "--config=experiments/tiny_cpu.py:memory_maze",
       f"--workdir={tmp_path}/job"],
      ["data_pipelines.build", "--dataset=memory_maze", f"--data_dir={tmp_path}/data",
       "--num_clips=3", "--frames_per_clip=4", "--resolution=16"],
  ]
  for cmd in commands:
    result = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2, (cmd, result.stderr[-2000:])
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, (cmd, result.stderr[-2000:])
    assert "pip install -e '.[memory_maze]'" in err[0] and "libosmesa6" in err[0], err[0]
    assert "memory_maze" in err[0]
  assert not (tmp_path / "out").exists()  # evaluate claims no output folder
  assert not [f for f in (tmp_path / "data").rglob("*") if f.is_file()]  # no dataset files


def test_main_job_refuses_an_unknown_config_variant(tmp_path):
  result = run_cli("mirage_jax.main_job", "--config=experiments/tiny_cpu.py:nope",
                   f"--workdir={tmp_path}/job")
  assert result.returncode == 2 and "variant" in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(not memory_maze.is_available(), reason="memory_maze extra not installed "
                    "(pip install -e '.[memory_maze]', apt-get install -y libosmesa6)")
def test_evaluate_cli_memory_maze_protocol(tmp_path):
  export = save_tiny_export(str(tmp_path / "export"))
  out = tmp_path / "maze"
  # LPIPS through the whole flow (random weights: the numbers only test the plumbing).
  backbone, linear = write_random_lpips_weights(str(tmp_path))
  result = run_cli("mirage_jax.evaluate", "--benchmark=memory_maze", f"--checkpoint={export}",
                   "--memory_maze_context=3", "--memory_maze_seeds=1000000:1000001",
                   "--backends=none,voxel", "--novideos", f"--output_dir={out}",
                   f"--lpips_backbone={backbone}", f"--lpips_linear={linear}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["benchmark"] == "memory_maze" and "revisit" not in metrics
  assert metrics["protocol"]["given_frames"] == 3 and metrics["protocol"]["policy"] == "explore"
  res = metrics[protocol.GROUP]["trajectories"]["maze1000000"]
  assert res["num_frames"] == 6 and res["context"] == 3
  row = res["rows"]["voxel"]
  assert row["psnr_per_frame"][:3] == [None] * 3  # given, not scored
  np.testing.assert_allclose(row["psnr_all"], np.mean(row["psnr_per_frame"][3:]), rtol=1e-6)
  assert row["lpips_per_frame"][:3] == [None] * 3 and min(row["lpips_per_frame"][3:]) > 0
  np.testing.assert_allclose(row["lpips_all"], np.mean(row["lpips_per_frame"][3:]), rtol=1e-6)
  assert metrics["lpips"]["net"] == "alex" and metrics["lpips"]["backbone"] == backbone
  assert "LPIPS: v0.1 alex." in result.stdout and lpips.NO_WEIGHTS not in result.stdout
  voxel_line = next(line for line in result.stdout.splitlines() if " voxel (ours) |" in line)
  assert f"{metrics[protocol.GROUP]['summary']['voxel']['lpips_all']:.3f}" in voxel_line
  assert (out / "memory_maze_lpips_vs_frame.png").exists()
  assert set(res["rows"]) == {"none", "voxel", "oracle", "composite"}
  assert "Po et al. 2025: causal transformer" in result.stdout
  assert "Memory Maze protocol beside Po et al. 2025" in (out / "index.html").read_text()
