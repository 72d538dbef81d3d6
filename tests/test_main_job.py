"""main_job's stages: a training stopped early (preempted) is never exported as if finished."""

import os

import ml_collections
import pytest

from mirage_jax import checkpoint, main_job
from mirage_jax.training import loop as loop_lib


def _fake_training(monkeypatch, saved_step: int):
  """train_and_evaluate that does nothing; export_params that exports ``saved_step``."""
  monkeypatch.setattr(loop_lib, "train_and_evaluate", lambda config, workdir: {"loss": 0.5})

  def export(workdir, output, **kw):
    os.makedirs(output)
    with open(os.path.join(output, "config.json"), "w") as f:
      f.write("{}")
    return saved_step
  monkeypatch.setattr(checkpoint, "export_params", export)


def test_a_preempted_training_is_not_exported(tmp_path, monkeypatch, capsys):
  config = ml_collections.ConfigDict(dict(train=dict(steps=10)))
  _fake_training(monkeypatch, saved_step=4)  # SIGTERM: the loop saved step 4 and returned
  with pytest.raises(SystemExit) as e:
    main_job.train_and_export(config, str(tmp_path), "denoiser")
  assert e.value.code == 143
  assert not (tmp_path / "denoiser_export").exists()  # the next run resumes, not reuses
  assert "stopped at step 4 of 10" in capsys.readouterr().out


def test_a_finished_training_is_exported_and_then_reused(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict(dict(train=dict(steps=10)))
  _fake_training(monkeypatch, saved_step=10)
  out = main_job.train_and_export(config, str(tmp_path), "denoiser")
  assert out == os.path.join(str(tmp_path), "denoiser_export") and os.path.isdir(out)
  _fake_training(monkeypatch, saved_step=-1)  # not called again: the export is reused
  assert main_job.train_and_export(config, str(tmp_path), "denoiser") == out
