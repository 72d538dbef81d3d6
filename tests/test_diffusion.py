"""Flow matching: noising convention, shift, loss, samplers, CFG dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import diffusion


def test_shift_formula_and_fixed_points():
  t = jnp.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(diffusion.shift_time(t, 5.0),
                             [0.0, 5 * 0.25 / (1 + 4 * 0.25), 5 * 0.5 / 3.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(diffusion.shift_time(t, 1.0), t)
  times = diffusion.sampling_times(20, 5.0)
  assert times.shape == (21,) and times[0] == 1.0 and times[-1] == 0.0
  assert jnp.all(jnp.diff(times) < 0)


def test_sample_time_shift_moves_mass_to_noise():
  t1 = diffusion.sample_time(jax.random.key(0), (4096,), 1.0)
  t5 = diffusion.sample_time(jax.random.key(0), (4096,), 5.0)
  assert 0.0 < float(t5.min()) and float(t5.max()) < 1.0
  assert float(t5.mean()) > float(t1.mean()) + 0.15


def test_add_noise_endpoints_and_velocity_sign():
  x0 = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]])
  xt = diffusion.add_noise(x0, noise, t)
  np.testing.assert_allclose(xt[0, 0], x0[0, 0])
  np.testing.assert_allclose(xt[0, 2], noise[0, 2])
  # d x_t / dt equals the velocity target.
  eps = 1e-3
  dx = (diffusion.add_noise(x0, noise, t + eps) - xt) / eps
  np.testing.assert_allclose(dx, diffusion.velocity_target(x0, noise), atol=1e-2)


def test_loss_zero_for_exact_velocity_and_masks_frames():
  x0 = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.full((2, 3), 0.3)
  exact = noise - x0
  for w in ("uniform", "logit_normal"):
    assert float(diffusion.flow_matching_loss(exact, x0, noise, t, weighting=w)) == 0.0
  bad = exact.at[:, 0].add(1.0)  # wrong only on frame 0
  mask = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
  assert float(diffusion.flow_matching_loss(bad, x0, noise, t, mask)) == 0.0
  np.testing.assert_allclose(diffusion.flow_matching_loss(bad, x0, noise, t), 1.0 / 3, rtol=1e-5)


def test_samplers_exact_for_constant_velocity():
  x1 = jax.random.normal(jax.random.key(0), (3, 5))
  c = jnp.arange(5.0)
  for method in ("euler", "heun"):
    x0 = diffusion.sample(lambda x, t: jnp.broadcast_to(c, x.shape), x1, 1, method)
    np.testing.assert_allclose(x0, x1 - c, rtol=1e-6)


def test_heun_much_more_accurate_than_euler_on_linear_ode():
  # dx/dt = a x  =>  x(0) = x(1) exp(-a).
  a = 1.5
  x1 = jnp.ones((2, 4))
  exact = x1 * np.exp(-a)
  err = {(m, n): float(jnp.abs(diffusion.sample(lambda x, t: a * x, x1, n, m) - exact).max())
         for m in ("euler", "heun") for n in (10, 20)}
  assert err["heun", 20] < err["euler", 20] / 20, err
  # Convergence order: halving the step halves Euler's error and quarters Heun's.
  assert 1.7 < err["euler", 10] / err["euler", 20] < 2.3, err
  assert 3.4 < err["heun", 10] / err["heun", 20] < 4.6, err


def test_guidance_combines_conditional_and_unconditional():
  def vel(x, t, conditioned):
    return jnp.full_like(x, 2.0 if conditioned else 1.0)
  x1 = jnp.zeros((1, 2))
  out = diffusion.sample(vel, x1, 4, "euler", guidance_scale=3.0)
  np.testing.assert_allclose(out, -(1.0 + 3.0 * (2.0 - 1.0)) * jnp.ones((1, 2)), rtol=1e-6)


def test_drop_conditioning_same_examples_everywhere():
  mem = jnp.ones((64, 2, 3))
  cov = jnp.ones((64, 5))
  dm, dc = diffusion.drop_conditioning(jax.random.key(0), 0.5, mem, cov)
  kept_m = dm.reshape(64, -1).max(-1)
  kept_c = dc.reshape(64, -1).max(-1)
  np.testing.assert_array_equal(kept_m, kept_c)
  assert 10 < int(kept_m.sum()) < 54
  assert jnp.all(diffusion.drop_conditioning(jax.random.key(0), 0.0, mem)[0] == 1)


def test_bad_sampler_name():
  with pytest.raises(ValueError, match="sampler"):
    diffusion.sample(lambda x, t: x, jnp.zeros((1,)), 2, "rk4")
