"""Training-time rollouts: revisit PSNR/SSIM and side-by-side videos of the EMA weights."""

import os

import numpy as np
import pytest

from experiments import tiny_cpu
from mirage_jax import metrics_log
from mirage_jax.errors import InputError
from mirage_jax.evaluation import training_rollouts
from mirage_jax.training import loop as loop_lib
from tests.test_generate import save_tiny_export
from tests.test_train import synthetic_clip


@pytest.mark.slow
def test_rollout_scalars_and_videos_reach_tensorboard(tmp_path):
  save_tiny_export(str(tmp_path / "export"))  # its random autoencoder is the frozen one
  c = tiny_cpu.get_config("denoiser")
  c.denoiser.autoencoder_checkpoint = str(tmp_path / "export" / "ae_export")
  c.data.update(batch_size=8, read_threads=0, read_buffer_size=1)
  c.denoiser.model.update(embed_dim=32, num_layers=1, num_heads=2, control_layers=1)
  c.sampler.update(num_steps=1)
  c.train.update(steps=2, log_every=1)
  c.checkpoint.update(every=0)
  c.eval.update(every=2, batches=1, rollouts=1, rollout_frames=8, rollout_backends=("none", "voxel"))
  clips = [synthetic_clip(i, frames=10, size=32) for i in range(8)]
  workdir = tmp_path / "run"
  loop_lib.train_and_evaluate(c, str(workdir), {"train": clips, "validation": clips[:2]})

  (name,) = os.listdir(workdir / "tensorboard")
  tags = metrics_log.read_tags(str(workdir / "tensorboard" / name))
  for row in ("none", "voxel"):
    for score in ("psnr_all", "ssim_all"):
      assert tags["scalars"][f"rollout/{row}/{score}"] == [2], tags
    assert tags["videos"][f"rollout/{row}/seed100000"] == [2], tags
  scalars = dict(metrics_log.read_events(str(workdir / "tensorboard" / name))[-1][1])
  assert 0 < scalars["rollout/voxel/ssim_all"] <= 1
  assert np.isfinite(scalars["rollout/none/psnr_all"])


def test_rollouts_are_refused_where_they_cannot_run():
  c = tiny_cpu.get_config("autoencoder")
  assert training_rollouts.check_config(c) == 0  # off by default
  c.eval.rollouts = 1
  with pytest.raises(InputError, match="denoiser stage only"):
    training_rollouts.check_config(c)
  d = tiny_cpu.get_config("denoiser")
  d.eval.update(rollouts=2, rollout_frames=2)
  with pytest.raises(InputError, match="rollout_frames"):
    training_rollouts.check_config(d)
  d.eval.update(rollout_frames=8, rollout_backends=("voxel", "octree"))
  with pytest.raises(InputError, match="unknown 'octree'"):
    training_rollouts.check_config(d)
  d.eval.rollout_backends = ("voxel",)
  assert training_rollouts.check_config(d) == 2
