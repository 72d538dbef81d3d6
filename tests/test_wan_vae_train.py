"""The Wan VAE training stage (``config.stage == 'autoencoder'``, family wan): reconstruction
improves, exact resume after SIGTERM, the export is a Wan VAE export (load_export,
encode_latents), AOT for a TPU topology, bad configs."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import build, builders, encode_latents, latent_clips, pipeline
from data_pipelines.procedural import render_clip
from experiments import wan22_pretrain
from mirage_jax import checkpoint
from mirage_jax.errors import InputError
from mirage_jax.families.wan import stages as wan_stages
from mirage_jax.families.wan import vae as wan_vae
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.test_wan_train import check_exact_resume

RES, FRAMES = 32, 5  # 2x2 latents, 2 latent frames
TRAIN_STEPS = 30


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
  """8 procedural clips of 16 frames at 32x32 (6 train, 1 validation, 1 test)."""
  d = str(tmp_path_factory.mktemp("wan_vae_rooms"))
  build.build("procedural_rooms", d, **_config(d).data.build.to_dict())
  return d


def _config(data_dir, **train_kw):
  c = wan22_pretrain.get_config("autoencoder,tiny")
  c.data.update(data_dir=data_dir, resolution=(RES, RES), num_frames=FRAMES, read_threads=0,
                read_buffer_size=1)
  c.data.build.update(num_clips=8, frames_per_clip=16, resolution=RES)
  c.train.update(log_every=10, peak_tflops_per_device=1.0)
  c.train.update(**train_kw)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _held_out(n: int = 2) -> np.ndarray:
  """(n, 5, 32, 32, 3) in [-1, 1]: procedural clips of seeds no built clip has."""
  clips = [render_clip(100_000 + i, FRAMES, RES, RES, trajectory="random")["frames"]
           for i in range(n)]
  return pipeline.frames_to_float(np.stack(clips))


def _psnr(vae, video) -> float:
  """Mean PSNR (dB, range [-1, 1]) of encode -> decode (the inference path: posterior mean,
  chunked, clamped)."""
  recon = np.asarray(wan_vae.jit_decode(vae, wan_vae.jit_encode(vae, jnp.asarray(video))))
  mse = np.mean((recon - video) ** 2, axis=(1, 2, 3, 4))
  return float(np.mean(10 * np.log10(4.0 / mse)))


@pytest.fixture(scope="module")
def trained(rooms, tmp_path_factory):
  """A tiny VAE trained TRAIN_STEPS steps, exported (raw params)."""
  d = tmp_path_factory.mktemp("wan_vae_run")
  config = _config(rooms, steps=TRAIN_STEPS)
  loop_lib.train_and_evaluate(config, str(d / "work"))
  checkpoint.export_params(str(d / "work"), str(d / "export"), use_ema=False)
  return dict(config=config, workdir=str(d / "work"), export=str(d / "export"))


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.timeout(1500)  # training + compiles: ~6 min on a loaded 2-core machine
def test_reconstruction_improves(trained):
  """Held-out PSNR after training beats the random init's by a wide margin, and the training
  L1 falls."""
  rows = _metrics(trained["workdir"])
  assert rows[-1]["step"] == TRAIN_STEPS
  assert rows[-1]["l1"] < 0.7 * rows[0]["l1"]
  for key in ("loss", "kl", "psnr", "latent_std", "tflops_per_s"):
    assert np.isfinite(rows[-1][key]), key
  init = wan_stages.WanVAEStage(trained["config"]).build(nnx.Rngs(trained["config"].seed))
  vae, _ = wan_vae.load_export(trained["export"])
  video = _held_out()
  before, after = _psnr(init, video), _psnr(vae, video)
  assert after > before + 5.0, (before, after)
  assert after > 14.0, after


def test_loss_is_l1_plus_weighted_kl():
  """The stage's loss = 3 * mean|x - D(z)| + 3e-6 * KL sum / pixel values, with z the
  posterior mean when sampling is off."""
  config = wan22_pretrain.get_config("autoencoder,tiny")
  config.data.update(resolution=(16, 16), num_frames=5)
  config.autoencoder_loss.sample_posterior = False
  stage = wan_stages.WanVAEStage(config)
  vae = stage.build(nnx.Rngs(0))
  video = jax.random.uniform(jax.random.key(1), (2, 5, 16, 16, 3), minval=-1, maxval=1)
  # Jitted (one compile each, not op by op).
  loss, aux = nnx.jit(lambda m, v: stage.loss(m, {}, {"frames": v}, jax.random.key(2)))(vae, video)
  mu, logvar = nnx.jit(lambda m, v: m.encode_moments(v))(vae, video)
  recon = nnx.jit(lambda m, z: m.decode(z, normalized=False, clamp=False))(vae, mu)
  l1 = np.mean(np.abs(np.asarray(recon) - np.asarray(video)))
  kl = 0.5 * np.sum(np.asarray(mu) ** 2 + np.exp(np.asarray(logvar)) - 1 - np.asarray(logvar))
  want = 3.0 * l1 + 3e-6 * kl / video.size
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(aux["l1"]), l1, rtol=1e-4)
  # Sampling draws z around mu: another loss, the same encoder moments.
  config.autoencoder_loss.sample_posterior = True
  sampling = wan_stages.WanVAEStage(config)
  sampled, _ = nnx.jit(lambda m, v: sampling.loss(m, {}, {"frames": v},
                                                  jax.random.key(2)))(vae, video)
  assert float(sampled) != pytest.approx(float(loss), rel=1e-6)


def test_remat_gives_the_same_gradients():
  config = wan22_pretrain.get_config("autoencoder,tiny")
  config.data.update(resolution=(16, 16), num_frames=5)
  video = jax.random.uniform(jax.random.key(1), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  grads = []
  for remat in ("none", "full"):
    config.autoencoder.remat = remat
    stage = wan_stages.WanVAEStage(config)
    graphdef, params = nnx.split(stage.build(nnx.Rngs(0)), nnx.Param)
    loss = lambda p: stage.loss(nnx.merge(graphdef, p), {}, {"frames": video},
                                jax.random.key(0))[0]
    grads.append(jax.jit(jax.grad(loss))(params))  # one compile, not op by op
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # training + compiles: ~6 min on a loaded 2-core machine
def test_exact_resume_after_sigterm(rooms, tmp_path, monkeypatch):
  """A SIGTERM mid-run saves at the next step and returns 0; the rerun continues exactly."""
  check_exact_resume(lambda: _config(rooms, steps=6, log_every=2), tmp_path, monkeypatch)


# ----------------------------------------------------------------------------- export


@pytest.mark.slow
@pytest.mark.timeout(1500)  # training + compiles: ~6 min on a loaded 2-core machine
def test_export_is_a_wan_vae_export(trained, rooms, tmp_path):
  """The run's export loads with load_export and encode_latents encodes with it (as with a
  converted VAE): the stored latents are the trained VAE's encoding of the window."""
  vae, cfg = wan_vae.load_export(trained["export"])
  assert cfg.stage == "autoencoder" and cfg.family == "wan"
  target, preceding = 5, 4
  counts = encode_latents.run(
      data_dir=rooms, dataset="procedural_rooms", config_name="default",
      vae=trained["export"], output_dir=str(tmp_path / "latents"), target_frames=target,
      preceding_frames=preceding, text_len=8, text_dim=32)
  assert counts["train"] > 0
  rec = latent_clips.LatentClips(str(tmp_path / "latents"), "train")[0]
  assert rec["target_latents"].shape == (2, RES // 16, RES // 16, 48)
  clip = builders.record_to_clip(builders.load(rooms, "procedural_rooms")
                                 .as_data_source("train")[int(rec["clip_index"])])
  frames = pipeline.frames_to_float(clip["frames"][preceding:preceding + target][None])
  want = np.asarray(wan_vae.jit_encode(vae, jnp.asarray(frames))[0])
  np.testing.assert_allclose(rec["target_latents"].astype(np.float32), want,
                             atol=0.05 * (1 + np.abs(want).max()))  # stored in bf16


@pytest.mark.slow
@pytest.mark.timeout(1500)  # training + compiles: ~6 min on a loaded 2-core machine
def test_continues_from_an_export(trained, rooms, tmp_path):
  """``config.autoencoder_checkpoint``: the run starts from the export's params (its first
  loss is the trained model's, far below what the trained fixture's run logged over its first
  10 steps from a fresh start: 0.21 against 0.39, and 0.50 at a fresh start's step 1)."""
  config = _config(rooms, steps=1, log_every=1)
  config.autoencoder_checkpoint = trained["export"]
  loop_lib.train_and_evaluate(config, str(tmp_path / "w"))
  first = _metrics(str(tmp_path / "w"))[0]
  from_scratch = _metrics(trained["workdir"])
  assert first["l1"] < 0.7 * from_scratch[0]["l1"]  # the mean of a fresh run's first 10 steps
  assert first["l1"] < 1.3 * from_scratch[-1]["l1"]


# ----------------------------------------------------------------------------- AOT


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.timeout(1500)  # the TPU compile: minutes on a loaded 2-core machine
@pytest.mark.usefixtures("tpu_compiler")
def test_compile_for_v5e_2x2():
  from mirage_jax import aot  # pylint: disable=g-import-not-at-top
  config = _config("unused")
  config.mesh = dict(data=1, fsdp=2, context=1, tensor=2)
  config.data.batch_size = 2
  config.autoencoder.remat = "full"
  # One residual block per level: every layer kind and the sharding are still compiled, in
  # about half the graph (this TPU compile is the file's slowest step).
  config.autoencoder.update(encoder_res_blocks=1, decoder_res_blocks=1)
  report = aot.compile_report(config, "v5e:2x2")
  assert report["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 2}
  assert 0 < report["memory_per_device_gib"] < report["hbm_per_device_gib"] and report["fits"]
  assert report["xla_tflops_per_device"] > 0 and report["analytic_tflops_per_device"] > 0


# ----------------------------------------------------------------------------- bad config


def _stage_error(config) -> InputError:
  with pytest.raises(InputError) as e:
    stage = step_lib.make_stage(config)
    stage.load_frozen(mesh_lib.build_mesh(config), mesh_lib.logical_rules(config))
  assert "\n" not in str(e.value)
  return e.value


@pytest.mark.parametrize("field, value", [
    ("num_frames", 4), ("num_frames", 8), ("num_frames", 0),
    ("resolution", (24, 32)), ("resolution", (32, 8))])
def test_bad_data_config_names_the_field(field, value):
  c = _config("unused")
  c.data[field] = value
  e = _stage_error(c)
  assert e.field == field and e.where == "config.data"


def test_bad_loss_and_checkpoint_config(trained, tmp_path):
  c = _config("unused")
  c.autoencoder_loss.kl_weight = -1.0
  assert _stage_error(c).field == "kl_weight"
  c = _config("unused")
  c.autoencoder_loss.lpips_weight = 3.0
  assert _stage_error(c).field == "lpips_weight"
  c = _config("unused")
  c.autoencoder.remat = "sometimes"
  with pytest.raises(InputError, match="remat"):
    step_lib.make_setup(c, step_lib.make_stage(c), mesh_lib.build_mesh(c))
  c = _config("unused")
  c.autoencoder_checkpoint = str(tmp_path / "nowhere")
  assert _stage_error(c).field == "autoencoder_checkpoint"
  # An export of another VAE (other widths).
  other = tmp_path / "other"
  other.mkdir()
  meta = json.loads(open(os.path.join(trained["export"], "config.json")).read())
  meta["config"]["autoencoder"]["encoder_dim"] = 32
  (other / "config.json").write_text(json.dumps(meta))
  c.autoencoder_checkpoint = str(other)
  e = _stage_error(c)
  assert e.field == "autoencoder.encoder_dim" and e.where.endswith("config.json")
