"""The Wan-family pipeline as one command (``python -m mirage_jax.main_job --family=wan``):
random released-layout Wan2.2 files -> convert_wan -> latent clips -> VACE + LoRA fine-tune
(the loss falls) -> export -> revisit benchmark with the Wan rows. Smallest settings that
still show both: 100 steps, 4 clips, one 21-frame loop, 2 sampler steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_generate import run_cli

ARGS = ("--family=wan", "--denoiser_steps=100", "--wan_clips=4", "--num_trajectories=1",
        "--num_frames=21", "--backends=none,mirage", "--wan_sampler_steps=2")


@pytest.mark.slow
def test_wan_pipeline_one_command(tmp_path):
  workdir = tmp_path / "wan"
  result = run_cli("mirage_jax.main_job", f"--workdir={workdir}", *ARGS)
  assert result.returncode == 0, result.stderr[-4000:]
  out = result.stdout
  for stage in ("1/4", "2/4", "3/4", "4/4"):
    assert f"=== {stage} " in out, out

  # Training: the logged loss falls (every 20 steps: 5 points).
  with open(workdir / "denoiser" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 5 and np.isfinite(losses).all(), losses
  assert np.mean(losses[-2:]) < 0.85 * losses[0], losses
  assert "loss curve: 20:" in out and "[PASS] training loss falls" in out

  # The export is a fine-tune of the converted base, and the benchmark scored it.
  export_config = json.loads((workdir / "denoiser_export" / "config.json").read_text())["config"]
  assert export_config["denoiser"]["base_checkpoint"] == str(workdir / "wan_export" / "dit")
  metrics = json.loads((workdir / "eval" / "revisit" / "metrics.json").read_text())["revisit"]
  assert {"none", "mirage", "oracle", "composite"} <= set(metrics["summary"])
  traj = metrics["trajectories"]["seed100000"]
  assert traj["num_frames"] == 21 and traj["revisit_frames"] > 0
  for row in ("none", "mirage", "oracle"):
    scores = traj["rows"][row]
    assert np.isfinite([scores["psnr_all"], scores["psnr_revisit"]]).all()
    assert 0 <= scores["ssim_revisit"] <= 1
  assert traj["rows"]["mirage"]["coverage_revisit"] > 0.0
  # The printed table has the Wan rows.
  table = out[out.rindex("| row "):]
  for row in ("none", "mirage", "oracle", "composite"):
    assert f"| {row:>9} |" in table, table

  # A second run reuses every stage.
  again = run_cli("mirage_jax.main_job", f"--workdir={workdir}", *ARGS)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count("reus") >= 5, again.stdout
