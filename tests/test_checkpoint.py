"""Checkpoints: exact resume, restore onto another device count, export round trip, SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mirage_jax import checkpoint
from mirage_jax.families.small import world_model as small_world_model
from mirage_jax.families.small import autoencoder
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.test_train import read_jsonl, synthetic_sources, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps=6):
  config = tiny_config()
  config.train.steps = steps
  config.checkpoint.update(every=3, keep=3)
  return config


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """6 steps on 8 devices, checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("run_a"))
  loop_lib.train_and_evaluate(_config(), workdir, synthetic_sources())
  return workdir


def _resume_from_3(run_a, dst):
  shutil.copytree(run_a, dst)
  shutil.rmtree(os.path.join(dst, "checkpoints", "6"))
  os.remove(os.path.join(dst, "metrics.jsonl"))
  shutil.rmtree(os.path.join(dst, "tensorboard"))


def test_resume_is_exact(run_a, tmp_path):
  workdir = str(tmp_path / "b")
  _resume_from_3(run_a, workdir)
  loop_lib.train_and_evaluate(_config(), workdir, synthetic_sources())
  a = {r["step"]: r["loss"] for r in read_jsonl(run_a)}
  b = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
  assert sorted(b) == [4, 5, 6]
  for step in (4, 5, 6):  # same next batch, same state: bitwise the same loss
    assert b[step] == a[step], step


_RESTORE_ON_4 = """
import sys
from tests.test_train import synthetic_sources, tiny_config
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
import jax
assert jax.device_count() == 4, jax.device_count()
config = tiny_config()
config.train.steps = 6
config.checkpoint.update(every=3, keep=3)
loop_lib.train_and_evaluate(config, sys.argv[1], synthetic_sources())
"""


def _env(devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return env


def test_restore_on_another_device_count(run_a, tmp_path):
  workdir = str(tmp_path / "c")
  _resume_from_3(run_a, workdir)
  subprocess.run([sys.executable, "-c", _RESTORE_ON_4, workdir], env=_env(4), cwd=ROOT,
                 check=True, capture_output=True)
  a = {r["step"]: r["loss"] for r in read_jsonl(run_a)}
  c = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
  assert sorted(c) == [4, 5, 6]
  for step in (4, 5, 6):  # another mesh: same math up to float32 summation order
    assert c[step] == pytest.approx(a[step], rel=1e-4), step


def test_export_and_load_round_trip(run_a, tmp_path):
  out = str(tmp_path / "export")
  assert checkpoint.export_params(run_a, out, dtype="bfloat16") == 6
  model, config = small_world_model.load_model(out)
  assert config.stage == "autoencoder"
  # The export holds exactly the EMA params of step 6, cast to bf16.
  ckpt = checkpoint.Checkpointer(os.path.join(run_a, "checkpoints"), every=0, keep=3)
  mesh = mesh_lib.build_mesh(tiny_config())
  setup = step_lib.make_setup(tiny_config(), step_lib.make_stage(tiny_config()), mesh)
  state, step = ckpt.restore(setup.abstract)
  ckpt.close()
  from flax import nnx
  loaded = nnx.state(model, nnx.Param).to_pure_dict()
  jax.tree.map(lambda x, e: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(e.astype(jax.numpy.bfloat16))), loaded, state["ema"])
  assert step == 6
  # The exported model runs.
  rgb, depth = model.decode(np.zeros((1, 4, 4, config.autoencoder.latent_channels), np.float32))
  f = autoencoder.downsample_factor(config.autoencoder)
  assert rgb.shape == (1, 4 * f, 4 * f, 3) and np.all(np.asarray(depth) > 0)
  with pytest.raises(Exception, match="already exists"):
    checkpoint.export_params(run_a, out)


_RUN_LONG = """
import sys
from tests.test_train import synthetic_sources, tiny_config
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
config = tiny_config()
config.train.update(steps=100000, log_every=1)
config.checkpoint.update(every=100000, keep=2)
loop_lib.train_and_evaluate(config, sys.argv[1], synthetic_sources())
print("clean exit")
"""


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "d")
  proc = subprocess.Popen([sys.executable, "-c", _RUN_LONG, workdir], env=_env(8), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "clean exit" in out
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  logged = read_jsonl(workdir)[-1]["step"]
  assert steps and 2 <= steps[-1] <= logged + 1
