"""Training-step knobs: EMA warm-up, weight-decay mask, conditioning dropout and the guidance
guard, gradient accumulation, parameter-sharding errors, precision, training memory
capacity, noise-level schemes."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from experiments import mirage_wan22_5b, tiny_cpu
from mirage_jax import diffusion, rollout, sharding
from mirage_jax.errors import InputError
from mirage_jax.families.small import denoiser as dn
from mirage_jax.families.small import stages as small_stages
from mirage_jax.families.wan import stages as wan_stage
from mirage_jax.nn import layers
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import optimizer as optimizer_lib
from mirage_jax.training import step as step_lib
from mirage_jax.training.stage import StageBase
from tests.test_train import _batch, _mesh_config, random_frozen_autoencoder, tiny_config


def _setup(config, stage, devices=None):
  mesh = mesh_lib.build_mesh(config, devices)
  setup = step_lib.make_setup(config, stage, mesh)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  return mesh, setup, specs


def _params_and_mask(stage):
  _, params = step_lib.split_trainable(stage, nnx.eval_shape(lambda: stage.build(nnx.Rngs(0))))
  specs = nnx.get_partition_spec(params).to_pure_dict()
  abstract = params.to_pure_dict()
  flat = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(t)}
  return flat(abstract), flat(optimizer_lib.decay_mask(abstract, specs))


# ----------------------------------------------------------------------------- 1. EMA warm-up


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warmup_follows_the_params(warmup):
  config = _mesh_config(tiny_config(), fsdp=8)
  config.optimizer.update(ema_decay=0.999, ema_warmup=warmup)
  stage = step_lib.make_stage(config)
  mesh, setup, specs = _setup(config, stage)
  state = step_lib.init_state(config, stage, setup)
  init = jax.device_get(state["params"])
  batch = {k: jax.device_put(v, specs[k].sharding) for k, v in _batch(config).items()
           if k in stage.fields}
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  with setup.context():
    for _ in range(4):
      state, _ = step(state, batch, {})
  params, ema = jax.device_get((state["params"], state["ema"]))
  dist = lambda a, b: float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in
                                        zip(jax.tree.leaves(a), jax.tree.leaves(b)))))
  to_params, to_init = dist(ema, params), dist(ema, init)
  if warmup:  # decays 0.1, 0.18, 0.25, 0.31: the EMA sits near the newest params
    assert to_params < 0.5 * to_init, (to_params, to_init)
  else:  # 0.999 from the init: it has barely moved
    assert to_init < 0.05 * to_params, (to_params, to_init)


# ----------------------------------------------------------------------------- 2. decay mask


def test_decay_mask_small_denoiser_skips_stacked_biases_and_scales():
  config = tiny_config("denoiser")
  config.denoiser.model.memory_conditioning = "control"  # two stacks: blocks and control
  flat, mask = _params_and_mask(small_stages.DenoiserStage(config, random_frozen_autoencoder(config)))
  stacked = [k for k in flat if k.startswith(("['blocks']", "['control']"))]
  assert stacked
  for k in stacked:
    if k.endswith(("['bias']", "['scale']")):
      assert flat[k].ndim == 2 and not mask[k], k  # (layers, d): the old ndim >= 2 decayed it
    elif k.endswith("['kernel']") or k.endswith(("['wq']", "['wo']")):
      assert mask[k], k
  assert mask["['patch_embed']['kernel']"] and not mask["['patch_embed']['bias']"]


def test_decay_mask_wan_decays_kernels_and_lora_not_norms():
  flat, mask = _params_and_mask(wan_stage.WanStage(mirage_wan22_5b.get_config("tiny"), "abstract"))
  decayed = {k for k, v in mask.items() if v}
  assert any("lora_a" in k for k in decayed) and any("kernel" in k for k in decayed)
  for k in flat:
    if any(n in k for n in ("bias", "norm", "scale")):
      assert k not in decayed, k
  # The per-head q/k norm scales are (layers, heads, head_dim): two non-layer axes, by name.
  assert flat["['vace']['blocks']['self_attn']['norm_q']"].ndim == 3


# ----------------------------------------------------------------------------- 3. cond dropout


def _loss_setup():
  """(config, frozen autoencoder, batch, model) for a denoiser loss computed by hand."""
  config = tiny_config("denoiser")
  config.data.batch_size = 2
  frozen = random_frozen_autoencoder(config)
  batch = {k: jnp.asarray(v) for k, v in _batch(config).items()}
  model = dn.Denoiser(config.denoiser.model, nnx.Rngs(3))
  # A non-zero output head, so the network's output depends on its conditioning.
  model.final.kernel[...] = jax.random.normal(jax.random.key(1), model.final.kernel.shape)
  return config, frozen, batch, model


def _loss_by_hand(stage, model, frozen, batch, rng, **cond_overrides):
  """``stage.loss`` recomputed with the same times and noise and some conditioning replaced
  (``memory``, ``coverage``, ``context``)."""
  d = stage.config.denoiser
  latents = stage._encode(frozen, batch["frames"], batch["depths"])
  cond = stage._condition(latents, batch)
  x0 = latents[:, d.memory_frames:]
  t_rng, n_rng = jax.random.split(rng)
  t = diffusion.sample_time(t_rng, x0.shape[:2], d.time_shift)
  noise = jax.random.normal(n_rng, x0.shape)
  c = dict(cond, **cond_overrides)
  _, x0_pred = dn.predict(model, d.prediction, diffusion.add_noise(x0, noise, t), t, c["rays"],
                          c["memory"], c["coverage"], c["context"], c["context_rays"])
  return float(jnp.mean(jnp.square(x0_pred - x0)))


def test_cond_dropout_trains_the_unconditional_branch():
  """With dropout 1 the model sees no memory: its loss is that of zeroed memory inputs."""
  config, frozen, batch, model = _loss_setup()
  losses = {}
  for p in (0.0, 0.999999):
    config.denoiser.cond_dropout = p
    stage = small_stages.DenoiserStage(config, frozen)
    losses[p] = float(stage.loss(model, frozen, batch, jax.random.key(0))[0])
  cond = stage._condition(stage._encode(frozen, batch["frames"], batch["depths"]), batch)
  assert float(cond["coverage"].mean()) > 0
  # Recompute the dropped loss by hand: memory and coverage zero, same times and noise.
  want = _loss_by_hand(stage, model, frozen, batch, jax.random.key(0),
                       memory=jnp.zeros_like(cond["memory"]),
                       coverage=jnp.zeros_like(cond["coverage"]))
  np.testing.assert_allclose(losses[0.999999], want, rtol=1e-5)
  assert abs(losses[0.999999] - losses[0.0]) > 1e-3 * losses[0.0]


def test_noise_context_levels_stay_within_the_bound():
  """Each example's context is (1 - s) x + s noise with one s per example, s in [0, max)."""
  ctx = jnp.ones((256, 2, 16, 16, 4))
  out = diffusion.noise_context(jax.random.key(0), ctx, 0.3)
  # Per example, the signal part is 1 - s: recover s from the mean of the noised frames.
  level = 1.0 - np.asarray(out.mean(axis=(1, 2, 3, 4)))
  assert level.min() > -0.03 and level.max() < 0.33  # estimates: +- 0.01
  assert np.ptp(level) > 0.2  # levels spread over the range, not one shared level
  np.testing.assert_array_equal(diffusion.noise_context(jax.random.key(0), ctx, 0.0), ctx)


def test_context_noise_changes_only_the_context_the_model_sees():
  """context_noise > 0: the loss is the clean one recomputed with the noised context."""
  config, frozen, batch, model = _loss_setup()
  rng = jax.random.key(0)
  losses = {}
  for level in (0.0, 0.5):
    config.denoiser.context_noise = level
    stage = small_stages.DenoiserStage(config, frozen)
    losses[level] = float(stage.loss(model, frozen, batch, rng)[0])
  cond = stage._condition(stage._encode(frozen, batch["frames"], batch["depths"]), batch)
  context = diffusion.noise_context(jax.random.fold_in(rng, 3), cond["context"], 0.5)
  assert float(jnp.abs(context - cond["context"]).mean()) > 1e-2
  want = _loss_by_hand(stage, model, frozen, batch, rng, context=context)
  np.testing.assert_allclose(losses[0.5], want, rtol=1e-5)
  assert abs(losses[0.5] - losses[0.0]) > 1e-4 * losses[0.0]
  config.denoiser.context_noise = 1.0
  with pytest.raises(InputError, match="context_noise"):
    small_stages.DenoiserStage(config, frozen)


def test_guidance_refused_without_cond_dropout():
  config = tiny_cpu.get_config("denoiser")
  config.sampler.guidance_scale = 2.0
  with pytest.raises(InputError, match=r"config.sampler.guidance_scale.*cond_dropout = 0"):
    rollout.check_guidance(config)
  config.denoiser.cond_dropout = 0.1
  rollout.check_guidance(config)  # trained with dropout: allowed
  config.sampler.guidance_scale = 0.0
  config.denoiser.cond_dropout = 0.0
  rollout.check_guidance(config)  # no guidance: nothing to refuse
  # An export from before the field existed was trained without dropout.
  old = ml_collections.ConfigDict(config.to_dict())
  del old.denoiser["cond_dropout"]
  old.sampler.guidance_scale = 1.5
  with pytest.raises(InputError, match="guidance_scale"):
    rollout.make_rollout(old, None, None)


def test_guidance_flag_refused_for_a_wan_finetune_without_caption_dropout():
  config = mirage_wan22_5b.get_config("tiny")
  rollout.check_guidance(config, 3.0)  # caption_dropout 0.1
  config.denoiser.caption_dropout = 0.0
  with pytest.raises(InputError, match=r"^--guidance_scale: .*caption_dropout = 0"):
    rollout.check_guidance(config, 3.0)
  rollout.check_guidance(config, 0.0)


# ----------------------------------------------------------------------------- 4. accumulation


class _LinearStage(StageBase):
  """y = x W + b regressed onto targets: a loss with no randomness, so microbatched and
  full-batch gradients must agree to float32 round-off."""

  fields = ("x", "y")
  frozen: dict = {}

  def build(self, rngs):
    return layers.Dense(6, 3, ("embed", "mlp"), rngs=rngs)

  def loss(self, model, frozen, batch, rng):
    del frozen, rng
    err = jnp.square(model(batch["x"]) - batch["y"])
    return jnp.mean(err), {"max_err": jnp.max(err)}

  def batch_shapes(self):
    return {"x": ((16, 6), jnp.float32), "y": ((16, 3), jnp.float32)}

  def step_flops(self, batch_size):
    return 0.0


def test_microbatches_match_the_full_batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3)) + 1.0).astype(np.float32)
  results = {}
  for m in (1, 4):
    config = _mesh_config(tiny_config(), data=2, fsdp=2)
    config.data.batch_size = 16
    config.train.microbatches = m
    config.optimizer.update(grad_clip_norm=0.0, warmup_steps=0)
    stage = _LinearStage()
    mesh, setup, specs = _setup(config, stage, jax.devices()[:4])
    state = step_lib.init_state(config, stage, setup)
    batch = {"x": jax.device_put(x, specs["x"].sharding),
             "y": jax.device_put(y, specs["y"].sharding)}
    step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
    with setup.context():
      state, metrics = step(state, batch, {})
    results[m] = jax.device_get((metrics, state["params"]))
  (m1, p1), (m4, p4) = results[1], results[4]
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert m4["max_err"] < m1["max_err"]  # aux metrics are averaged over microbatches
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p4, p1)


def test_microbatches_must_divide_the_per_device_batch():
  config = _mesh_config(tiny_config(), fsdp=8)
  config.train.microbatches = 3
  stage = step_lib.make_stage(config)
  mesh, setup, specs = _setup(config, stage)
  with pytest.raises(InputError, match="microbatches"):
    step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})


# ----------------------------------------------------------------------------- 5. sharding


def test_param_axis_that_does_not_divide_is_an_error():
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "context": 1, "tensor": 1})
  rules = sharding.DEFAULT_LOGICAL_RULES
  with pytest.raises(InputError, match=r"\['blk'\]\['w'\].*dimension 0 \(size 12, logical "
                     r"'embed'\).*mesh axis 'fsdp' \(8 devices\)"):
    sharding.param_spec("['blk']['w']", ("embed", "mlp"), (12, 16), mesh, rules)
  # Smaller than the axis: cannot be split at all, so it stays whole (4 RGB-D channels).
  assert sharding.param_spec("k", (None, None, "conv_in", "conv_out"), (3, 3, 4, 16), mesh,
                             rules) == PartitionSpec(None, None, None, "tensor")
  assert sharding.param_spec("k", ("embed", "mlp"), (16, 12), mesh, rules) == PartitionSpec(
      "fsdp", "tensor")


def test_training_setup_refuses_a_mesh_that_does_not_divide_a_weight():
  config = _mesh_config(tiny_config("denoiser"), fsdp=8)
  config.denoiser.model.update(embed_dim=36, num_heads=2)  # 36 over 8 fsdp devices
  stage = small_stages.DenoiserStage(config, {})  # the setup does not look at the frozen part
  with pytest.raises(InputError, match=r"config.logical_rules: field '.*': dimension \d "
                     r"\(size 36, logical 'embed'\)"):
    step_lib.make_setup(config, stage, mesh_lib.build_mesh(config))


def test_sharding_table_lists_every_param():
  config = _mesh_config(tiny_config("denoiser"), fsdp=4, tensor=2)
  stage = small_stages.DenoiserStage(config, {})
  setup = step_lib.make_setup(config, stage, mesh_lib.build_mesh(config))
  table = sharding.sharding_table(setup.abstract["params"], setup.shardings["params"])
  lines = table.splitlines()
  assert lines[0].split() == ["path", "shape", "dtype", "spec"]
  assert len(lines) == 1 + len(jax.tree.leaves(setup.abstract["params"]))
  row = next(l for l in lines if l.startswith("['blocks']['fc1']['kernel']"))
  assert "(2, 32, 128)" in row and "P(None, 'fsdp', 'tensor')" in row


# ----------------------------------------------------------------------------- 6. precision


def test_f32_residual_keeps_the_stream_in_f32_and_tracks_f32():
  cfg = tiny_config("denoiser").denoiser.model
  cfg.update(latent_channels=4, max_frames=8, max_patch_rows=8, max_patch_cols=8)
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  args = (n(2, 2, 4, 4, 4), jnp.full((2, 2), 0.5), n(2, 2, 4, 4, 6), n(2, 2, 4, 4, 4),
          jnp.ones((2, 2, 4, 4)), n(2, 1, 4, 4, 4), n(2, 1, 4, 4, 6))
  outs, residual_dtypes = {}, {}
  params = None
  for p in ("f32", "f32_residual", "bf16"):
    cfg.precision = p
    model = dn.Denoiser(cfg, nnx.Rngs(0))
    if params is None:  # same weights for all three; a non-zero head
      model.final.kernel[...] = jax.random.normal(jax.random.key(1), model.final.kernel.shape)
      params = nnx.state(model, nnx.Param)
    nnx.update(model, params)
    residual_dtypes[p] = model.residual_dtype
    outs[p] = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *args))
  assert residual_dtypes == {"f32": jnp.float32, "f32_residual": jnp.float32,
                             "bf16": jnp.bfloat16}
  err = lambda p: np.linalg.norm(outs[p] - outs["f32"]) / np.linalg.norm(outs["f32"])
  assert 0 < err("f32_residual") < 0.05 and 0 < err("bf16") < 0.05
  assert err("f32_residual") <= err("bf16")


# ----------------------------------------------------------------------------- 7. capacity


def test_training_memory_is_sized_to_the_window_and_reads_the_same():
  config = tiny_config("denoiser")
  config.data.batch_size = 2
  config.memory.settings.capacity = 8192
  frozen = random_frozen_autoencoder(config)
  stage = small_stages.DenoiserStage(config, frozen)
  h, w = stage.latent_hw
  assert stage.memory_cfg.capacity == config.denoiser.memory_frames * h * w < 8192
  config.memory.train_capacity = 8192  # set: as large as the rollout's
  big = small_stages.DenoiserStage(config, frozen)
  assert big.memory_cfg.capacity == 8192
  config.memory.train_capacity = 10 ** 6  # never more than the rollout holds
  assert small_stages.DenoiserStage(config, frozen).memory_cfg.capacity == 8192
  batch = {k: jnp.asarray(v) for k, v in _batch(config).items()}
  latents = jax.jit(stage._encode)(frozen, batch["frames"], batch["depths"])
  a, b = jax.jit(stage._condition)(latents, batch), jax.jit(big._condition)(latents, batch)
  assert float(a["coverage"].mean()) > 0.05
  for k in ("memory", "coverage"):  # the window's points fit: the same read, exactly
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_wan_training_memory_holds_its_source_frames():
  config = mirage_wan22_5b.get_config("tiny")
  config.memory.settings.capacity = 131072
  stage = wan_stage.WanStage(config, "abstract")
  h, w = stage.latent_hw
  assert stage.memory_cfg.capacity == len(stage._memory_sources()) * h * w


# ----------------------------------------------------------------------------- 8. noise levels


def test_noise_level_schemes():
  key = jax.random.key(0)
  per_frame = diffusion.sample_levels(key, 256, 4, 1.0, "per_frame")
  np.testing.assert_array_equal(per_frame, diffusion.sample_time(key, (256, 4), 1.0))
  assert float(jnp.std(per_frame, axis=1).min()) > 0
  per_example = diffusion.sample_levels(key, 256, 4, 3.0, "per_example")
  assert float(jnp.abs(per_example - per_example[:, :1]).max()) == 0
  assert 0 < float(per_example.min()) and float(per_example.max()) < 1
  mixed = diffusion.sample_levels(key, 4000, 4, 1.0, "mixed", 0.25)
  together = float(jnp.mean(jnp.all(mixed == mixed[:, :1], axis=1)))
  assert abs(together - 0.25) < 0.03
  with pytest.raises(ValueError, match="noise-level"):
    diffusion.sample_levels(key, 2, 2, 1.0, "per_chunk")


def test_bad_noise_levels_config_is_named():
  config = tiny_config("denoiser")
  config.train.noise_levels = "per_chunk"
  with pytest.raises(InputError, match=r"config.train: field 'noise_levels'"):
    small_stages.DenoiserStage(config, random_frozen_autoencoder(config))
