"""Determinism on CPU: same seed and config -> bitwise-identical losses, state and data order.

Two separate processes (each compiling for itself: no compilation cache, and different
``PYTHONHASHSEED``s, so set/dict order cannot leak in) run the training loop's pieces
(pipeline -> global batch -> jitted step) from the same initial state on one device, and the
memory write/read; their results must be the same bits. Full ``mirage_jax.main`` runs,
restarts included, are compared in ``tests/test_faults.py``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import distributed
from mirage_jax.memory import MemoryConfig, get_backend
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.test_memory import make_frames
from tests.test_train import synthetic_sources, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
MEMORIES = ("voxel", "mirage")


def _config(data_seed: int = 0):
  config = tiny_config()
  config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  config.data.seed = data_seed
  return config


@functools.lru_cache(maxsize=None)
def _compiled():
  """Stage, setup, an initial state (NumPy) and the jitted step on one device, built once.

  The initial params are seeded random numbers rather than ``init_state``'s (whose jit
  takes longer to compile than the step); the fault tests compare whole runs,
  initialisation included, across processes.
  """
  config = _config()
  stage = step_lib.make_stage(config)
  mesh = mesh_lib.build_mesh(config, jax.devices()[:1])
  setup = step_lib.make_setup(config, stage, mesh)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype),
                        setup.abstract["params"])
  initial = jax.device_get({"step": np.int32(0), "params": params,
                            "opt_state": setup.tx.init(params), "ema": params})
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  return stage, setup, initial, step


def _run(data_seed: int = 0) -> tuple[list[dict], list[list[int]], dict]:
  """STEPS steps from the initial state and a fresh input pipeline.

  Returns:
    per-step metrics, per-step clip_index of the batch, final state (NumPy).
  """
  config = _config(data_seed)
  stage, setup, initial, step = _compiled()
  state = jax.device_put(initial, setup.shardings)  # a fresh copy: the step donates it
  it = inputs_lib.make_input(config, synthetic_sources()["train"], split="train")
  axes = mesh_lib.batch_axes(setup.mesh, setup.rules)
  metrics, clips = [], []
  for _ in range(STEPS):
    local = next(it)
    clips.append(local["clip_index"].tolist())
    batch = distributed.global_batch({k: local[k] for k in stage.fields}, setup.mesh, axes)
    with setup.context():
      state, m = step(state, batch, {})
    metrics.append(m)
  return jax.device_get(metrics), clips, jax.device_get(state)


def _memory_case(name: str):
  """(jitted write-then-read of 5 frames into memory ``name``, the frames)."""
  cfg = MemoryConfig(image_height=16, image_width=16, latent_height=8, latent_width=8,
                     latent_channels=4, capacity=2048, feature_dtype="float32")
  be = get_backend(name)
  frames = make_frames(np.linspace(0.0, 1.0, 5))
  target = make_frames([0.5])

  @jax.jit
  def write_read(frames):
    state = be.write(be.init(cfg), **frames)
    return be.read(state, target["intrinsics"], target["c2w"])

  return write_read, frames


def _child(out: str) -> None:
  """What one process computes: training with data seeds 0 and 1, and each memory's read."""
  arrays = {}
  for seed in (0, 1):
    metrics, clips, state = _run(data_seed=seed)
    arrays[f"seed{seed}/clips"] = np.asarray(clips)
    for step, m in enumerate(metrics, start=1):
      for key, value in m.items():
        arrays[f"seed{seed}/step{step}/{key}"] = np.asarray(value)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      arrays[f"seed{seed}/state{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  for name in MEMORIES:
    write_read, frames = _memory_case(name)
    lat, cov = write_read(frames)
    arrays[f"memory/{name}/latents"], arrays[f"memory/{name}/coverage"] = map(np.asarray,
                                                                              (lat, cov))
  np.savez(out, **arrays)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict[str, np.ndarray]]:
  """``_child``'s arrays from two fresh processes, one after the other."""
  root = tmp_path_factory.mktemp("determinism")
  runs = []
  for i in range(2):
    out = root / f"process{i}.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONHASHSEED=str(i),
               JAX_ENABLE_COMPILATION_CACHE="false")
    done = subprocess.run(
        [sys.executable, "-c", f"from tests.test_determinism import _child; _child({str(out)!r})"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
      runs.append(dict(f))
  return runs


@pytest.mark.timeout(660)  # two processes, each compiling the step and the memories
def test_two_processes_give_bitwise_identical_training_and_memory(two_processes):
  a, b = two_processes
  assert sorted(a) == sorted(b)
  assert any(k.startswith("seed0/state") for k in a) and "seed0/step4/loss" in a
  assert "memory/voxel/latents" in a and "memory/mirage/latents" in a
  for key in sorted(a):  # ==, not approx: the same bits (NaN nowhere: it would differ too)
    assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
  for name in MEMORIES:
    assert a[f"memory/{name}/coverage"].mean() > 0.5  # the read saw what was written


@pytest.mark.timeout(660)
def test_another_data_seed_changes_order_and_losses(two_processes):
  # The comparison above can fail: a different seed gives different batches and losses.
  a = two_processes[0]
  assert not np.array_equal(a["seed0/clips"], a["seed1/clips"])
  assert [a[f"seed0/step{s}/loss"] for s in range(1, STEPS + 1)] != [
      a[f"seed1/step{s}/loss"] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("name", MEMORIES)
def test_memory_read_ignores_frame_order_within_a_write(name):
  # Frames are written in one call as a batch: shuffling that batch (same frame_index
  # values) must not change what is read.
  write_read, frames = _memory_case(name)
  lat_a, cov_a = write_read(frames)
  order = jnp.array([3, 0, 4, 1, 2])
  lat_c, cov_c = write_read(jax.tree.map(lambda x: x[order], frames))
  assert np.asarray(cov_a).mean() > 0.5
  np.testing.assert_array_equal(np.asarray(cov_a), np.asarray(cov_c))
  np.testing.assert_allclose(np.asarray(lat_a), np.asarray(lat_c), atol=1e-6)
