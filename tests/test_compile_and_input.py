"""Issue 15: compilation cache, AOT executable reuse, per-step logs, device prefetch, uint8 frames."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

from data_pipelines import pipeline
from mirage_jax import aot, distributed, prefetch
from mirage_jax.errors import InputError
from mirage_jax.training import executables
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.test_train import read_jsonl, synthetic_sources, tiny_config


# ----------------------------------------------------------------------------- compile cache


def test_compilation_cache_directory_precedence(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  assert before  # tests/conftest.py points the suite at one cache
  # A directory already set (the environment's) wins over the config's.
  assert executables.enable_compilation_cache(str(tmp_path / "other")) == before
  assert not (tmp_path / "other").exists()
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert executables.enable_compilation_cache("") is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert executables.enable_compilation_cache("~/cache/xla") == str(tmp_path / "cache" / "xla")
    assert (tmp_path / "cache" / "xla").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "xla")
    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="compilation_cache_dir"):
      executables.enable_compilation_cache(str(tmp_path / "file" / "xla"))
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


# ----------------------------------------------------------------------------- prefetch


def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()).reshape(8), ("data",))


def test_device_prefetch_yields_the_same_batches_in_order():
  config = tiny_config()
  config.data.frames_dtype = "uint8"
  reads = []

  def host():
    for i, batch in enumerate(pipeline.from_config(synthetic_sources()["train"], config.data)):
      if i == 6:
        return
      reads.append(i)
      yield batch

  mesh = _mesh()
  to_mesh = lambda b: distributed.global_batch({k: b[k] for k in ("frames", "depths")}, mesh,
                                               "data")
  plain = [b for b in host()]
  reads.clear()
  it = prefetch.DevicePrefetch(host(), to_mesh, depth=2)
  local, batch = next(it)
  assert reads == [0, 1]  # the next batch is already placed while step 0 runs
  got = [(local, batch)] + list(it)
  assert len(got) == len(plain) == 6
  for want, (local, batch) in zip(plain, got):
    np.testing.assert_array_equal(local["clip_index"], want["clip_index"])
    for k in ("frames", "depths"):
      assert batch[k].sharding.spec == PartitionSpec("data", *[None] * (want[k].ndim - 1))
      np.testing.assert_array_equal(np.asarray(batch[k]), want[k])
  assert got[0][1]["frames"].dtype == np.uint8


def test_device_prefetch_raises_a_read_error_at_its_own_batch():
  def host():
    yield {"x": np.zeros((8, 2), np.float32)}
    yield {"x": np.ones((8, 2), np.float32)}
    raise InputError("clip source record 3", "record", "corrupt")

  it = prefetch.DevicePrefetch(host(), lambda b: b, depth=2)
  assert next(it)[0]["x"].sum() == 0  # read ahead hit the error; not raised yet
  assert next(it)[0]["x"].sum() == 16
  with pytest.raises(InputError, match="record 3"):
    next(it)


# ----------------------------------------------------------------------------- uint8 frames


def test_uint8_frames_match_float_frames_and_give_the_same_loss():
  config = tiny_config()
  config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  sources = synthetic_sources()["train"]
  as_float = dict(config.data.to_dict(), frames_dtype="float32")
  as_uint8 = dict(config.data.to_dict(), frames_dtype="uint8")
  f = next(iter(pipeline.make_dataset(sources, **{k: as_float[k] for k in
                                                  pipeline.default_config()})))
  u = next(iter(pipeline.make_dataset(sources, **{k: as_uint8[k] for k in
                                                  pipeline.default_config()})))
  assert u["frames"].dtype == np.uint8 and f["frames"].dtype == np.float32
  assert u["frames"].nbytes * 4 == f["frames"].nbytes
  # Rounding to uint8 moves a value by at most half a level.
  np.testing.assert_allclose(pipeline.frames_to_float(u["frames"]), f["frames"], atol=0.5 / 127.5 + 1e-6)
  np.testing.assert_array_equal(u["depths"], f["depths"])

  stage = step_lib.make_stage(config)
  mesh = mesh_lib.build_mesh(config, jax.devices()[:1])
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  assert specs["frames"].dtype == np.uint8  # experiments/common.py: frames travel as uint8
  eval_step = step_lib.make_eval_step(stage, setup, {k: v.sharding for k, v in specs.items()})
  on_host = dict(u, frames=pipeline.frames_to_float(u["frames"]))  # the float path
  losses = []
  for batch in (u, on_host):
    with setup.context():
      m = eval_step(state["ema"], {k: batch[k] for k in stage.fields}, {}, jax.random.key(0))
    losses.append(float(m["loss"]))
  assert np.isfinite(losses[0])
  assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_bad_frames_dtype_is_an_input_error():
  config = tiny_config()
  config.data.frames_dtype = "float16"
  with pytest.raises(InputError, match="frames_dtype"):
    pipeline.from_config(synthetic_sources()["train"], config.data)


# ----------------------------------------------------------------------------- AOT + logs


def test_aot_executable_round_trip_runs_the_same_training(tmp_path):
  """Compile the train step for this host's mesh, serialise it, and train with the loaded
  executable: the same losses as compiling in the loop; the logs carry the step timings."""
  # On CPU, an executable loaded from a file clashes with executables that this process
  # loaded from JAX's persistent cache ("Function ..._fusion not found"), even after
  # jax.clear_caches(); so the round trip runs in its own process without the cache.
  if os.environ.get("MIRAGE_ROUND_TRIP_CHILD"):
    _round_trip(tmp_path)
    return
  # Without MIRAGE_NO_SKIPS: the child need not import every test dependency at its start
  # (this session checked them), and a skip would fail the "1 passed" check below anyway.
  env = {k: v for k, v in os.environ.items() if k != "MIRAGE_NO_SKIPS"}
  env.update(MIRAGE_ROUND_TRIP_CHILD="1", JAX_ENABLE_COMPILATION_CACHE="false")
  test_id = f"{__file__}::test_aot_executable_round_trip_runs_the_same_training"
  child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                          test_id], env=env, capture_output=True, text=True, timeout=570,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
  assert "1 passed" in child.stdout


def _round_trip(tmp_path):
  config = tiny_config()
  config.train.update(steps=3, log_every=1)
  config.checkpoint.update(every=0)
  path = str(tmp_path / "step.jaxexe")
  built = aot.compile_train_step(config, jax.devices(), for_saving=True)
  assert executables.save_executable(built["compiled"], path, built["key"]) == os.path.getsize(path)

  compiled_here = loop_lib.train_and_evaluate(config, str(tmp_path / "a"), synthetic_sources())
  loaded = config.copy_and_resolve_references()
  loaded.train.executable = path
  from_file = loop_lib.train_and_evaluate(loaded, str(tmp_path / "b"), synthetic_sources())
  a, b = read_jsonl(str(tmp_path / "a")), read_jsonl(str(tmp_path / "b"))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  assert from_file["grad_norm"] == compiled_here["grad_norm"]
  for key in ("step_time_s", "data_wait_s", "mfu", "examples_per_s"):
    assert np.isfinite(b[-1][key]) and b[-1][key] >= 0, key
  assert b[-1]["data_wait_s"] <= b[-1]["step_time_s"]
  assert "hbm_bytes_in_use" not in b[-1]  # the CPU backend reports no device memory

  # The run's length is an input of the step: a 5-step run loads the same file and trains as
  # a 5-step run compiled here, on its own schedule (another rate than the 3-step run's).
  here, longer = config.copy_and_resolve_references(), loaded.copy_and_resolve_references()
  here.train.steps = longer.train.steps = 5
  loop_lib.train_and_evaluate(here, str(tmp_path / "e"), synthetic_sources())
  loop_lib.train_and_evaluate(longer, str(tmp_path / "f"), synthetic_sources())
  e, f = read_jsonl(str(tmp_path / "e")), read_jsonl(str(tmp_path / "f"))
  assert len(f) == 5 and [r["loss"] for r in e] == [r["loss"] for r in f]
  opt = config.optimizer
  rate = lambda steps: float(optax.warmup_cosine_decay_schedule(
      0.0, opt.learning_rate, opt.warmup_steps, steps, opt.end_learning_rate)(3))
  assert f[3]["learning_rate"] == pytest.approx(rate(5), rel=1e-6)
  assert rate(5) != pytest.approx(rate(3), rel=1e-3)

  other = loaded.copy_and_resolve_references()
  other.optimizer.learning_rate = 1e-4
  with pytest.raises(InputError, match="optimizer.learning_rate"):
    loop_lib.train_and_evaluate(other, str(tmp_path / "c"), synthetic_sources())
  (tmp_path / "junk").write_bytes(b"not an executable")
  other = loaded.copy_and_resolve_references()
  other.train.executable = str(tmp_path / "junk")
  with pytest.raises(InputError, match="junk"):
    loop_lib.train_and_evaluate(other, str(tmp_path / "d"), synthetic_sources())


class _Writer:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, dict(scalars)))


class _Device:
  def __init__(self, in_use, peak, limit):
    self.stats = {"bytes_in_use": in_use, "peak_bytes_in_use": peak, "bytes_limit": limit}

  def memory_stats(self):
    return self.stats


def test_log_has_step_time_data_wait_mfu_and_hbm_where_reported(monkeypatch):
  config = tiny_config()
  pending = [{"loss": np.float32(1.0 + i), "grad_norm": np.float32(1.0),
              "learning_rate": np.float32(1e-3), "nonfinite": np.int32(0)} for i in range(4)]
  clips = [np.arange(8)] * 4
  # The loop's clock, replaced: steps 5..8 took 2 s since the last log at t=100 s, 0.4 s
  # of it waiting for input; 2 steps remain.
  monkeypatch.setattr(loop_lib, "_clock", lambda: 102.0)
  writer = _Writer()
  out = loop_lib._log(config, writer, pending, clips, 8, 4, 100.0, 10, 1e12, 10.0, 0.4)
  assert out["loss"] == pytest.approx(2.5)
  assert out["step_time_s"] == pytest.approx(0.5)
  assert out["examples_per_s"] == pytest.approx(config.data.batch_size / 0.5)
  assert out["tflops_per_s"] == pytest.approx(2.0)  # 1e12 FLOPs a step in 0.5 s
  assert out["data_wait_s"] == pytest.approx(0.1)
  assert out["mfu"] == pytest.approx(0.2)  # 2 TFLOP/s of a 10 TFLOP/s peak
  assert not any(k.startswith("hbm") for k in out)  # CPU: memory_stats() is None
  assert writer.rows == [(8, out)]

  monkeypatch.setattr(loop_lib.jax, "local_devices",
                      lambda: [_Device(3 << 30, 5 << 30, 16 << 30), _Device(4 << 30, 4 << 30,
                                                                            16 << 30)])
  out = loop_lib._log(config, writer, pending, clips, 8, 4, 100.0, 10, 1e12, 10.0, 0.4)
  assert out["hbm_bytes_in_use"] == 4 << 30
  assert out["hbm_peak_bytes"] == 5 << 30
  assert out["hbm_in_use_fraction"] == pytest.approx(0.25)
