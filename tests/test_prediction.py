"""Denoiser parameterisations: velocity vs residual on the memory prior."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_jax import diffusion
from mirage_jax.families.small import denoiser


def _inputs(rng, b=2, t=2, nc=1, h=4, w=4, c=8):
  k = iter(jax.random.split(rng, 8))
  x = jax.random.normal(next(k), (b, t, h, w, c))
  mem = jax.random.normal(next(k), (b, t, h, w, c))
  cov = (jax.random.uniform(next(k), (b, t, h, w)) > 0.5).astype(jnp.float32)
  ctx = jax.random.normal(next(k), (b, nc, h, w, c))
  rays = jax.random.normal(next(k), (b, t, h, w, 6))
  ctx_rays = jax.random.normal(next(k), (b, nc, h, w, 6))
  return x, mem, cov, ctx, rays, ctx_rays


def test_memory_prior_is_memory_where_covered_else_last_context():
  x, mem, cov, ctx, _, _ = _inputs(jax.random.key(0), nc=2)
  prior = np.asarray(denoiser.memory_prior(mem, cov, ctx))
  covered = np.asarray(cov, bool)
  np.testing.assert_allclose(prior[covered], np.asarray(mem)[covered])
  last = np.broadcast_to(np.asarray(ctx)[:, -1:], prior.shape)
  np.testing.assert_allclose(prior[~covered], last[~covered])


def test_fresh_x0_prior_model_samples_the_composite():
  cfg = denoiser.denoiser_config("tiny")
  cfg.num_layers, cfg.embed_dim, cfg.num_heads = 1, 32, 2
  model = denoiser.Denoiser(cfg, nnx.Rngs(0))
  x, mem, cov, ctx, rays, ctx_rays = _inputs(jax.random.key(1))

  def velocity(xt, t):
    tt = jnp.full(xt.shape[:2], t)
    return denoiser.predict(model, "x0_prior", xt, tt, rays, mem, cov, ctx, ctx_rays)[0]

  out = diffusion.sample(velocity, x, num_steps=4, method="euler")
  np.testing.assert_allclose(np.asarray(out), np.asarray(denoiser.memory_prior(mem, cov, ctx)),
                             atol=1e-4)
  # The velocity parameterisation of the same fresh model predicts v = 0: x0 = x_t.
  t = jnp.full(x.shape[:2], 0.3)
  v, x0 = denoiser.predict(model, "velocity", x, t, rays, mem, cov, ctx, ctx_rays)
  assert float(jnp.abs(v).max()) == 0.0
  np.testing.assert_allclose(np.asarray(x0), np.asarray(x))


def test_velocity_from_x0_matches_true_velocity():
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  t = jnp.asarray(rng.uniform(0.1, 1.0, size=(2, 3)))
  xt = diffusion.add_noise(jnp.asarray(x0), jnp.asarray(noise), t)
  np.testing.assert_allclose(np.asarray(diffusion.velocity_from_x0(xt, jnp.asarray(x0), t)),
                             np.asarray(diffusion.velocity_target(x0, noise)), atol=1e-5)
