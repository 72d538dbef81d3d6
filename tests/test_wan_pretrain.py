"""Training the whole Wan DiT (experiments/wan22_pretrain.py): every param trains, from
scratch or on top of an export; a plain Wan DiT (no VACE) trains without the memory; its
export is a whole DiT that generates and that a Mirage fine-tune takes as its base.

Reuses the tiny world of tests/test_wan_train.py (a random converted Wan2.2, procedural
clips encoded to latent clips)."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines import procedural
from experiments import mirage_wan22_5b, wan22_pretrain
from mirage_jax import checkpoint, rollout
from mirage_jax.evaluation import revisit
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import exports as wan_exports
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import step as step_lib
from tests.test_wan_train import (_config as finetune_config, _metrics, changed_params,
                                  check_exact_resume, train_steps, world)  # noqa: F401 (fixture)

pytest.importorskip("torch")  # the world fixture writes the released VAE file with torch


def _pretrain(world, **train_kw):
  """The tiny pretraining config on the world's latent clips: a plain DiT from scratch."""
  c = wan22_pretrain.get_config("denoiser,tiny")
  c.data.data_dir = world["latents"]
  c.train.update(**train_kw)
  return c


def _all_params(cfg) -> set:
  model = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  return set(wan_exports.flat_paths(nnx.state(model, nnx.Param).to_pure_dict()))


def test_config_and_stage_dispatch():
  c = wan22_pretrain.get_config("denoiser,tiny")
  assert c.denoiser.train_stages == ("base",) and not c.denoiser.model.vace
  assert c.denoiser.base_checkpoint == "" and c.denoiser.autoencoder_checkpoint == ""
  big = wan22_pretrain.get_config("denoiser,ti2v_5b,v5e_256")
  assert dict(big.mesh) == mirage_wan22_5b.MESHES["v5e_256"]["mesh"]
  assert big.denoiser.model.dim == 3072 and big.denoiser.model.num_layers == 30
  assert dict(wan22_pretrain.get_config().mesh) == mirage_wan22_5b.MESHES["v5p_128"]["mesh"]
  ae = wan22_pretrain.get_config("autoencoder,tiny")
  assert ae.stage == "autoencoder" and ae.family == "wan" and (ae.data.num_frames - 1) % 4 == 0
  with pytest.raises(ValueError, match="stage"):
    wan22_pretrain.get_config("bogus")
  with pytest.raises(ValueError, match="mesh"):
    wan22_pretrain.get_config("denoiser,ti2v_5b,v9")
  # No VACE: no memory, no camera fields read, no control latents (so no VAE) needed.
  stage = step_lib.make_stage(c, frozen="abstract")
  assert set(stage.frozen) == {"base", "empty_text"} and stage.frozen["base"] == {}
  assert not {"depths", "poses_c2w", "intrinsics", "static_masks"} & set(stage.fields)


@pytest.mark.parametrize("stages", [("base", "vace", "lora"), ("base",)])
def test_full_stage_trains_every_param_and_nothing_else(world, stages, tmp_path):
  """Every trainable param moves within 3 steps (2 for a zero-initialised LoRA B / VACE
  after_proj to pass gradient to the rest), no weight decay so only gradients move them; the
  frozen part (VACE and LoRA, at their random init, when only 'base' trains) is unchanged;
  Adam's moments exist for exactly the trainable params."""
  c = finetune_config(world)
  c.optimizer.weight_decay = 0.0
  # The clips have no captions: a non-zero empty prompt, so that text_in gets a gradient.
  np.save(tmp_path / "empty.npy", np.random.default_rng(0).standard_normal((8, 32)))
  c.denoiser.empty_text = str(tmp_path / "empty.npy")
  c.denoiser.train_stages = stages
  c.denoiser.base_checkpoint = ""  # from scratch
  cfg = c.denoiser.model
  run = train_steps(c, world["latents"], 3)
  assert np.isfinite(float(run["metrics"]["loss"]))
  everything = _all_params(cfg)
  trainable = set(wan_exports.flat_paths(run["setup"].abstract["params"]))
  frozen = set(wan_exports.flat_paths(run["frozen_before"]["base"]))
  is_extra = lambda p: p[0] == "vace" or p[-1] in ("lora_a", "lora_b")
  if stages == ("base",):
    assert trainable == {p for p in everything if not is_extra(p)}
    assert frozen == everything - trainable and frozen
    jax.tree.map(np.testing.assert_array_equal, run["frozen_before"]["base"],
                 run["frozen_after"]["base"])
  else:
    assert trainable == everything and not frozen
  changed = wan_exports.flat_paths(changed_params(run))
  assert set(changed) == trainable
  assert all(changed.values()), sorted(p for p, c in changed.items() if not c)
  n = sum(x.size for x in jax.tree.leaves(run["setup"].abstract["params"]))
  moments = [x for x in jax.tree.leaves(run["setup"].abstract["opt_state"]) if x.ndim]
  assert sum(x.size for x in moments) == 2 * n


def test_exact_resume_after_sigterm(world, tmp_path, monkeypatch):
  check_exact_resume(lambda: _pretrain(world, steps=8, log_every=2), tmp_path, monkeypatch)


def test_from_scratch_loss_falls(world, tmp_path):
  workdir = str(tmp_path / "run")
  loop_lib.train_and_evaluate(_pretrain(world, steps=40, log_every=10), workdir)
  losses = [m["loss"] for m in _metrics(workdir)]
  assert len(losses) == 4 and np.isfinite(losses).all()
  assert np.mean(losses[-2:]) < 0.85 * losses[0], losses
  assert "memory_coverage" not in _metrics(workdir)[0]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.timeout(1500)  # a TPU compile: minutes on a loaded 2-core machine
@pytest.mark.usefixtures("tpu_compiler")
def test_full_stage_compiles_for_v5e_2x2():
  from mirage_jax import aot  # pylint: disable=g-import-not-at-top
  c = wan22_pretrain.get_config("denoiser,tiny")
  c.mesh = dict(data=1, fsdp=2, context=1, tensor=2)
  report = aot.compile_report(c, "v5e:2x2")
  assert report["fits"] and report["devices"] == 4
  cfg = c.denoiser.model
  model = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  assert report["params"] == wan_dit.count_params(model)  # all of them train
  assert report["analytic_tflops_per_device"] > 0 and 0 < report["roofline_mfu"] <= 1


def test_export_chain_pretrain_finetune_generate(world, tmp_path):
  """Pretrain export (every param, no base) -> a VACE + LoRA fine-tune's base -> both
  generate (the plain DiT without memory, the fine-tune with it)."""
  pre = str(tmp_path / "pre")
  loop_lib.train_and_evaluate(_pretrain(world, steps=2, log_every=1), pre)
  pre_export = str(tmp_path / "pre_export")
  checkpoint.export_params(pre, pre_export)
  params, cfg, _ = checkpoint.load_export(pre_export)
  pre_flat = wan_exports.flat_paths(params)
  assert cfg.denoiser.base_checkpoint == ""
  assert set(pre_flat) == _all_params(cfg.denoiser.model)  # a whole DiT, nothing to follow

  ft = str(tmp_path / "ft")
  c = finetune_config(world, steps=2, log_every=1)
  c.denoiser.base_checkpoint = pre_export
  loop_lib.train_and_evaluate(c, ft)
  ft_export = str(tmp_path / "ft_export")
  checkpoint.export_params(ft, ft_export)
  ft_params, _, _ = checkpoint.load_export(ft_export)
  ft_flat = wan_exports.flat_paths(ft_params)
  assert ft_flat and all(p[0] == "vace" or p[-1] in ("lora_a", "lora_b") for p in ft_flat)

  clip = revisit.fit_clip(procedural.render_clip(100001, 13, 64, 64, trajectory="loop"),
                          (64, 64))
  for export, want in ((pre_export, pre_flat), (ft_export, {**pre_flat, **ft_flat})):
    config, vae, dit = rollout.load_world_model(export, world["vae"])
    loaded = wan_exports.flat_paths(nnx.state(dit, nnx.Param).to_pure_dict())
    for p, v in want.items():  # the base is the pretrained one, the fine-tune on top
      np.testing.assert_array_equal(np.asarray(loaded[p]), np.asarray(v), err_msg="/".join(p))
    assert (dit.vace is None) == (export == pre_export)
    config.sampler.num_steps = 1
    r = rollout.make_rollout(config, vae, dit, "mirage", capacity=13 * 16)
    out = r.generate(clip["frames"][0], clip["depths"][0], clip["intrinsics"],
                     clip["poses_c2w"], depths=clip["depths"], progress=False, seed=0)
    assert out["frames"].shape == (13, 64, 64, 3) and np.isfinite(out["frames"]).all()
