"""The Wan-family pipeline as one command (``python -m mirage_jax.main_job --family=wan``):
procedural rooms -> the Wan VAE trained from scratch (exported with its own latent
statistics) -> latent clips -> the Wan DiT trained from scratch -> Mirage VACE + LoRA on it
-> revisit benchmark with the pretrained DiT as the baseline trained without memory.
Smallest settings that still show every stage: a few steps each, 8 clips, one 21-frame loop,
2 sampler steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirage_jax import checkpoint
from tests.test_generate import run_cli

ARGS = ("--family=wan", "--autoencoder_steps=15", "--wan_base_steps=20", "--denoiser_steps=20",
        "--wan_clips=8", "--num_trajectories=1", "--num_frames=21", "--backends=none,mirage",
        "--wan_sampler_steps=2")


def _logged(workdir, run: str, key: str = "loss") -> list[float]:
  with open(workdir / run / "metrics.jsonl") as f:
    return [r[key] for r in map(json.loads, f) if key in r]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wan_pipeline_one_command(tmp_path):
  workdir = tmp_path / "wan"
  result = run_cli("mirage_jax.main_job", f"--workdir={workdir}", *ARGS)
  assert result.returncode == 0, result.stderr[-4000:]
  out = result.stdout
  for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
    assert f"=== {stage} " in out, out

  # The VAE learnt to reconstruct (its logged PSNR rises) and its export carries latent
  # statistics measured on its own latents, not the released VAE's.
  psnr = _logged(workdir, "vae", "psnr")
  assert len(psnr) >= 2 and psnr[-1] > psnr[0] + 1.0, psnr
  vae_cfg = checkpoint.export_config(str(workdir / "vae_export")).autoencoder
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  released = wan_vae.wan_vae_config("tiny")
  assert list(vae_cfg.latents_std) != list(released.latents_std)
  assert np.all(np.asarray(vae_cfg.latents_std) > 0)

  # The DiT trained from scratch (every param; no base) and the fine-tune's loss falls.
  dit_cfg = checkpoint.export_config(str(workdir / "dit_export"))
  assert "base" in dit_cfg.denoiser.train_stages and not dit_cfg.denoiser.base_checkpoint
  for run in ("dit", "denoiser"):
    losses = _logged(workdir, run)
    assert len(losses) >= 2 and np.isfinite(losses).all(), (run, losses)
    assert np.mean(losses[-2:]) < losses[0], (run, losses)
  ft_cfg = checkpoint.export_config(str(workdir / "denoiser_export"))
  assert ft_cfg.denoiser.base_checkpoint == str(workdir / "dit_export")
  assert ft_cfg.autoencoder.to_dict() == vae_cfg.to_dict()  # the VAE its latents came from

  # The benchmark scored the memory rows and the trained no-memory baseline.
  metrics = json.loads((workdir / "eval" / "revisit" / "metrics.json").read_text())["revisit"]
  assert {"none", "mirage", "oracle", "composite", "none (trained)"} <= set(metrics["summary"])
  traj = metrics["trajectories"]["seed100000"]
  assert traj["num_frames"] == 21 and traj["revisit_frames"] > 0
  for row in ("none", "mirage", "oracle", "none (trained)"):
    scores = traj["rows"][row]
    assert np.isfinite([scores["psnr_all"], scores["psnr_revisit"]]).all()
    assert 0 <= scores["ssim_revisit"] <= 1
  assert traj["rows"]["mirage"]["coverage_revisit"] > 0.0
  table = out[out.rindex("| row "):]
  for row in ("mirage", "oracle", "none (trained)"):
    assert f" {row} |" in table, table
  assert "mirage - none (trained) revisit PSNR:" in out
  assert "[PASS] training loss falls" in out or "[FAIL] training loss falls" in out

  # A second run reuses every stage.
  again = run_cli("mirage_jax.main_job", f"--workdir={workdir}", *ARGS)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count("reus") >= 6, again.stdout
