"""Training-time rollouts of the Wan family (issue 16): every ``eval.every`` steps the
fine-tuning run (``train.WanStage``) rolls out held-out revisit loops with its trained
VACE/LoRA params over the frozen base and logs revisit PSNR/SSIM and the side-by-side video
to TensorBoard. Reuses tests/test_wan_train.py's tiny converted Wan and latent dataset."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mirage_jax import metrics_log, train
from mirage_jax.evaluation import training_rollouts
from tests import test_wan_train
from tests.test_wan_train import world  # noqa: F401  pylint: disable=unused-import

pytest.importorskip("torch")


@pytest.mark.slow
def test_wan_rollout_scalars_and_videos_reach_tensorboard(world, tmp_path):  # noqa: F811
  c = test_wan_train._config(world, steps=2, log_every=1, tensorboard=True)  # pylint: disable=protected-access
  c.checkpoint.update(every=0)
  c.sampler.num_steps = 1
  # 10 frames: chunk 0 (9 frames), then a padded chunk 1 that writes one more latent.
  c.eval.update(every=2, batches=1, rollouts=1, rollout_frames=10,
                rollout_backends=("none", "mirage"))
  assert training_rollouts.check_config(c) == 1  # the Wan family is no longer refused
  workdir = tmp_path / "run"
  train.train_and_evaluate(c, str(workdir))

  (name,) = os.listdir(workdir / "tensorboard")
  tags = metrics_log.read_tags(str(workdir / "tensorboard" / name))
  for row in ("none", "mirage"):
    for score in ("psnr_all", "ssim_all"):
      assert tags["scalars"][f"rollout/{row}/{score}"] == [2], tags
    assert tags["videos"][f"rollout/{row}/seed100000"] == [2], tags
  scalars = dict(metrics_log.read_events(str(workdir / "tensorboard" / name))[-1][1])
  assert 0 < scalars["rollout/mirage/ssim_all"] <= 1
  assert np.isfinite(scalars["rollout/none/psnr_all"])
