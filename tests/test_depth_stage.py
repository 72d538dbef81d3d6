"""The depth training stage (mirage_jax.depth.stage): SiLog, abs-rel, training, export."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import depth_tiny_cpu
from mirage_jax import checkpoint as ckpt_lib
from mirage_jax import families
from mirage_jax.depth import depth_anything
from mirage_jax.depth import stage as depth_stage
from mirage_jax.errors import InputError
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.fixtures_util import synthetic_clip

SIZE = 16  # frames of 16x16, the network's input 28x28 (2x2 patches of 14)


def _positive(shape, seed, low=0.5, high=5.0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=low, maxval=high)


# ----------------------------------------------------------------------------- the loss


def test_silog_scale_behaviour():
  """With g = log d* - log d: loss^2 = var(g) + (1 - lambda) mean(g)^2. Scaling the
  prediction by c shifts g by -log c: lambda = 1 is blind to it; lambda = 0.5 (the
  released) changes exactly the mean term, is smallest at log c = mean(g) where only var(g)
  is left, and charges a prediction of the right shape at the wrong scale."""
  target = _positive((2, 8, 8), 0)
  pred = _positive((2, 8, 8), 1)
  valid = jnp.ones(target.shape, bool)
  g = jnp.log(target) - jnp.log(pred)
  m, var = float(g.mean()), float(g.var())
  for c in (0.25, 0.5, 3.0):
    assert float(depth_stage.silog_loss(pred * c, target, valid, 1.0)) == pytest.approx(
        float(depth_stage.silog_loss(pred, target, valid, 1.0)), rel=1e-5)
    l2 = lambda lam, s=c: float(depth_stage.silog_loss(pred * s, target, valid, lam)) ** 2
    assert l2(0.5) - l2(0.5, 1.0) == pytest.approx(
        0.5 * ((m - math.log(c)) ** 2 - m ** 2), rel=1e-4, abs=1e-6)
    assert l2(0.5) > l2(0.5, math.exp(m))
  assert float(depth_stage.silog_loss(pred * math.exp(m), target, valid, 0.5)) ** 2 == (
      pytest.approx(var, rel=1e-4))
  # The right shape at twice the scale: sqrt(1 - lambda) |log 2| > 0 (metres are learnt);
  # the right depth: 0 (up to the sqrt floor).
  assert float(depth_stage.silog_loss(target * 2, target, valid, 0.5)) == pytest.approx(
      math.sqrt(0.5) * math.log(2), rel=1e-5)
  assert float(depth_stage.silog_loss(target, target, valid, 0.5)) < 1e-5
  assert float(depth_stage.silog_loss(target * 2, target, valid, 1.0)) < 1e-5


def test_silog_ignores_invalid_pixels_and_keeps_finite_gradients():
  target = _positive((1, 8, 8), 2)
  pred = _positive((1, 8, 8), 3)
  valid = jnp.arange(64).reshape(1, 8, 8) % 3 != 0
  base = depth_stage.silog_loss(pred, target, valid)
  # Garbage where the target is invalid (a zero prediction, a zero target): no effect.
  bad_pred = jnp.where(valid, pred, 0.0)
  bad_target = jnp.where(valid, target, 0.0)
  assert float(depth_stage.silog_loss(bad_pred, bad_target, valid)) == pytest.approx(
      float(base), rel=1e-6)
  grad = jax.grad(lambda p: depth_stage.silog_loss(p, bad_target, valid))(bad_pred)
  assert bool(jnp.all(jnp.isfinite(grad)))
  assert bool(jnp.all(grad[~valid] == 0)) and bool(jnp.any(grad[valid] != 0))
  # Only the valid pixels' values count: the loss of the valid ones alone.
  sel = np.asarray(valid)
  alone = depth_stage.silog_loss(pred[sel], target[sel], jnp.ones(sel.sum(), bool))
  assert float(alone) == pytest.approx(float(base), rel=1e-5)


def test_abs_rel_raw_and_median_aligned():
  target = _positive((3, 8, 8), 4)
  valid = jnp.ones(target.shape, bool).at[0, :2].set(False)
  scale = jnp.array([2.0, 0.5, 1.0])[:, None, None]
  raw, aligned = depth_stage.abs_rel(target * scale, target, valid)
  n = float(valid.sum())
  counts = valid.sum((1, 2))
  assert float(raw) / n == pytest.approx(float((counts * jnp.array([1.0, 0.5, 0.0])).sum()) / n,
                                         rel=1e-5)
  assert float(aligned) / n < 1e-6  # a per-image scale is all it was off by


# ----------------------------------------------------------------------------- configs


def tiny_config():
  c = depth_tiny_cpu.get_config()
  c.data.update(resolution=(SIZE, SIZE), batch_size=8, read_threads=0, read_buffer_size=1)
  # Only interface fields: the tiny variant's sizes are the port's own.
  c.depth_model.input_size = 28
  c.optimizer.update(learning_rate=3e-3, warmup_steps=2)
  c.train.update(steps=3, log_every=1, peak_tflops_per_device=1.0)
  c.checkpoint.update(every=3, keep=1, async_save=False)
  c.eval.update(every=3, batches=1)
  return c


@pytest.mark.parametrize("data", depth_tiny_cpu.DATA)
def test_experiment_configs_make_the_depth_stage(data):
  c = depth_tiny_cpu.get_config(data)
  stage = families.make_stage(c)
  assert isinstance(stage, depth_stage.DepthStage) and stage.cfg.kind == "metric"
  assert isinstance(step_lib.make_stage(c), depth_stage.DepthStage)
  assert stage.fields == ("frames", "depths")
  assert stage.step_flops(c.data.batch_size) > 0


@pytest.mark.parametrize("field,value,bad", [
    ("variant", "huge", "variant"), ("kind", "relative", "kind"), ("max_depth", -1.0, "max_depth")])
def test_bad_depth_config_is_refused_in_one_line(field, value, bad):
  c = tiny_config()
  c.depth_model[field] = value
  with pytest.raises(InputError) as e:
    step_lib.make_stage(c)
  assert e.value.where == "config.depth_model" and e.value.field == bad
  assert "\n" not in str(e.value)


def test_bad_silog_lambda_is_refused():
  c = tiny_config()
  c.depth_train.silog_lambda = 1.5
  with pytest.raises(InputError, match="silog_lambda"):
    families.make_stage(c)


# ----------------------------------------------------------------------------- training


def _learnable_batch(seed: int = 0) -> dict:
  """Frames (8, 1, 16, 16, 3) uint8 whose depth is a function of brightness (0.7 .. 4.7 m)."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(0, 1, (8, 1, 4, 4, 1))
  bright = np.repeat(np.repeat(base, 4, 2), 4, 3)  # 4x4 blocks: survive the resizes
  frames = (np.broadcast_to(bright, bright.shape[:-1] + (3,)) * 255).astype(np.uint8)
  depths = (0.7 + 4.0 * frames[..., 0] / 255.0).astype(np.float32)
  return {"frames": frames, "depths": depths}


def test_a_few_steps_decrease_the_loss_on_a_fixed_batch():
  c = tiny_config()
  c.train.steps = 25  # the learning-rate schedule's length
  stage = step_lib.make_stage(c)
  mesh = mesh_lib.build_mesh(c, jax.devices()[:1])
  setup = step_lib.make_setup(c, stage, mesh)
  state = step_lib.init_state(c, stage, setup)
  specs = inputs_lib.abstract_batch(c, stage, mesh, setup.rules)
  step = step_lib.make_train_step(c, stage, setup, {k: v.sharding for k, v in specs.items()})
  batch = {k: jax.device_put(v, specs[k].sharding) for k, v in _learnable_batch().items()}
  losses = []
  with setup.context():
    for _ in range(25):
      state, metrics = step(state, batch, {})
      losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and not any(
      float(metrics[k]) != float(metrics[k]) for k in ("abs_rel", "abs_rel_median"))
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_export_round_trips_through_load_export(tmp_path):
  c = tiny_config()
  clips = [synthetic_clip(i, num_frames=4, height=SIZE, width=SIZE) for i in range(10)]
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  last = loop_lib.train_and_evaluate(c, workdir, {"train": clips, "validation": clips[:2]})
  assert np.isfinite(last["loss"]) and "abs_rel" in last
  assert ckpt_lib.export_params(workdir, out) == 3
  model, cfg = depth_anything.load_export(out)
  assert cfg.kind == "metric" and cfg.input_size == 28
  assert cfg.hidden_size == c.depth_model.hidden_size and cfg.max_depth == c.depth_model.max_depth
  # The loaded model is the run's EMA params: the same depths as the checkpoint's EMA.
  stage = step_lib.make_stage(c)
  setup = step_lib.make_setup(c, stage, mesh_lib.build_mesh(c, jax.devices()[:1]))
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", every=3, keep=1,
                                       async_save=False)
  state, _ = checkpointer.restore(setup.abstract)
  checkpointer.close()
  ema_model = stage.merge(setup.graphdef, jax.device_get(state["ema"]), None)
  images = jnp.asarray(np.stack([x["frames"][0] for x in clips[:3]]), jnp.float32) / 127.5 - 1
  depth = depth_anything.estimate(model, images)
  assert depth.shape == (3, SIZE, SIZE) and depth.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(depth))) and bool(jnp.all(depth > 0))
  assert bool(jnp.all(depth <= cfg.max_depth))
  np.testing.assert_allclose(depth, depth_anything.estimate(ema_model, images), rtol=1e-5,
                             atol=1e-6)
  # Jitted at another frame size: (N, H, W) again.
  bigger = jax.image.resize(images, (3, 24, 20, 3), "linear")
  assert jax.jit(depth_anything.estimate)(model, bigger).shape == (3, 24, 20)
