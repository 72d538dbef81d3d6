"""Checkpoints: exact resume, restore onto another device count, export round trip, SIGTERM."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mirage_jax import checkpoint
from mirage_jax.families.small import world_model as small_world_model
from mirage_jax.families.small import autoencoder
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.conftest import xla_flags
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
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return env


def test_restore_on_another_device_count(run_a, tmp_path):
  workdir = str(tmp_path / "c")
  _resume_from_3(run_a, workdir)
  subprocess.run([sys.executable, "-c", _RESTORE_ON_4, workdir], env=_env(4), cwd=ROOT,
                 check=True, capture_output=True, timeout=400)
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


def test_export_add_files_all_or_nothing(run_a, tmp_path):
  """add_files' arrays land in the export beside params/ (a Wan DiT's empty_text.npy); a
  failure there leaves no export and no temporary folder."""
  out = tmp_path / "with_files"
  seen = []
  checkpoint.export_params(run_a, str(out), add_files=lambda c: seen.append(c) or {
      "extra.npy": np.arange(3, dtype=np.float32)})
  np.testing.assert_array_equal(np.load(out / "extra.npy"), np.arange(3, dtype=np.float32))
  assert "stage" in seen[0] and checkpoint.export_config(str(out)).stage == seen[0]["stage"]

  def refuse(config):
    raise ValueError("refused")
  with pytest.raises(ValueError, match="refused"):
    checkpoint.export_params(run_a, str(tmp_path / "refused"), add_files=refuse)
  assert sorted(os.listdir(tmp_path)) == ["with_files"]


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
  # The trainer sends itself a real SIGTERM right after step 2 (the test-only fault point
  # MIRAGE_FAULT_AT, mirage_jax/faults.py): it must save step 2 and return normally. Without
  # the handler SIGTERM ends it (exit -15); if the loop ignored the flag it would run on to
  # the deadline.
  workdir = str(tmp_path / "d")
  env = dict(_env(8), MIRAGE_FAULT_AT="step:2:term")
  done = subprocess.run([sys.executable, "-c", _RUN_LONG, workdir], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "clean exit" in done.stdout
  assert "preempted: saved step 2, exiting" in done.stderr, done.stderr[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [2]  # the preemption save (the periodic one is every 100000 steps)
  assert [r["step"] for r in read_jsonl(workdir)] == [1, 2]


def test_cpu_saves_write_each_replicated_array_whole(tmp_path, monkeypatch):
  """On CPU devices a save does not split replicated arrays among their replicas (no eager
  slice per array and replica), and the state reads back the same."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  params = {f"w{i}": jax.device_put(np.arange(64 * 8, dtype=np.float32).reshape(64, 8) + i,
                                    NamedSharding(mesh, PartitionSpec()))
            for i in range(4)}
  params["sharded"] = jax.device_put(np.ones((64, 8), np.float32),
                                     NamedSharding(mesh, PartitionSpec("data")))
  state = {"params": params}
  slices = []
  real = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(1) or real(*a, **k))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=1, async_save=False)
  ckpt.save(1, state)
  restored, step = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  ckpt.close()
  assert slices == [] and step == 1
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(restored["params"][k]), np.asarray(v))
  # The default handler (what TPU runs keep) does slice them: the check can fail.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as c:
    c.save(str(tmp_path / "default"), state)
  assert len(slices) >= 4
