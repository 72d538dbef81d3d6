"""Baselines trained for their job (issue 17): memory-off training, rows from other
checkpoints in the revisit benchmark, and first-visit (no memory coverage) scores."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import procedural
from experiments import common, tiny_cpu
from mirage_jax import geometry, rollout
from mirage_jax import checkpoint, families
from mirage_jax.evaluation import metrics, report, revisit, scaling
from mirage_jax.families.small import denoiser
from mirage_jax.families.small import stages as small_stages
from tests.test_generate import _save_export, run_cli, save_tiny_export


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """(memory model, baseline trained without memory): tiny random exports, different weights."""
  directory = str(tmp_path_factory.mktemp("exports"))
  memory_model = save_tiny_export(directory)
  config = common.memory_baseline(checkpoint.export_config(memory_model), "none")
  path = os.path.join(directory, "dn_none_export")
  model = denoiser.Denoiser(config.denoiser.model, nnx.Rngs(7))
  # A fresh DiT's zero-initialised output layers predict the memory prior whatever the
  # other weights; perturbed weights make a different model, as training would.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)
  _save_export(path, nnx.merge(graphdef, params, rest), config)
  return memory_model, path


@pytest.fixture(scope="module")
def loop_clip():
  clip = procedural.render_clip(100002, 12, 32, 32, trajectory="loop")
  return revisit.Trajectory(name="seed100002", fps=10.0, **revisit.fit_clip(clip, (32, 32)))


def _window(config):
  """One training window (batch 1) of a procedural loop, as DenoiserStage reads it."""
  clip = procedural.render_clip(3, config.data.num_frames, 32, 32, trajectory="loop")
  fitted = revisit.fit_clip(clip, (32, 32))
  return {k: jnp.asarray(fitted[k])[None] for k in ("depths", "intrinsics", "poses_c2w",
                                                   "dynamic_masks")}


def test_memory_off_training_never_reads_memory():
  config = tiny_cpu.get_config("denoiser")
  batch = _window(config)
  h = 32 // 2  # tiny: 2x downsampling
  latents = jnp.asarray(np.random.default_rng(0).normal(
      size=(1, config.data.num_frames, h, h, config.autoencoder.latent_channels)), jnp.float32)
  conds = {}
  for backend in ("voxel", "none", "frame_bank"):
    c = config if backend == "voxel" else common.memory_baseline(config, backend)
    assert c.memory.backend == backend and c.train.steps == config.train.steps
    assert c.sampler.to_dict() == config.sampler.to_dict() and c.data.to_dict() == config.data.to_dict()
    conds[backend] = small_stages.DenoiserStage(c, None)._condition(latents, batch)
  # The memory model's read covers the targets; memory off: empty read, same context.
  assert float(conds["voxel"]["coverage"].mean()) > 0.3
  assert float(jnp.abs(conds["none"]["memory"]).max()) == 0.0
  assert float(conds["none"]["coverage"].max()) == 0.0
  np.testing.assert_array_equal(conds["none"]["context"], conds["voxel"]["context"])
  # The frame bank trains: the best past frame reprojected into the targets.
  assert float(conds["frame_bank"]["coverage"].mean()) > 0.3
  with pytest.raises(Exception, match="unknown backend"):
    common.memory_baseline(config, "nope")
  assert config.memory.backend == "voxel"  # the memory model's config is left alone


def test_revisit_rows_from_different_checkpoints(exports, loop_clip):
  memory_model, none_export = exports
  config, ae, dn = rollout.load_world_model(memory_model)
  baseline = rollout.load_world_model(none_export)
  assert baseline[0].memory.backend == "none"
  row = "none" + revisit.TRAINED
  runner = revisit.RevisitRunner(config, ae, dn, ["none", "voxel"], len(loop_clip.frames),
                                 oracle=False, composite=False, extra_rows={row: baseline})
  res, outs = runner.run(loop_clip, return_outputs=True)
  assert set(res["rows"]) == {"none", "voxel", row}
  trained = res["rows"][row]
  assert trained["backend"] == "none" and trained["cache_bytes"] == 0
  assert not np.asarray(outs[row]["coverage"])[1:].any()  # frame 0 is given, not read
  assert np.asarray(outs["voxel"]["coverage"])[1:].mean() > 0.3
  assert math.isfinite(trained["psnr_all"]) and math.isfinite(trained["psnr_unseen"])
  # Same backend, other weights: a different generation than the memory model's none row.
  assert not np.array_equal(outs[row]["frames"], outs["none"]["frames"])
  # The claim compares against the trained baseline when there is one.
  summary, _ = revisit.summarize({"a": res})
  assert list(revisit.claims(summary)) == [f"voxel revisit PSNR >= {row} + 4 dB"]
  del summary[row]
  assert list(revisit.claims(summary)) == ["voxel revisit PSNR >= none (memory off) + 4 dB"]
  with pytest.raises(Exception, match="already a row"):
    revisit.RevisitRunner(config, ae, dn, ["none"], 12, oracle=False, composite=False,
                          extra_rows={"none": baseline})


def _turning_camera():
  """10 frames in a box room from its centre: frames 0-4 face +z, frames 5-9 face -z."""
  t, hw = 10, 16
  K = scaling.loop_trajectory(t, t, hw, hw)[0]
  ahead = np.r_[np.ones(5), -np.ones(5)]
  poses = np.stack([geometry.look_at([0.0, 1.5, 0.0], [0.0, 1.5, z], up=(0, 1, 0))
                    for z in ahead]).astype(np.float32)
  depths = scaling.box_depth(K, poses, hw, hw)
  frames = np.random.default_rng(0).integers(0, 256, (t, hw, hw, 3), dtype=np.uint8)
  return revisit.Trajectory(name="turn", frames=frames, depths=depths, intrinsics=K,
                            poses_c2w=poses, dynamic_masks=np.zeros((t, hw, hw), np.uint8))


def test_first_visit_scores_only_frames_without_coverage(tmp_path):
  truth = _turning_camera()
  # Frames <= t - 2 count as memory. Frame 1: nothing that old; 2-4: frame 0's view again;
  # 5, 6: the other way, which only frames >= 5 saw; 7-9: frame 5 covers them.
  expected = np.array([1, 1, 0, 0, 0, 1, 1, 0, 0, 0], bool)
  np.testing.assert_array_equal(revisit.first_visit_frames(truth, min_gap=2), expected)
  # The composite (memory = every earlier frame) and first_visit_frames share one splat.
  _, covered = revisit.trivial_composite(truth)
  assert covered[1:5].mean() > 0.9 and covered[5].mean() < 0.05 and covered[6:].mean() > 0.9

  # A generation whose error differs per frame: the first-visit means are over frames
  # 1, 5, 6 only (frame 0 is given, never scored).
  noise = np.random.default_rng(1).integers(-40, 41, truth.frames.shape) * \
      np.linspace(0.2, 1.0, 10)[:, None, None, None]
  gen = np.clip(truth.frames + noise, 0, 255).astype(np.uint8)
  pairs = np.full(10, -1)
  scores = revisit.score_frames(gen, truth, pairs, first_visit=expected)
  psnr = np.asarray(metrics.psnr(gen / 255.0, truth.frames / 255.0))
  ssim = np.asarray(metrics.ssim(gen / 255.0, truth.frames / 255.0))
  np.testing.assert_allclose(scores["psnr_unseen"], psnr[[1, 5, 6]].mean(), rtol=1e-5)
  np.testing.assert_allclose(scores["ssim_unseen"], ssim[[1, 5, 6]].mean(), rtol=1e-5)
  assert abs(scores["psnr_unseen"] - scores["psnr_all"]) > 0.1  # not the all-frames mean

  # Per-frame curve over trajectories: first-visit frames only, NaN elsewhere.
  result = dict(rows={"x": scores}, first_visit=expected, first_visit_frames=3, revisit_frames=0,
                reference={})
  report.write_metrics_json(tmp_path / "res.json", result)  # as the CLI's parts: NaN -> null
  summary, curves = revisit.summarize({"turn": json.loads((tmp_path / "res.json").read_text())})
  assert summary["first_visit_frames"] == 3
  curve = curves["x"]["psnr_unseen"]
  np.testing.assert_allclose(curve[[1, 5, 6]], psnr[[1, 5, 6]], rtol=1e-5)
  assert np.isnan(curve[[0, 2, 3, 4, 7, 8, 9]]).all()


def test_revisits_split_by_first_visit_and_the_memory_loss():
  """Revisits of the given frame and of generated ones are scored apart; a revisit that
  reproduces the generated first visit it copies loses 0 dB, whatever that visit's quality."""
  truth = _turning_camera()
  frames = truth.frames.copy()
  frames[8], frames[9] = frames[2], frames[3]  # the camera is back where it was at 2 and 3
  truth = dataclasses.replace(truth, frames=frames)
  pairs = np.array([-1, -1, -1, -1, -1, -1, -1, 0, 2, 3])  # 7 revisits the given frame 0
  rng = np.random.default_rng(2)
  noisy = lambda x, a: np.clip(x + rng.integers(-a, a + 1, x.shape), 0, 255).astype(np.uint8)
  gen = noisy(truth.frames.astype(np.int64), 30)
  gen[8] = gen[2]  # a faithful memory: the revisit shows what the first visit showed
  gen[9] = noisy(gen[3].astype(np.int64), 40)  # a lossy one
  scores = revisit.score_frames(gen, truth, pairs)
  psnr = np.asarray(metrics.psnr(gen / 255.0, truth.frames / 255.0))
  np.testing.assert_allclose(scores["psnr_revisit_given"], psnr[7], rtol=1e-5)
  np.testing.assert_allclose(scores["psnr_revisit_generated"], psnr[[8, 9]].mean(), rtol=1e-5)
  loss_9 = psnr[3] - psnr[9]
  assert loss_9 > 1.0
  np.testing.assert_allclose(scores["revisit_loss"], loss_9 / 2, rtol=1e-4)

  summary = {"voxel": dict(scores), "oracle": dict(scores, psnr_revisit=scores["psnr_revisit"] + 3,
                                                   psnr_revisit_given=scores["psnr_revisit_given"] + 1,
                                                   psnr_revisit_generated=scores["psnr_revisit_generated"] + 4,
                                                   revisit_loss=0.0)}
  gap = revisit.oracle_gap(summary)
  np.testing.assert_allclose([gap["revisit"], gap["given"], gap["generated"], gap["memory"]],
                             [3.0, 1.0, 4.0, loss_9 / 2], rtol=1e-5)
  assert revisit.oracle_gap({"voxel": scores}) is None


def test_evaluate_cli_baseline_checkpoints(exports, tmp_path):
  memory_model, none_export = exports
  out = tmp_path / "revisit"
  base = [f"--checkpoint={memory_model}", "--benchmark=revisit", "--procedural_seeds=100002:100003",
          "--num_frames=10", "--backends=voxel", "--nooracle", "--nocomposite", "--novideos"]
  result = run_cli("mirage_jax.evaluate", *base, f"--baseline_checkpoints=none={none_export}",
                   "--sampler_steps=2", f"--output_dir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((out / "metrics.json").read_text())
  assert m["baseline_checkpoints"] == {"none (trained)": none_export}
  assert m["sampler_steps"] == 2  # the exports' config: 1
  summary = m["revisit"]["summary"]
  assert {"voxel", "none (trained)"} <= set(summary) and "first_visit_frames" in summary
  assert summary["none (trained)"]["cache_bytes"] == 0
  assert "psnr_unseen" in summary["voxel"]
  assert (out / "first_visit_vs_frame.png").stat().st_size > 0
  # A bad flag: one line, exit 2, before any model is loaded.
  bad = run_cli("mirage_jax.evaluate", *base, "--baseline_checkpoints=none", f"--output_dir={tmp_path / 'x'}")
  assert bad.returncode == 2 and "--baseline_checkpoints" in bad.stderr and "NAME=EXPORT" in bad.stderr
  assert not (tmp_path / "x").exists()
