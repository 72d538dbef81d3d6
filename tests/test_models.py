"""Autoencoder and denoiser: shapes, init, conditioning, scan/remat, bf16, sharding, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mirage_jax import sharding
from mirage_jax.families.small import autoencoder as ae
from mirage_jax.families.small import denoiser as dn


# ----------------------------------------------------------------------------- autoencoder


def _ae_cfg():
  cfg = ae.autoencoder_config("tiny")
  cfg.base_channels = 16
  cfg.latent_channels = 4
  return cfg


def _init(make):
  """(graphdef, params) of ``make()``, initialised in one jitted call (fast on CPU)."""
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def _ae_batch(b=2, h=16, w=16):
  rng = np.random.default_rng(1)
  # Smooth images (4x4 blocks) so a tiny VAE can fit them quickly.
  up = lambda a: np.repeat(np.repeat(a, h // 4, axis=1), w // 4, axis=2)
  frames = np.tanh(up(rng.normal(size=(b, 4, 4, 3)))).astype(np.float32)
  depth = np.exp(up(rng.normal(size=(b, 4, 4)))).astype(np.float32)
  return {"frames": frames, "depths": depth, "dynamic_masks": np.zeros((b, h, w), np.uint8)}


def test_autoencoder_shapes_and_positive_depth():
  cfg = _ae_cfg()
  graphdef, params = _init(lambda: ae.Autoencoder(cfg, nnx.Rngs(0)))
  batch = _ae_batch()

  @jax.jit
  def round_trip(params, batch):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode(batch["frames"], batch["depths"])
    return (mean, logvar) + model.decode(mean)

  mean, logvar, rgb, depth = round_trip(params, batch)
  f = ae.downsample_factor(cfg)
  assert f == 4
  assert mean.shape == logvar.shape == (2, 16 // f, 16 // f, cfg.latent_channels)
  assert rgb.shape == (2, 16, 16, 3) and depth.shape == (2, 16, 16)
  assert jnp.all(depth > 0) and jnp.all(jnp.abs(rgb) <= 1)

  # Depth holes supervise nothing; all-observed batches give the plain means bit for bit.
  @jax.jit
  def loss_and_forward(params, batch):
    model = nnx.merge(graphdef, params)
    _, metrics = ae.loss(model, batch, jax.random.key(0))
    return metrics, model(batch["frames"], batch["depths"], jax.random.key(0))[1]

  plain, depth_n = loss_and_forward(params, batch)
  observed = np.ones((2, 16, 16), np.uint8)
  assert loss_and_forward(params, dict(batch, depth_valid=observed))[0]["depth"] == plain["depth"]
  observed[:, :8] = 0
  holes, _ = loss_and_forward(params, dict(batch, depth_valid=observed))
  err = np.abs(np.asarray(depth_n) - np.asarray(ae.normalize_depth(batch["depths"], cfg)))
  np.testing.assert_allclose(holes["depth"], err[:, 8:].mean(), rtol=1e-5)


def test_depth_normalisation_round_trip():
  cfg = _ae_cfg()
  d = jnp.array([0.2, 1.0, 3.0, 7.0])
  np.testing.assert_allclose(ae.denormalize_depth(ae.normalize_depth(d, cfg), cfg), d, rtol=1e-5)
  assert float(ae.normalize_depth(jnp.array(1e6), cfg)) == 1.0


def test_kl_closed_form():
  zero = jnp.zeros((2, 3))
  assert float(ae.kl_divergence(zero, zero)) == 0.0
  # KL(N(1, e) || N(0, 1)) = 0.5 (1 + e - 1 - 1) per dim.
  kl = ae.kl_divergence(jnp.ones((1, 3)), jnp.ones((1, 3)))
  np.testing.assert_allclose(kl, 3 * 0.5 * (np.e - 1.0), rtol=1e-6)


def test_autoencoder_overfits_one_batch():
  cfg = _ae_cfg()
  graphdef, params = _init(lambda: ae.Autoencoder(cfg, nnx.Rngs(0)))
  batch = _ae_batch()
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    def f(p):
      return ae.loss(nnx.merge(graphdef, p), batch, rng)
    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  history = []
  for i in range(50):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
    history.append(metrics)
  first, last = history[0], history[-1]
  assert float(last["loss"]) < 0.4 * float(first["loss"]), (first, last)
  assert float(last["depth"]) < 0.5 * float(first["depth"])
  assert np.isfinite(float(last["kl"])) and float(last["kl"]) > 0


def _object_batch(seed, b=8, h=16, w=16):
  """Textured backgrounds with a red square (the "moving object", id 1) at a random place
  in half the frames; a green square of the same size stays static in every frame."""
  rng = np.random.default_rng(seed)
  frames = rng.uniform(-0.6, 0.2, (b, h, w, 3)).astype(np.float32)
  masks = np.zeros((b, h, w), np.uint8)
  for i in range(b):
    y, x = rng.integers(0, h - 4, 2)
    frames[i, y:y + 4, x:x + 4] = (-1.0, 0.9, -1.0)
    if i % 2:
      y, x = rng.integers(0, h - 4, 2)
      frames[i, y:y + 4, x:x + 4] = (0.9, -1.0, -1.0)
      masks[i, y:y + 4, x:x + 4] = 1
  return {"frames": frames, "depths": np.full((b, h, w), 2.0, np.float32), "dynamic_masks": masks}


def test_dynamic_target_marks_a_cell_if_any_pixel_moves():
  masks = np.zeros((1, 4, 4), np.uint8)
  masks[0, 0, 1] = 3
  target = np.asarray(ae.dynamic_target(jnp.asarray(masks), 2))
  np.testing.assert_array_equal(target, [[[True, False], [False, False]]])


def test_dynamic_head_learns_to_segment_and_leaves_the_encoder_alone():
  cfg = _ae_cfg()
  cfg.channel_mults = (1, 2)  # 8x8 latents: cells of 2x2 pixels
  graphdef, params = _init(lambda: ae.Autoencoder(cfg, nnx.Rngs(0)))
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  def dyn_loss(p, batch):
    model = nnx.merge(graphdef, p)
    mean, _ = model.encode(batch["frames"], batch["depths"])
    return ae.dynamic_loss(model, mean, batch["dynamic_masks"])

  grads = jax.grad(lambda p: dyn_loss(p, _object_batch(0))[0])(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["enc_out"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["dynamic"]))

  @jax.jit
  def step(params, opt_state, batch, rng):
    f = lambda p: ae.loss(nnx.merge(graphdef, p), batch, rng)
    (_, metrics), g = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  for i in range(250):
    params, opt_state, _ = step(params, opt_state, _object_batch(i % 50), jax.random.key(i))
  _, held_out = jax.jit(dyn_loss)(params, _object_batch(1000))
  # Red squares at new places are found; the static green squares are not marked.
  assert float(held_out["dynamic_iou"]) > 0.6, held_out


# ----------------------------------------------------------------------------- denoiser


def _dn_cfg(**kw):
  cfg = dn.denoiser_config("tiny")
  cfg.latent_channels = 4
  cfg.embed_dim = 32
  cfg.num_layers = 2
  cfg.num_heads = 2
  cfg.cond_dim = 16
  cfg.control_layers = 1
  cfg.max_frames = 8
  cfg.max_patch_rows = cfg.max_patch_cols = 8
  cfg.time_freq_dim = 32
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _dn_inputs(cfg, b=2, t=2, nc=1, h=4, w=4, seed=0):
  rng = np.random.default_rng(seed)
  c = cfg.latent_channels
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return dict(
      x=normal(b, t, h, w, c),
      t=rng.uniform(size=(b, t)).astype(np.float32),
      rays=normal(b, t, h, w, 6),
      memory=normal(b, t, h, w, c),
      coverage=(rng.uniform(size=(b, t, h, w)) > 0.5).astype(np.float32),
      context=normal(b, nc, h, w, c),
      context_rays=normal(b, nc, h, w, 6),
      cond=normal(b, 3, cfg.cond_dim))


def _apply(graphdef, params, inputs):
  return nnx.merge(graphdef, params)(**inputs)


def _live_params(cfg, seed=0):
  """Init params plus small noise, so zero-initialised layers are live (no training needed)."""
  graphdef, params = _init(lambda: dn.Denoiser(cfg, nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.map(
      lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)


def _train(cfg, steps=3):
  """A few Adam steps regressing a random target, so zero-init layers become live."""
  graphdef, params = _init(lambda: dn.Denoiser(cfg, nnx.Rngs(0)))
  inputs = _dn_inputs(cfg)
  target = np.random.default_rng(9).normal(size=inputs["x"].shape).astype(np.float32)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      out = _apply(graphdef, p, inputs)
      return jnp.mean(jnp.square(out - target)), out
    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, out

  outputs = []
  for _ in range(steps):
    params, opt_state, out = step(params, opt_state)
    outputs.append(out)
  return graphdef, params, inputs, outputs


@pytest.fixture(scope="module", params=["concat", "control"])
def trained(request):
  cfg = _dn_cfg(memory_conditioning=request.param)
  return (cfg,) + _train(cfg)


def test_denoiser_shape_and_zero_output_at_init(trained):
  cfg, _, _, inputs, outputs = trained
  out = outputs[0]  # output of the step-0 forward pass, at init
  assert out.shape == inputs["x"].shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) == 0.0
  assert float(jnp.abs(outputs[-1]).max()) > 0.0


def test_context_memory_time_and_cond_all_reach_the_output(trained):
  cfg, graphdef, params, inputs, _ = trained
  f = jax.jit(lambda inp: _apply(graphdef, params, inp))
  base = f(inputs)
  assert float(jnp.abs(base).max()) > 0

  def changed(**kw):
    return float(jnp.abs(f({**inputs, **kw}) - base).max())

  # Context frames reach target tokens only through attention.
  assert changed(context=inputs["context"] + 1.0) > 1e-4
  assert changed(context_rays=-inputs["context_rays"]) > 1e-4
  assert changed(memory=jnp.zeros_like(inputs["memory"]),
                 coverage=jnp.zeros_like(inputs["coverage"])) > 1e-4
  assert changed(cond=jnp.zeros_like(inputs["cond"])) > 1e-4
  # Per-frame times: changing frame 1's time changes frame 1's output.
  t2 = inputs["t"].copy()
  t2[:, 1] = 1.0 - t2[:, 1]
  out = f({**inputs, "t": t2})
  assert float(jnp.abs(out[:, 1] - base[:, 1]).max()) > 1e-4
  # Examples are independent.
  x2 = inputs["x"].copy()
  x2[1] += 1.0
  out = f({**inputs, "x": x2})
  np.testing.assert_allclose(out[0], base[0], atol=1e-6)


def test_scan_loop_and_remat_agree():
  cfg = _dn_cfg(memory_conditioning="concat")
  _, params = _live_params(cfg)
  inputs = _dn_inputs(cfg)
  target = jnp.ones_like(inputs["x"])

  def value_and_grad(**over):
    c = _dn_cfg(memory_conditioning="concat", **over)
    gd, _ = nnx.split(nnx.eval_shape(lambda: dn.Denoiser(c, nnx.Rngs(0))))
    f = lambda p: jnp.mean(jnp.square(_apply(gd, p, inputs) - target))
    return jax.jit(jax.value_and_grad(f))(params)

  ref_loss, ref_grad = value_and_grad(scan_layers=True, remat="none")
  for over in (dict(scan_layers=False, remat="none"), dict(scan_layers=True, remat="full"),
               dict(scan_layers=True, remat="dots_saveable")):
    loss, grad = value_and_grad(**over)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grad, ref_grad)


def test_bf16_compute_runs_and_tracks_f32():
  graphdef, params = _live_params(_dn_cfg())
  inputs = _dn_inputs(_dn_cfg())
  gd16, _ = nnx.split(nnx.eval_shape(lambda: dn.Denoiser(_dn_cfg(precision="bf16"),
                                                         nnx.Rngs(0))))
  out32 = jax.jit(lambda p: _apply(graphdef, p, inputs))(params)
  out16 = jax.jit(lambda p: _apply(gd16, p, inputs))(params)
  assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel


def test_params_carry_logical_axes_and_shard_on_a_mesh():
  cfg = _dn_cfg(memory_conditioning="control")
  graphdef, params = _init(lambda: dn.Denoiser(cfg, nnx.Rngs(0)))
  specs = nnx.get_partition_spec(params)
  assert tuple(specs["blocks"]["fc1"]["kernel"].get_value()) == ("layers", "embed", "mlp")
  assert tuple(specs["blocks"]["attn"]["wq"].get_value()) == ("layers", "embed", "heads",
                                                              "head_dim")
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  shardings = sharding.logical_to_sharding(specs, mesh, shapes=params)
  fc1 = shardings["blocks"]["fc1"]["kernel"].get_value()
  assert fc1.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert not fc1.is_fully_replicated
  params_sharded = jax.device_put(params, shardings)
  inputs = _dn_inputs(cfg, b=4)
  f = jax.jit(lambda p, i: _apply(graphdef, p, i))
  ref = f(params, inputs)
  with jax.set_mesh(mesh):
    out = f(params_sharded, inputs)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_make_mesh_and_rules():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "context": 1, "tensor": 2}
  spec = sharding.logical_to_spec(("batch", "embed"), rules=(("batch", ("data", "fsdp")),
                                                            ("embed", "fsdp")))
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)  # fsdp used once
  with pytest.raises(Exception, match="needs 16 devices"):
    sharding.make_mesh({"fsdp": 8, "tensor": 2})
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, ("batch", None)) is x  # no mesh: no-op


@pytest.mark.parametrize("mode", ["concat", "control"])
def test_flop_count_matches_xla(mode):
  cfg = _dn_cfg(memory_conditioning=mode, embed_dim=64, num_heads=4, scan_layers=False)
  graphdef, params = _init(lambda: dn.Denoiser(cfg, nnx.Rngs(0)))
  inputs = _dn_inputs(cfg, b=2, t=2, nc=2, h=8, w=8)
  compiled = jax.jit(lambda p, i: _apply(graphdef, p, i)).lower(params, inputs).compile()
  cost = compiled.cost_analysis()
  xla = cost["flops"] if isinstance(cost, dict) else cost[0]["flops"]
  ours = dn.denoiser_flops(cfg, batch=2, target_frames=2, context_frames=2, latent_height=8,
                           latent_width=8, cond_len=3)
  assert abs(ours - xla) / xla < 0.10, (ours, xla)
