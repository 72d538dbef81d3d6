"""Wan-family fine-tuning on CPU: a tiny random "pretrained" Wan2.2 converted by convert_wan,
a procedural dataset (with its generated captions) pre-encoded to latent clips and caption
embeddings (a tiny random umT5 export and a tokenizer trained here), VACE + LoRA trained on
the frozen base with the default 10% caption dropout."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import build, encode_latents, latent_clips
from experiments import mirage_wan22_5b, wan22_ti2v_5b
from mirage_jax import checkpoint, diffusion, memory
from mirage_jax.families.wan import convert as wan_convert
from mirage_jax import weight_files
from mirage_jax.errors import InputError
from mirage_jax.families.wan import conditioning as wan_mirage
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import exports as wan_exports
from mirage_jax.families.wan import stages as wan_stage
from mirage_jax.families.wan import vae as wan_vae
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.fixtures_util import made_once

torch = pytest.importorskip("torch")

TARGET, PRECEDING = 9, 5  # video frames: 3 + 2 latent frames


def _rand(rng, shape):
  """PyTorch-like init scale (a standard normal base blows up through 4 layers)."""
  if len(shape) >= 2:
    return (rng.uniform(-1, 1, shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
  return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def _make_world(d: Path) -> None:
  """Released-layout random tiny Wan2.2 (no VACE, no LoRA) -> exports; 8 procedural clips ->
  latent clips (their counts in counts.json)."""
  rng = np.random.default_rng(0)
  cfg = wan_dit.wan_dit_config("tiny")
  cfg.vace, cfg.lora_rank = False, 0
  release = d / "release"
  release.mkdir()
  dit = {k: _rand(rng, t.original_shape) for t in wan_dit.original_layout(cfg).values()
         for k in t.keys}
  weight_files.write_safetensors(str(release / wan_convert.DIT_FILE), dit)
  vae = {k: _rand(rng, t.original_shape)
         for t in wan_vae.original_layout(wan_vae.wan_vae_config("tiny")).values() for k in t.keys}
  torch.save({k: torch.from_numpy(v) for k, v in vae.items()}, str(release / wan_convert.VAE_FILE))
  wan_convert.convert(str(d / "export"), dit=str(release / wan_convert.DIT_FILE),
                      vae=str(release / wan_convert.VAE_FILE), variant="tiny",
                      configs=wan22_ti2v_5b.export_configs("tiny"))
  build.build("procedural_rooms", str(d / "data"), num_clips=8, frames_per_clip=16,
              resolution=64)
  from tests.test_prompts import write_encoder  # pylint: disable=g-import-not-at-top
  from tests.test_text_tokenizer import make_tokenizer_folder  # pylint: disable=g-import-not-at-top
  (d / "tokenizer").mkdir()
  text = dict(encoder=write_encoder(str(d / "umt5")),
              tokenizer=str(make_tokenizer_folder(d / "tokenizer")))
  counts = encode_latents.run(
      data_dir=str(d / "data"), dataset="procedural_rooms", config_name="default",
      vae=str(d / "export" / "vae"), output_dir=str(d / "latents"), target_frames=TARGET,
      preceding_frames=PRECEDING, text_len=8, text_dim=32, text_encoder=text["encoder"],
      tokenizer=text["tokenizer"], text_batch=4)
  (d / "world.json").write_text(json.dumps(dict(counts=counts, **text)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The tiny Wan world of :func:`_make_world`, built once per run (this file and
  tests/test_wan_pretrain.py use it)."""
  d = made_once(tmp_path_factory, "wan_world", _make_world)
  return dict(dir=d, base=str(d / "export" / "dit"), vae=str(d / "export" / "vae"),
              latents=str(d / "latents"), **json.loads((d / "world.json").read_text()))


def _config(world, **train_kw):
  c = mirage_wan22_5b.get_config("tiny")
  c.denoiser.base_checkpoint = world["base"]
  c.data.data_dir = world["latents"]
  c.train.update(**train_kw)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- pieces


def test_vace_context_timesteps_noise_and_loss():
  mem = jnp.full((2, 3, 2, 2, 48), 7.0)
  control = jnp.arange(3 * 2 * 2 * 48, dtype=jnp.float32).reshape(3, 2, 2, 48)
  ctx = wan_mirage.vace_context(mem, control)
  assert ctx.shape == (2, 3, 2, 2, 96)
  np.testing.assert_array_equal(ctx[..., :48], 7.0)  # memory first, as the reference
  np.testing.assert_array_equal(ctx[1, ..., 48:], control)
  cov = jnp.zeros((2, 3, 2, 2), bool).at[0, 0, 0, 0].set(True)
  hole = wan_mirage.vace_context(mem, control, cov)[..., 96]
  assert hole[0, 0, 0, 0] == 0 and hole.sum() == 2 * 3 * 4 - 1

  sig = wan_mirage.sample_sigmas(jax.random.key(0), 4000, 3, shift=5.0)
  assert np.all(sig[:, 0] == 0) and np.all((sig[:, 1:] > 0) & (sig[:, 1:] < 1))
  # E[5s / (1 + 4s)], s ~ U(0, 1) = 5/4 - 5 ln(5) / 16.
  np.testing.assert_allclose(float(sig[:, 1:].mean()), 1.25 - 5 * np.log(5) / 16, atol=0.01)
  t = wan_mirage.frame_timesteps(sig[:2], num_reference=2, num_preceding=1)
  assert t.shape == (2, 6)
  np.testing.assert_array_equal(t[:, :3], 0.0)
  np.testing.assert_array_equal(t[:, 5], 0.0)
  np.testing.assert_allclose(t[:, 3:5], 1000 * sig[:2, 1:], rtol=1e-6)

  x0 = jax.random.normal(jax.random.key(1), (2, 3, 2, 2, 48))
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  s = jnp.array([[0.0, 0.5, 1.0], [0.0, 0.25, 0.75]])
  noisy = diffusion.add_noise(x0, noise, s)
  np.testing.assert_array_equal(noisy[:, 0], x0[:, 0])
  np.testing.assert_allclose(noisy[0, 2], noise[0, 2], atol=1e-6)
  perfect = noise - x0
  assert float(wan_mirage.flow_loss(perfect.at[:, 0].add(100.0), x0, noise)) < 1e-10
  assert float(wan_mirage.flow_loss(perfect.at[:, 1].add(1.0), x0, noise)) == pytest.approx(0.5)


def test_control_latents_are_the_encoded_all_ones_video(world):
  vae, _ = encode_latents.load_vae(world["vae"])
  control = wan_mirage.control_latents(vae, 3, 4, 4)
  direct = wan_vae.jit_encode(vae, jnp.ones((1, 9, 64, 64, 3)), chunked=False)[0]
  np.testing.assert_allclose(control, direct, rtol=1e-5, atol=1e-5)
  stored = np.load(os.path.join(world["latents"], latent_clips.CONTROL))
  assert stored.shape == (5, 4, 4, 48)  # 3 target + 2 preceding latent frames
  np.testing.assert_allclose(stored[:3], control, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- data


def test_latent_clips_match_a_direct_encoding(world):
  from data_pipelines import builders
  assert world["counts"] == {"train": 6, "validation": 1}
  src = latent_clips.LatentClips(world["latents"], "train")
  assert len(src) == 6 and src.metadata["latent_hw"] == [4, 4]
  rec = src[0]
  assert rec["target_latents"].shape == (3, 4, 4, 48)
  assert rec["preceding_latents"].shape == (2, 4, 4, 48)
  assert rec["depths"].shape == (5, 4, 4) and rec["intrinsics"].shape == (5, 3, 3)
  assert rec["has_text"] and rec["text"].shape == (8, 32)
  clip = builders.record_to_clip(builders.load(str(world["dir"] / "data"), "procedural_rooms")
                                 .as_data_source("train")[int(rec["clip_index"])])
  assert clip["caption"].startswith("A camera ")
  vae, _ = encode_latents.load_vae(world["vae"])
  frames = clip["frames"].astype(np.float32) / 127.5 - 1.0
  want = np.asarray(wan_vae.jit_encode(vae, jnp.asarray(frames[PRECEDING:PRECEDING + TARGET][None]))[0])
  np.testing.assert_allclose(rec["target_latents"].astype(np.float32), want, atol=0.05 * (
      1 + np.abs(want).max()))  # stored in bf16
  # Latent k pairs with video frame 4k of its chunk: target 5, 9, 13; preceding 0, 4.
  ids = [5, 9, 13, 0, 4]
  np.testing.assert_array_equal(rec["poses_c2w"], clip["poses_c2w"][ids])
  depth = encode_latents.resize_depth(clip["depths"][ids], 4, 4)
  np.testing.assert_allclose(rec["depths"], depth, rtol=1e-6)
  np.testing.assert_array_equal(rec["static_masks"], encode_latents.latent_static_mask(
      clip["dynamic_masks"][ids], clip["depth_valid"][ids], 4, 4))


def test_script_recipe_reads_the_same_latents_without_preceding(world):
  """The reference script's default recipe (no references, no preceding frames) trains on the
  paper recipe's latent dataset: the preceding latents are dropped at load."""
  context = lambda c: (c.denoiser.preceding_frames, c.denoiser.reference_frames, c.data.drop_preceding)
  assert context(mirage_wan22_5b.get_config()) == context(mirage_wan22_5b.get_config(
      "ti2v_5b,v5p_128,paper")) == (8, 8, False)  # the paper's recipe is the default
  assert context(mirage_wan22_5b.get_config("ti2v_5b,script")) == (0, 0, True)
  c = mirage_wan22_5b.get_config("tiny,script")
  c.denoiser.base_checkpoint, c.data.data_dir = world["base"], world["latents"]
  assert (c.denoiser.preceding_frames, c.denoiser.reference_frames, c.data.drop_preceding) == (0, 0, True)
  stage = step_lib.make_stage(c)
  source = inputs_lib.make_sources(c)["train"]
  stage.check_source(source, "train")
  batch = next(inputs_lib.make_input(c, source, split="train"))
  shapes = stage.batch_shapes()
  assert {k: batch[k].shape for k in stage.fields} == {k: shapes[k][0] for k in stage.fields}
  assert batch["preceding_latents"].shape[1] == 0 and batch["depths"].shape[1] == 3
  assert stage._control().shape[0] == 3  # the target part of the stored control latents
  c.denoiser.preceding_frames = PRECEDING  # dropping latents the config asks for
  with pytest.raises(InputError, match="drop_preceding"):
    step_lib.make_stage(c).check_source(source, "train")


def test_captions_are_encoded_into_the_records(world):
  """Each record's text is umT5 of its clip's caption (real tokens, zeros past them, in
  bf16); an empty caption gets umT5 of "" (never zeros) and has_text False; the dataset's
  empty_text.npy is umT5 of "", padded."""
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  from mirage_jax.text import prompts  # pylint: disable=g-import-not-at-top
  enc = prompts.PromptEncoder(world["encoder"], world["tokenizer"], length=8)
  source = builders.load(str(world["dir"] / "data"), "procedural_rooms").as_data_source("train")
  src = latent_clips.LatentClips(world["latents"], "train")
  captions = set()
  for i in range(len(src)):
    rec = src[i]
    caption = builders.record_to_clip(source[int(rec["clip_index"])])["caption"]
    captions.add(caption)
    [want] = enc.encode([caption])
    got = rec["text"].astype(np.float32)
    assert rec["has_text"] and len(want) == 8  # truncated to text_len, </s> kept
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
  assert len(captions) == len(src)  # every room its own caption
  empty = encode_latents.pad_text(enc.empty(), 8)
  assert np.abs(empty[0]).max() > 0.1 and not np.any(empty[1:])
  np.testing.assert_array_equal(np.load(os.path.join(world["latents"], latent_clips.EMPTY_TEXT)),
                                empty)
  assert src.metadata["text_encoder"] == os.path.abspath(world["encoder"])
  assert src.metadata["captioned_clips"] == sum(world["counts"].values())
  found = encode_latents.source_captions(str(world["dir"] / "data"), "procedural_rooms",
                                         "default", ("train", "validation"))
  assert len(found) == 7 and captions <= set(found.values())
  # A clip whose caption is "" has no embedding: it gets the empty prompt's, flagged.
  vae = lambda v: np.zeros((len(v), (v.shape[1] - 1) // 4 + 1, 4, 4, 48), np.float32)  # no VAE
  [data] = encode_latents.encode_clip(
      dict(source[0], caption=b""), 0, "uncaptioned", vae, resolution=None,
      target_frames=TARGET, preceding_frames=PRECEDING, num_references=0, windows_per_clip=1,
      texts={}, text_shape=(8, 32), empty=empty)
  rec = latent_clips.decode_record(data)
  assert not rec["has_text"]
  np.testing.assert_array_equal(rec["text"], empty.astype(rec["text"].dtype))


# ----------------------------------------------------------------------------- training


def test_train_loss_falls(world, tmp_path, monkeypatch):
  """Captioned latent clips, 10% caption dropout: the loss falls; the export holds the
  trained params and the dataset's text encoder and empty prompt, and a prompt given to the
  exported model reaches its DiT (with CFG: the stored empty prompt as the negative)."""
  workdir = str(tmp_path / "run")
  out = loop_lib.train_and_evaluate(_config(world, steps=60, log_every=10), workdir)
  losses = [m["loss"] for m in _metrics(workdir)]
  assert len(losses) == 6 and np.isfinite(losses).all()
  assert np.mean(losses[-2:]) < 0.85 * losses[0], losses
  assert out["memory_coverage"] > 0.5  # the first target frame's splat covers the others
  dropped = np.mean([m["caption_dropped"] for m in _metrics(workdir)])
  assert 0.0 < dropped < 0.3, dropped  # every clip has a caption: ~10% dropped

  # The export holds the trained params only and points at the base; load_dit rebuilds the
  # whole DiT from both. Without --text_encoder it names the latent dataset's.
  from mirage_jax import export as export_cli  # pylint: disable=g-import-not-at-top
  export = str(tmp_path / "export")
  checkpoint.export_params(workdir, export, **dict(zip(
      ("update_config", "add_files"), export_cli.dataset_text_files(export))))
  params, cfg, _ = checkpoint.load_export(export)
  check_prompt_reaches_the_dit(export, world, monkeypatch)
  assert cfg.denoiser.base_checkpoint == world["base"]
  flat = wan_exports.flat_paths(params)
  assert all(p[0] == "vace" or p[-1] in ("lora_a", "lora_b") for p in flat)
  model, _ = wan_exports.load_dit(export)
  base, _, _ = checkpoint.load_export(world["base"])
  state = wan_exports.flat_paths(nnx.state(model, nnx.Param).to_pure_dict())
  for p, v in wan_exports.flat_paths(base).items():
    np.testing.assert_array_equal(np.asarray(state[p]), np.asarray(v))
  for p, v in flat.items():
    np.testing.assert_array_equal(np.asarray(state[p]), np.asarray(v))


def check_prompt_reaches_the_dit(export: str, world, monkeypatch) -> None:
  """``generate --prompt`` from a fine-tune export with no text flags: the export names the
  dataset's text encoder and stores its empty prompt; one sampled chunk with CFG feeds the
  DiT umT5 of the prompt and that empty prompt (recorded at ``conditioning.predict``)."""
  from mirage_jax import families  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import world_model as wan_wm  # pylint: disable=g-import-not-at-top
  from mirage_jax.text import prompts  # pylint: disable=g-import-not-at-top
  cfg = checkpoint.export_config(export)
  assert cfg.denoiser.text_encoder == os.path.abspath(world["encoder"])
  assert cfg.denoiser.empty_text == os.path.join(export, latent_clips.EMPTY_TEXT)
  empty = np.load(os.path.join(world["latents"], latent_clips.EMPTY_TEXT))
  np.testing.assert_array_equal(np.load(cfg.denoiser.empty_text), empty)
  prompt = "a camera walks a loop through blue rooms"
  options = families.world_model(cfg).sampling_options(cfg, prompt=prompt, guidance_scale=3.0)
  [want] = prompts.PromptEncoder(world["encoder"], world["tokenizer"], length=8).encode([prompt])
  seen = []
  predict = wan_mirage.predict

  def spy(dit, refs, x, prec, sigmas, text, vace, **kw):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)[0]), text)
    return predict(dit, refs, x, prec, sigmas, text, vace, **kw)

  monkeypatch.setattr(wan_mirage, "predict", spy)
  config, vae, dit = wan_wm.WorldModel.load(export)
  wm = wan_wm.WorldModel(config, vae, dit, **options)
  frames = np.zeros((1, 64, 64, 3), np.uint8)
  wm.sample_chunk(jax.random.key(0), wm.encode(frames)[0],
                  jnp.zeros((wm.settings.latents,) + wm.latent_hw + (48,)))
  texts = {t.tobytes(): t for t in seen}
  assert len(texts) == 2, len(texts)  # the prompt and the CFG negative, nothing else
  got = sorted(texts.values(), key=lambda t: float(np.abs(t - empty).max()))
  np.testing.assert_array_equal(got[0], empty)
  np.testing.assert_allclose(got[1], encode_latents.pad_text(want, 8), rtol=1e-5, atol=1e-5)


def train_steps(config, latents: str, steps: int) -> dict:
  """``steps`` train steps of ``config``'s stage on the latent clips ``latents``, driven by
  hand (no loop): the stage, setup, initial and final state, the frozen params before and
  after (host copies) and the last metrics."""
  from mirage_jax import distributed  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.build_mesh(config)
  stage = step_lib.make_stage(config)
  stage.load_frozen(mesh, mesh_lib.logical_rules(config))
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  src = latent_clips.LatentClips(latents, "train")
  it = inputs_lib.make_input(config, src, split="train")
  shapes = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in shapes.items()})
  axes = mesh_lib.batch_axes(mesh, setup.rules)
  frozen_before = jax.tree.map(np.asarray, stage.frozen)
  frozen = jax.device_put(stage.frozen, setup.frozen_sharding())
  p0 = jax.tree.map(np.asarray, state["params"])
  metrics = None
  for _ in range(steps):
    local = next(it)
    batch = distributed.global_batch({k: local[k] for k in stage.fields}, mesh, axes)
    with setup.context():
      state, metrics = step(state, batch, frozen)
  return dict(stage=stage, setup=setup, params0=p0, state=state, metrics=metrics,
              frozen_before=frozen_before, frozen_after=jax.tree.map(np.asarray, frozen))


def changed_params(run: dict) -> dict:
  """Per trainable param: did the steps of :func:`train_steps` change it (nested dict)."""
  return jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), run["params0"],
                      run["state"]["params"])


def test_optimizer_state_only_for_trainable_and_base_unchanged(world):
  config = _config(world)
  run = train_steps(config, world["latents"], 3)
  stage, setup = run["stage"], run["setup"]
  assert isinstance(stage, wan_stage.WanStage)
  trainable = wan_exports.flat_paths(setup.abstract["params"])
  assert trainable and all(p[0] == "vace" or p[-1] in ("lora_a", "lora_b") for p in trainable)
  n_train = sum(x.size for x in jax.tree.leaves(setup.abstract["params"]))
  n_base = sum(x.size for x in jax.tree.leaves(stage.frozen["base"]))
  moments = [x for x in jax.tree.leaves(setup.abstract["opt_state"]) if x.ndim]
  assert sum(x.size for x in moments) == 2 * n_train  # Adam mu, nu of the trainable only
  # The frozen base is FSDP-sharded like params, not replicated.
  kernel = stage.frozen["base"]["blocks"]["ffn_in"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  assert np.isfinite(float(run["metrics"]["loss"]))
  jax.tree.map(np.testing.assert_array_equal, run["frozen_before"]["base"],
               run["frozen_after"]["base"])
  assert all(jax.tree.leaves(changed_params(run)["vace"]))
  assert n_base > 0 and n_train > 0


def test_exact_resume_after_sigterm(world, tmp_path, monkeypatch):
  """A SIGTERM mid-run saves at the next step and returns; the rerun continues exactly."""
  check_exact_resume(lambda: _config(world, steps=8, log_every=2), tmp_path, monkeypatch)


def check_exact_resume(make_config, tmp_path, monkeypatch) -> None:
  """``make_config()`` (more than 4 steps, a log every 2) run straight, and stopped by a
  SIGTERM at step 4 then rerun: same losses and params, to the bit."""
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  loop_lib.train_and_evaluate(make_config(), straight)
  reached = checkpoint.PreemptionFlag.reached

  # A real signal through the real handler, at a fixed step (a log step, so the two runs'
  # metrics lines average the same steps as the straight run's).
  def sigterm_at_step_4(self, step):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return reached(self, step)

  handler = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as m:
    m.setattr(checkpoint.PreemptionFlag, "reached", sigterm_at_step_4)
    config = make_config()
    config.checkpoint.every = 100  # only the preemption saves
    loop_lib.train_and_evaluate(config, resumed)
  ckpt = checkpoint.Checkpointer(os.path.join(resumed, "checkpoints"), every=1, keep=1)
  assert ckpt.latest_step() == 4
  ckpt.close()
  assert len(_metrics(resumed)) == 2  # stopped at step 4, not run to the end
  assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler is uninstalled
  loop_lib.train_and_evaluate(make_config(), resumed)
  ma, mb = _metrics(straight), _metrics(resumed)
  assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], rel=0, abs=0)
  out_a, out_b = str(tmp_path / "ea"), str(tmp_path / "eb")
  checkpoint.export_params(straight, out_a, use_ema=False)
  checkpoint.export_params(resumed, out_b, use_ema=False)
  pa, _, _ = checkpoint.load_export(out_a)
  pb, _, _ = checkpoint.load_export(out_b)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), pa, pb)


def test_two_processes_train_like_one(world, tmp_path):
  """``python -m mirage_jax.main`` as 2 processes x 4 CPU devices trains the Wan stage as 1
  process x 8 devices does, to the bit: every step's loss and the final params. The FSDP axis
  (2) spans the processes, each loading its own batch row; the tensor axis (4) stays within
  one.

  Both jobs run under jax.distributed (the one-process job as a job of one), so both reduce
  with the same collectives (gloo on CPU). A one-process run without jax.distributed reduces
  with XLA's in-process collectives, which add in another order: its first loss differs in the
  last bits, and Adam's first steps (``m / sqrt(v)``) turn that into up to about 1e-4 in the
  params. That is the collectives'
  arithmetic, not the split into processes, which is what this test pins."""
  from tests.test_multihost import ROOT, _job, _wait  # pylint: disable=g-import-not-at-top
  steps = 2
  args = ["-m", "mirage_jax.main", f"--config={ROOT}/experiments/mirage_wan22_5b.py:tiny",
          f"--config.denoiser.base_checkpoint={world['base']}",
          f"--config.data.data_dir={world['latents']}", f"--config.train.steps={steps}",
          "--config.train.log_every=1"]
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  with _job([*args, f"--workdir={two}"]) as two_procs, \
       _job([*args, f"--workdir={one}"], processes=1) as one_proc:
    _wait(two_procs + one_proc)
  losses = {w: [m["loss"] for m in _metrics(w)] for w in (one, two)}
  params = []
  for w in (one, two):
    checkpoint.export_params(w, w + "_export", use_ema=False)
    params.append(wan_exports.flat_paths(checkpoint.load_export(w + "_export")[0]))
  print("WAN_MULTIHOST", json.dumps(dict(  # pytest -s
      one_process_8=losses[one], two_processes_4=losses[two], params=len(params[0]))))
  assert len(losses[one]) == steps and np.isfinite(losses[one]).all()
  assert losses[two] == losses[one]
  assert sorted(params[1]) == sorted(params[0])
  for p, v in params[0].items():
    np.testing.assert_array_equal(np.asarray(params[1][p]), np.asarray(v), err_msg="/".join(p))


# ----------------------------------------------------------------------------- bad inputs


def _stage_error(config) -> InputError:
  mesh = mesh_lib.build_mesh(config)
  with pytest.raises(InputError) as e:
    stage = step_lib.make_stage(config)
    stage.load_frozen(mesh, mesh_lib.logical_rules(config))
  assert "\n" not in str(e.value)
  return e.value


def test_bad_inputs(world, tmp_path):
  c = _config(world)
  c.denoiser.base_checkpoint = ""
  assert _stage_error(c).field == "base_checkpoint"
  c.denoiser.base_checkpoint = str(tmp_path / "nowhere")
  e = _stage_error(c)
  assert "nowhere" in str(e)
  c.denoiser.base_checkpoint = world["vae"]  # a VAE export, not a DiT
  e = _stage_error(c)
  assert e.where.endswith("config.json") and e.field == "family"
  # A DiT export of another model: same family, other width.
  other = tmp_path / "other"
  meta = json.loads((Path(world["base"]) / "config.json").read_text())
  meta["config"]["denoiser"]["model"]["dim"] = 96
  other.mkdir()
  (other / "config.json").write_text(json.dumps(meta))
  os.symlink(Path(world["base"]) / "params", other / "params")
  c.denoiser.base_checkpoint = str(other)
  e = _stage_error(c)
  assert e.field == "denoiser.model.dim" and str(other) in e.where
  c = _config(world)
  c.denoiser.train_stages = ("bogus",)
  assert _stage_error(c).field == "train_stages"
  # A latent dataset of other shapes than the config's.
  c = _config(world, steps=1)
  c.denoiser.target_frames = 13
  with pytest.raises(InputError, match="target_frames"):
    loop_lib.train_and_evaluate(c, str(tmp_path / "w"))
  with pytest.raises(InputError, match="encode_latents"):
    latent_clips.LatentClips(str(tmp_path), "train")


def test_encode_latents_refuses_bad_text_inputs(world, tmp_path):
  """A text encoder of another width than --text_dim, a tokenizer of another vocabulary, one
  of --text_encoder/--tokenizer, captions given two ways: one line each, before anything
  is written."""
  from tests.test_prompts import write_encoder  # pylint: disable=g-import-not-at-top
  out = tmp_path / "refused"
  common = dict(data_dir=str(world["dir"] / "data"), dataset="procedural_rooms",
                config_name="default", vae=world["vae"], output_dir=str(out),
                target_frames=TARGET, preceding_frames=PRECEDING, text_len=8, text_dim=32)
  cases = (
      (dict(text_encoder=write_encoder(str(tmp_path / "wide"), dim=64),
            tokenizer=world["tokenizer"]), "text_encoder.dim", "wide"),
      (dict(text_encoder=write_encoder(str(tmp_path / "vocab"), vocab_size=1024),
            tokenizer=world["tokenizer"]), "vocab_size", "vocab"),
      (dict(tokenizer=world["tokenizer"]), "text_encoder", "--text_encoder"),
      (dict(text_encoder=world["encoder"], tokenizer=world["tokenizer"],
            text_embeddings=str(tmp_path / "captions.npz")), "text_embeddings", "--text_emb"),
  )
  for kwargs, field, where in cases:
    with pytest.raises(InputError) as e:
      encode_latents.run(**common, **kwargs)
    assert e.value.field == field and where in str(e.value.where), e.value
    assert "\n" not in str(e.value) and not out.exists()


@pytest.mark.slow
def test_training_rollouts_reach_tensorboard(world, tmp_path):
  """Issue 16: every eval.every steps the run rolls out held-out loops with its trained
  VACE/LoRA over the frozen base (the Wan VAE the base export names) and logs revisit
  PSNR/SSIM and the side-by-side video."""
  from mirage_jax import metrics_log  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import training_rollouts  # pylint: disable=g-import-not-at-top
  c = _config(world, steps=2, log_every=1, tensorboard=True)
  c.checkpoint.update(every=0)
  c.sampler.num_steps = 1
  # 10 frames: chunk 0 (9 frames), then a padded chunk 1 that writes one more latent.
  c.eval.update(every=2, batches=1, rollouts=1, rollout_frames=10,
                rollout_backends=("none", "mirage"))
  assert training_rollouts.check_config(c) == 1  # the Wan family is not refused
  workdir = tmp_path / "run"
  loop_lib.train_and_evaluate(c, str(workdir))
  (name,) = os.listdir(workdir / "tensorboard")
  tags = metrics_log.read_tags(str(workdir / "tensorboard" / name))
  for row in ("none", "mirage"):
    for score in ("psnr_all", "ssim_all"):
      assert tags["scalars"][f"rollout/{row}/{score}"] == [2], tags
    assert tags["videos"][f"rollout/{row}/seed100000"] == [2], tags
  scalars = dict(metrics_log.read_events(str(workdir / "tensorboard" / name))[-1][1])
  assert 0 < scalars["rollout/mirage/ssim_all"] <= 1
  assert np.isfinite(scalars["rollout/none/psnr_all"])
