"""Multi-host: 2 local processes x 4 CPU devices train like 1 process x 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker

from tests.test_train import synthetic_sources, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs 3 update steps on fixed global batches; with several processes each one feeds only its
# rows. Prints the losses as JSON; then (multi-process) a short full training run with
# checkpoints, which must not hang.
_WORKER = """
import json, sys
from mirage_jax import distributed
if len(sys.argv) > 1:
  distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
import jax
from tests.test_multihost import losses
print("LOSSES", json.dumps(losses()))
if len(sys.argv) > 1:
  from mirage_jax import train
  from tests.test_train import synthetic_sources, tiny_config
  config = tiny_config()
  config.train.steps = 2
  train.train_and_evaluate(config, sys.argv[4], synthetic_sources())
  print("TRAINED", jax.process_index())
"""


def losses() -> list[float]:
  """Losses of 3 steps on the global mesh; batches come from the pipeline as one shard."""
  import jax
  from data_pipelines import pipeline
  from mirage_jax import distributed, train
  config = tiny_config()
  stage = train.make_stage(config)
  mesh = train.build_mesh(config)
  setup = train.make_setup(config, stage, mesh)
  state = train.init_state(config, stage, setup)
  specs = train.abstract_batch(config, stage, mesh, setup.rules)
  step = train.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  it = iter(pipeline.make_dataset(synthetic_sources()["train"], num_frames=1, stride=2,
                                  resolution=(16, 16), batch_size=8, seed=0, shard_index=0,
                                  shard_count=1, read_threads=0))
  rows = config.data.batch_size // jax.process_count()
  lo = jax.process_index() * rows
  out = []
  for _ in range(3):
    full = next(it)
    local = {k: full[k][lo:lo + rows] for k in stage.fields}
    batch = distributed.global_batch(local, mesh, train.batch_axes(mesh, setup.rules))
    with setup.context():
      state, metrics = step(state, batch, {})
    out.append(float(jax.device_get(metrics["loss"])))
  return out


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _parse(out: str) -> list[float]:
  return json.loads(next(l for l in out.splitlines() if l.startswith("LOSSES"))[7:])


def test_two_processes_match_one(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, f"127.0.0.1:{port}", "2", str(i),
                             str(tmp_path / "run")], env=_env(4), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  single = losses()  # this process: 8 devices (tests/conftest.py)
  results = [p.communicate() for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  multi = [_parse(out) for out, _ in results]
  assert multi[0] == multi[1]  # every process sees the same global loss
  np.testing.assert_allclose(multi[0], single, rtol=1e-5)
  assert all(f"TRAINED {i}" in out for i, (out, _) in enumerate(results))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "2"
