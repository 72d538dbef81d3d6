"""Multi-host: 2 local processes x 4 CPU devices train like 1 process x 8 devices, through the
real per-process input path (each process builds only the batch rows its devices hold), and a
run resumes on another process or device count from its step alone."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Iterator

import numpy as np
import portpicker
import pytest

from tests.conftest import xla_flags
from tests.test_train import random_frozen_autoencoder, read_jsonl, synthetic_clip, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: tmp [port num_processes process_id]. With a coordinator: the denoiser losses, the rows
# check on a mesh whose model axis spans the hosts, the restore of step 2 of the 1-process run
# ``one``, a resume of ``one_b`` (``one`` rolled back to step 2) and a 4-step run ``two`` from
# scratch. Without one (1 process, 4 devices): the restore of step 2 of ``two``, saved by 2
# processes on 8 devices, and a resume of ``two_c`` (``two`` rolled back to step 2). Every run
# has the same 4-step schedule, so each process count compiles one training step.
_WORKER = """
import json, sys
from mirage_jax import distributed
tmp = sys.argv[1]
if len(sys.argv) > 2:
  distributed.initialize(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
import jax
from tests import test_multihost as t
if jax.process_count() > 1:
  print("LOSSES", json.dumps(t.losses(tmp + "/ae_export")), flush=True)
  print("ROWS", json.dumps(t.rows_across_hosts()), flush=True)
  print("CK_ONE", t.restored_checksum(tmp + "/one", 2), flush=True)
  t.train_steps(tmp + "/one_b", 4)
  t.train_steps(tmp + "/two", 4)
  print("CK_TWO", t.restored_checksum(tmp + "/two", 2), flush=True)
else:
  print("CK_TWO", t.restored_checksum(tmp + "/two", 2), flush=True)
  t.train_steps(tmp + "/two_c", 4)
print("DONE", jax.process_index(), flush=True)
"""


def sources() -> dict:
  clips = [synthetic_clip(i) for i in range(8)]
  return {"train": clips, "validation": clips[:2]}


def train_steps(workdir: str, steps: int) -> None:
  """Trains the tiny autoencoder in ``workdir`` up to ``steps`` (resuming if it can)."""
  from mirage_jax.training import loop as loop_lib
  config = tiny_config()
  config.data.crop = "random"  # augmentation depends on the global example index
  config.train.steps = steps
  config.checkpoint.update(every=2, async_save=False)
  loop_lib.train_and_evaluate(config, workdir, sources())


def checksum(tree) -> str:
  """sha256 of every leaf's bytes (global arrays gathered from all processes)."""
  import jax
  from jax.experimental import multihost_utils
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    if not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def restored_checksum(workdir: str, step: int) -> str:
  """Checksum of the state of checkpoint ``step``, restored onto this job's mesh."""
  from mirage_jax import checkpoint
  from mirage_jax.training import mesh as mesh_lib
  from mirage_jax.training import step as step_lib
  config = tiny_config()
  setup = step_lib.make_setup(config, step_lib.make_stage(config), mesh_lib.build_mesh(config))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=0, keep=2)
  state, _ = ckpt.restore(setup.abstract, step)
  ckpt.close()
  return checksum(state)


def losses(autoencoder_export: str) -> list[float]:
  """Losses of 3 denoiser steps on the global mesh, through the training input path: the
  frozen autoencoder restored into the mesh's sharding, each process loading its rows."""
  import jax
  from mirage_jax import distributed
  from mirage_jax.training import inputs as inputs_lib
  from mirage_jax.training import mesh as mesh_lib
  from mirage_jax.training import step as step_lib
  config = tiny_config("denoiser")
  config.denoiser.autoencoder_checkpoint = autoencoder_export
  stage = step_lib.make_stage(config)
  mesh = mesh_lib.build_mesh(config)
  stage.load_frozen(mesh, mesh_lib.logical_rules(config))
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  it = inputs_lib.make_input(config, sources()["train"], split="train", mesh=mesh)
  inputs_lib.check_input_rows(config, mesh, 8)
  axes = mesh_lib.batch_axes(mesh, setup.rules)
  frozen = jax.device_put(stage.frozen, setup.frozen_sharding())
  out = []
  for _ in range(3):
    local = next(it)
    assert len(local["frames"]) == 8 // jax.process_count()
    batch = distributed.global_batch({k: local[k] for k in stage.fields}, mesh, axes,
                                     config.data.batch_size)
    with setup.context():
      state, metrics = step(state, batch, frozen)
    out.append(float(jax.device_get(metrics["loss"])))
  return out


def rows_across_hosts() -> dict:
  """On a (data 4, tensor 2) mesh whose tensor pairs span the 2 processes, both processes
  hold every batch row: their shards, the start-up check, and the check on a wrong shard."""
  import jax
  from mirage_jax import distributed
  from mirage_jax.errors import InputError
  from mirage_jax.training import inputs as inputs_lib
  from mirage_jax.training import mesh as mesh_lib
  config = tiny_config()
  config.mesh = dict(data=4, fsdp=1, context=1, tensor=2)
  by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
  mesh = mesh_lib.build_mesh(config, [d for pair in zip(*by_process) for d in pair])
  axes = mesh_lib.batch_axes(mesh, mesh_lib.logical_rules(config))
  shard = distributed.process_shard(mesh, axes, 8)
  inputs_lib.check_input_rows(config, mesh, 8)
  local = np.arange(8, dtype=np.float32)  # every row, the same on both processes
  total = float(jax.jit(lambda x: x.sum())(distributed.global_batch({"x": local}, mesh, axes,
                                                                    8)["x"]))
  try:  # one share per process, as if the model axis were not there
    distributed.check_process_rows(mesh, axes, 8, (jax.process_index(), 2))
    error = None
  except InputError as e:
    error = str(e)
  return dict(shard=list(shard), total=total, error=error)


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=xla_flags(devices),
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _parse(out: str, key: str):
  line = next(l for l in out.splitlines() if l.startswith(key + " "))
  value = line[len(key) + 1:]
  return json.loads(value) if key in ("LOSSES", "ROWS") else value


def _losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_jsonl(workdir)}


def _autoencoder_export(path: str) -> None:
  """An export as ``checkpoint.export_params`` writes it, of a random autoencoder."""
  import orbax.checkpoint as ocp
  config = tiny_config()
  os.makedirs(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), random_frozen_autoencoder(config))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": json.loads(config.to_json()), "step": 1, "source": "ema",
               "dtype": None}, f)


def _stale_iterator_state(workdir: str, step: int, processes: int) -> None:
  """Grain iterator files of a ``processes``-process run, as checkpoints used to hold."""
  data = os.path.join(workdir, "checkpoints", str(step), "data")
  os.makedirs(data, exist_ok=True)
  for i in range(processes):
    with open(os.path.join(data, f"process_{i}-of-{processes}.json"), "w") as f:
      json.dump({"next_index": 5 + i}, f)


def _rolled_back(workdir: str, copy: str, step: int) -> None:
  """``copy``: ``workdir`` as it was at ``step`` (later checkpoints and metric rows removed),
  so a run there resumes from ``step`` and logs the later steps itself."""
  shutil.copytree(workdir, copy)
  folder = os.path.join(copy, "checkpoints")
  for name in os.listdir(folder):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(folder, name))
  rows = [r for r in read_jsonl(copy) if r["step"] <= step]
  with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.timeout(1500)  # 4 trainer processes; under 5 min on the 2-core CI machine
def test_two_processes_match_one_and_resume_on_other_counts(tmp_path):
  tmp = str(tmp_path)
  _autoencoder_export(f"{tmp}/ae_export")
  train_steps(f"{tmp}/one", 4)  # the reference: 1 process x 8 devices, checkpoints at 2 and 4
  _rolled_back(f"{tmp}/one", f"{tmp}/one_b", 2)
  _stale_iterator_state(f"{tmp}/one_b", 2, 3)
  ck_one = restored_checksum(f"{tmp}/one", 2)
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, tmp, f"127.0.0.1:{port}", "2",
                             str(i)], env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    single = losses(f"{tmp}/ae_export")
    results = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  reference = _losses(f"{tmp}/one")
  assert sorted(reference) == [1, 2, 3, 4]

  # Denoiser stage: 2 processes x 4 devices == 1 process x 8 devices.
  multi = [_parse(out, "LOSSES") for out, _ in results]
  assert multi[0] == multi[1]  # every process sees the same global loss
  np.testing.assert_allclose(multi[0], single, rtol=1e-5)
  # A model axis across the hosts: both feed every row, and the check refuses one share each.
  for out, _ in results:
    rows = _parse(out, "ROWS")
    assert rows["shard"] == [0, 1] and rows["total"] == 28.0
    assert rows["error"] and "devices hold rows [0, 8)" in rows["error"]

  # 1 -> 2 processes: the same state, and steps 3-4 on the batches of steps 3-4 (with stale
  # iterator files of a 3-process run in the checkpoint).
  assert all(_parse(out, "CK_ONE") == ck_one for out, _ in results)
  resumed = _losses(f"{tmp}/one_b")
  assert sorted(resumed) == [1, 2, 3, 4]
  np.testing.assert_allclose([resumed[3], resumed[4]], [reference[3], reference[4]], rtol=1e-5)

  # 2 processes from scratch == 1 process; then 2 -> 1 process (8 devices) and 2 processes x
  # 4 devices -> 1 process x 4 devices.
  two = _losses(f"{tmp}/two")
  assert sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)],
                             rtol=1e-5)
  ck_two = _parse(results[0][0], "CK_TWO")
  assert _parse(results[1][0], "CK_TWO") == ck_two
  assert restored_checksum(f"{tmp}/two", 2) == ck_two
  for name in ("two_b", "two_c"):
    _rolled_back(f"{tmp}/two", f"{tmp}/{name}", 2)
  train_steps(f"{tmp}/two_b", 4)
  four = subprocess.run([sys.executable, "-c", _WORKER, tmp], env=_env(4), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert four.returncode == 0, four.stderr[-3000:]
  assert _parse(four.stdout, "CK_TWO") == ck_two
  resumed_two = {name: _losses(f"{tmp}/{name}") for name in ("two_b", "two_c")}
  for got in resumed_two.values():
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[3], got[4]], [reference[3], reference[4]], rtol=1e-5)
  print("MULTIHOST", json.dumps(dict(  # the numbers BENCHMARKS.md quotes (pytest -s)
      denoiser_1x8=single, denoiser_2x4=multi[0], ck_one=ck_one[:16], ck_two=ck_two[:16],
      reference=reference, one_then_two=resumed, two=two, **resumed_two)))


def _numbers(tree, skip=("seconds", "time")):
  """Flattened {path: number} of a metrics tree, timings left out."""
  if isinstance(tree, dict):
    return {f"{k}/{p}": v for k, sub in tree.items() if not any(s in k for s in skip)
            for p, v in _numbers(sub, skip).items()}
  if isinstance(tree, list):
    return {f"{i}/{p}": v for i, sub in enumerate(tree) for p, v in _numbers(sub, skip).items()}
  return {"": tree}


@contextlib.contextmanager
def _job(args: list[str], cwds=(ROOT, ROOT),
         processes: int = 2) -> Iterator[list[subprocess.Popen]]:
  """``python *args`` as the processes of a job of ``processes`` x (8 / ``processes``) CPU
  devices (jax.distributed on localhost, gloo collectives; 2 x 4 unless told), process k in
  ``cwds[k]``; any still running when the block ends is killed."""
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, *args], cwd=cwds[i], text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=dict(_env(8 // processes), MIRAGE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               MIRAGE_NUM_PROCESSES=str(processes), MIRAGE_PROCESS_ID=str(i)))
      for i in range(processes)]
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _wait(procs: list[subprocess.Popen], returncode: int = 0) -> list[tuple[str, str]]:
  """Each process's (stdout, stderr), once it exited with ``returncode``."""
  results = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == returncode, err[-3000:]
  return results


def test_evaluate_on_two_processes_writes_once_and_matches_one(tmp_path):
  from tests.test_generate import run_cli, save_tiny_export
  export = save_tiny_export(str(tmp_path / "export"))
  args = ["-m", "mirage_jax.evaluate", f"--checkpoint={export}", "--benchmark=revisit",
          "--procedural_seeds=100001:100003", "--num_frames=24", "--backends=mirage",
          "--nooracle", "--novideos"]
  with _job([*args, f"--output_dir={tmp_path / 'two'}"]) as procs:
    one = run_cli(*args[1:], f"--output_dir={tmp_path / 'one'}")
    results = _wait(procs)
  assert one.returncode == 0, one.stderr[-3000:]
  # Each process ran one trajectory and wrote its part; only process 0 wrote the report.
  assert "seed100001: done" in results[0][0] and "seed100002: done" in results[1][0]
  assert "report:" in results[0][0] and "report:" not in results[1][0]
  assert "psnr_revisit" not in results[1][0]
  two = tmp_path / "two"
  assert sorted(os.listdir(two / "parts")) == ["process_0.json", "process_1.json"]
  parts = [json.loads((two / "parts" / f"process_{i}.json").read_text())["revisit"]
           for i in range(2)]
  assert list(parts[0]) == ["seed100001"] and list(parts[1]) == ["seed100002"]
  m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["revisit"]
  m2 = json.loads((two / "metrics.json").read_text())["revisit"]
  assert list(m2["trajectories"]) == ["seed100001", "seed100002"]
  a, b = _numbers(m1), _numbers(m2)
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    if isinstance(a[k], float):
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    else:
      assert b[k] == a[k], k
  # Process 0 refuses the now non-empty directory: both processes exit 2 with its one line
  # (none waits forever at a barrier), and nothing there changes.
  before = sorted(p.relative_to(two) for p in two.rglob("*"))
  with _job([*args, f"--output_dir={two}"]) as procs:
    results = _wait(procs, returncode=2)
  for _, err in results:
    assert "is not empty" in err.strip().splitlines()[-1], err
  assert sorted(p.relative_to(two) for p in two.rglob("*")) == before


def test_shards_are_rows_of_one_global_stream_with_per_example_draws():
  from data_pipelines import pipeline
  same = [synthetic_clip(0)] * 8  # every record the same clip: only the random draws differ
  kw = dict(num_frames=2, stride=2, resolution=(8, 4), batch_size=8, seed=3, crop="random",
            read_threads=0)
  take = lambda it, n: [next(it) for _ in range(n)]
  full = take(pipeline.make_iterator(same, **kw, shard_index=0, shard_count=1), 3)
  hosts = [take(pipeline.make_iterator(same, **kw, shard_index=k, shard_count=2), 3)
           for k in range(2)]
  for s in range(3):  # the two hosts' rows are the global batch, row for row
    for key in ("frames", "intrinsics", "clip_index"):
      np.testing.assert_array_equal(np.concatenate([h[s][key] for h in hosts]), full[s][key])
  # Host 1's i-th example is not host 0's i-th: draws follow the global example index.
  same_draw = [np.array_equal(hosts[0][s]["frames"][i], hosts[1][s]["frames"][i])
               for s in range(3) for i in range(4)]
  assert sum(same_draw) <= 2, same_draw
  # The position is the step: starting at batch 2 gives batch 2, on any shard count.
  resumed = next(pipeline.make_iterator(same, **kw, shard_index=1, shard_count=4, start_step=2))
  np.testing.assert_array_equal(resumed["frames"], full[2]["frames"][2:4])


def _files(root) -> dict[str, bytes]:
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, names in os.walk(root) for f in names}


@pytest.mark.slow  # two 2-process jobs and a 1-process generate (~100 s)
def test_export_and_generate_on_two_processes_write_once_and_match_one(tmp_path):
  """Export, then generate from that export, as 2 processes x 4 devices: the outputs are
  those of 1 process. The outputs are relative paths and each process runs in its own
  folder, so a file written by process 1 would land in ``p1/``."""
  import jax
  from data_pipelines import files, procedural
  from mirage_jax import checkpoint
  from tests.test_generate import run_cli, save_tiny_export
  source = save_tiny_export(str(tmp_path / "source"))  # the tiny denoiser, random weights
  params, config, _ = checkpoint.load_export(source)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "work" / "checkpoints"), every=0, keep=1,
                                 async_save=False)
  ckpt.save(3, {"params": jax.tree.map(lambda x: 0 * x, params), "ema": params}, config)
  ckpt.close()
  geometry = tmp_path / "geometry.npz"
  files.save_geometry_npz(geometry, procedural.render_clip(7, 5, 32, 32, trajectory="loop"))
  cwds = [tmp_path / "p0", tmp_path / "p1"]
  for d in cwds:
    d.mkdir()

  start = time.monotonic()  # phase times, printed: this test has been slow now and then
  phase = lambda name: print(f"phase {name} done at {time.monotonic() - start:.1f} s", flush=True)
  export = ["-m", "mirage_jax.export", f"--workdir={tmp_path / 'work'}", "--output=export"]
  with _job(export, cwds) as procs:
    assert checkpoint.export_params(str(tmp_path / "work"), str(tmp_path / "one_export")) == 3
    phase("one-process export")
    exported = _wait(procs)
  phase("two-process export")
  assert "exported step 3" in exported[0][0] and "exported step" not in exported[1][0]
  assert os.listdir(tmp_path / "p1") == [] and os.listdir(tmp_path / "p0") == ["export"]
  one, two = _files(tmp_path / "one_export"), _files(tmp_path / "p0" / "export")
  # The same files and config.json (Orbax names its data files at random, and how many it
  # writes follows the timing of its writes: compared as one name).
  layout = lambda files: sorted({re.sub(r"/d/[0-9a-f]{32}$", "/d/*", k) for k in files})
  assert layout(one) == layout(two) and "config.json" in one
  assert one["config.json"] == two["config.json"]
  restored = [checkpoint.load_export(str(p))[0] for p in (tmp_path / "one_export",
                                                          tmp_path / "p0" / "export")]
  for a, b, c in zip(*(jax.tree.leaves(t) for t in (params, *restored))):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))  # the EMA, not the zeros
    np.testing.assert_array_equal(np.asarray(c), np.asarray(a))

  # Process 0 refuses to replace the export: every process exits 2 with its one line.
  with _job(export, cwds) as procs:
    for _, err in _wait(procs, returncode=2):
      assert err.strip().splitlines()[-1] == ("error: --output: field 'output': export "
                                              "already exists")
  phase("refusal")

  args = ["-m", "mirage_jax.generate", f"--checkpoint={tmp_path / 'p0' / 'export'}",
          f"--geometry_path={geometry}", "--memory=voxel", "--num_frames=5"]
  with _job([*args, "--output_dir=out"], cwds) as procs:
    single = run_cli(*args[1:], f"--output_dir={tmp_path / 'one_out'}")
    phase("one-process generate")
    generated = _wait(procs)
  phase("two-process generate")
  assert single.returncode == 0, single.stderr[-3000:]
  assert "generated 5 frames" in generated[0][0] and "generated" not in generated[1][0]
  assert os.listdir(tmp_path / "p1") == []
  one, two = _files(tmp_path / "one_out"), _files(tmp_path / "p0" / "out")
  assert sorted(two) == sorted(one) == ["depth.mp4", "depth.npz", "objects.npz",
                                        "timings.json", "video.gif", "video.mp4"]
  for name in ("depth.npz", "objects.npz"):
    a, b = np.load(tmp_path / "one_out" / name), np.load(tmp_path / "p0" / "out" / name)
    assert a.files == b.files
    for k in a.files:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{k}")
  assert two["video.mp4"] == one["video.mp4"]
  print("MULTIHOST_EXPORT_GENERATE", json.dumps(dict(
      export_files=layout(_files(tmp_path / "one_export")), generate_files=sorted(two),
      depth_max_abs_diff=float(np.abs(np.load(tmp_path / "one_out" / "depth.npz")["depths"] -
                                      np.load(tmp_path / "p0" / "out" / "depth.npz")["depths"]).max()))))


@pytest.mark.parametrize("module,args,env,where", [
    ("mirage_jax.export", ["--workdir=w", "--output=o", "--coordinator_address=127.0.0.1:1"],
     {}, "--coordinator_address: field 'num_processes/process_id'"),
    ("mirage_jax.generate", ["--checkpoint=c", "--geometry_path=g.npz", "--num_processes=2",
                             "--process_id=2", "--coordinator_address=127.0.0.1:1"],
     {}, "--process_id: field 'process_id': 2 not in [0, 2)"),
    ("mirage_jax.aot", [f"--config={ROOT}/experiments/tiny_cpu.py", "--topology=v5e:2x2"],
     {"MIRAGE_COORDINATOR_ADDRESS": "127.0.0.1:1", "MIRAGE_NUM_PROCESSES": "two",
      "MIRAGE_PROCESS_ID": "0"}, "$MIRAGE_NUM_PROCESSES: field 'MIRAGE_NUM_PROCESSES'"),
])
def test_bad_distributed_flags_are_one_line_errors(module, args, env, where, tmp_path):
  """The multi-process flags of export, generate and aot: exit 2, one line, nothing written."""
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, text=True,
                          capture_output=True, env=dict(_env(1), **env), timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {where}"), result.stderr
  assert os.listdir(tmp_path) == []
