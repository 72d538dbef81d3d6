"""Flow matching (rectified flow): noising, loss, timestep schedule and ODE samplers.

Sign convention (the reference's): time ``t`` runs from 0 (data) to 1 (noise),

  x_t = (1 - t) * x0 + t * noise,      velocity  v = dx_t/dt = noise - x0.

The network predicts ``v``; sampling integrates ``dx/dt = v`` from ``t = 1`` (pure noise)
down to ``t = 0``, i.e. ``x <- x + (t_next - t) * v`` with ``t_next < t``.
Per-frame times: ``t`` may have any shape that broadcasts against the leading axes of
``x`` (e.g. (B, T) for (B, T, h, w, C) latents); clean context frames use ``t = 0``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
  """Appends trailing singleton axes so ``t`` (leading dims of x) broadcasts against ``x``."""
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Timestep shift ``t' = shift t / (1 + (shift - 1) t)``; shift > 1 spends more time near noise.

  Args:
    t: (...) times in [0, 1]. Returns the same shape; 0 and 1 are fixed points.
  """
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng: jax.Array, shape: tuple[int, ...], shift: float = 1.0) -> jax.Array:
  """Training times: uniform in (0, 1), then shifted. Returns ``shape`` float32."""
  u = jax.random.uniform(rng, shape, minval=1e-5, maxval=1.0 - 1e-5)
  return shift_time(u, shift)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = (1 - t) x0 + t noise``.

  Args:
    x0, noise: (B, T, ...) clean data and Gaussian noise.
    t: (B, T) or (B,) times.
  Returns:
    (B, T, ...) noisy sample.
  """
  te = _expand(t, x0)
  return (1.0 - te) * x0 + te * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target ``noise - x0`` (same shape as x0)."""
  return noise - x0


def velocity_from_x0(x_t: jax.Array, x0: jax.Array, t: jax.Array, t_min: float = 1e-3) -> jax.Array:
  """The velocity an x0 estimate implies: ``v = (x_t - x0) / t`` (t clamped to ``t_min``).

  With it an Euler step ``t -> t'`` is ``x0 + (t' / t) (x_t - x0)``, and the last step to
  t = 0 returns the x0 estimate itself.

  Args:
    x_t, x0: (B, T, ...). t: (B, T) or (B,).
  """
  return (x_t - x0) / jnp.maximum(_expand(t, x_t), t_min)


def time_weight(t: jax.Array, weighting: str) -> jax.Array:
  """Loss weight per time: 'uniform' (1) or 'logit_normal' (SD3-style bell around t = 0.5).

  Args:
    t: (...) times in (0, 1). Returns the same shape.
  """
  if weighting == "uniform":
    return jnp.ones_like(t)
  if weighting == "logit_normal":
    tc = jnp.clip(t, 1e-5, 1.0 - 1e-5)
    logit = jnp.log(tc / (1.0 - tc))
    # Density of the logit-normal(0, 1); it is ~0.4 at the centre, so scale it to peak at 1.
    return jnp.exp(-0.5 * logit**2) / (tc * (1.0 - tc)) / 4.0
  raise ValueError(f"unknown loss weighting {weighting!r}; known: 'uniform', 'logit_normal'")


def flow_matching_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
                       frame_mask: jax.Array | None = None,
                       weighting: str = "uniform") -> jax.Array:
  """Weighted MSE between predicted and true velocity, averaged over unmasked frames.

  Args:
    pred: (B, T, ...) predicted velocity.
    x0, noise: (B, T, ...) clean latents and the noise used to build x_t.
    t: (B, T) per-frame times.
    frame_mask: (B, T) 1 for frames that count (targets), 0 for frames given clean
      (context frames kept at t = 0 inside the chunk); None = all frames.
    weighting: see :func:`time_weight`.
  Returns:
    scalar float32 loss.
  """
  err = jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise).astype(jnp.float32))
  per_frame = err.reshape(err.shape[:2] + (-1,)).mean(-1)  # (B, T)
  mask = jnp.ones_like(per_frame) if frame_mask is None else jnp.broadcast_to(
      frame_mask.astype(jnp.float32), per_frame.shape)
  w = time_weight(t, weighting) * mask
  return jnp.sum(w * per_frame) / jnp.maximum(jnp.sum(mask), 1.0)


def drop_conditioning(rng: jax.Array, prob: float, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Classifier-free guidance dropout: zero each example's conditioning with probability prob.

  The same examples are dropped in every array (e.g. memory latents, coverage, cond
  embedding), so a dropped example sees no memory at all.

  Args:
    rng: PRNG key.
    prob: drop probability in [0, 1].
    *arrays: (B, ...) arrays sharing the batch axis.
  Returns:
    the arrays with dropped examples set to zero.
  """
  if not arrays:
    return ()
  keep = jax.random.uniform(rng, (arrays[0].shape[0],)) >= prob
  return tuple(jnp.where(_expand(keep, a), a, jnp.zeros_like(a)) for a in arrays)


def sampling_times(num_steps: int, shift: float = 1.0) -> jax.Array:
  """(num_steps + 1,) decreasing times from 1 to 0 on the shifted schedule."""
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def sample(velocity_fn: Callable[..., jax.Array], x_init: jax.Array, num_steps: int,
           method: str = "euler", shift: float = 1.0,
           guidance_scale: float | None = None) -> jax.Array:
  """Integrates the flow ODE from noise (t = 1) to data (t = 0).

  Args:
    velocity_fn: ``velocity_fn(x, t)`` -> velocity, x (B, ...) and t a scalar float32
      array; with guidance it is called as ``velocity_fn(x, t, conditioned=bool)``.
    x_init: (B, ...) the noise at t = 1.
    num_steps: number of steps (Heun costs two evaluations per step).
    method: 'euler' (1st order) or 'heun' (2nd order, trapezoidal corrector).
    shift: timestep shift of the schedule (the reference samples 20 steps with shift 5).
    guidance_scale: classifier-free guidance ``v_u + s (v_c - v_u)``; None = conditional only.
  Returns:
    (B, ...) the sample at t = 0.
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"unknown sampler {method!r}; known: 'euler', 'heun'")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")

  def velocity(x, t):
    if guidance_scale is None:
      return velocity_fn(x, t)
    v_c = velocity_fn(x, t, conditioned=True)
    v_u = velocity_fn(x, t, conditioned=False)
    return v_u + guidance_scale * (v_c - v_u)

  times = sampling_times(num_steps, shift)

  def step(x, ts):
    t, t_next = ts
    dt = t_next - t
    v = velocity(x, t)
    x_pred = x + dt * v
    if method == "euler":
      return x_pred, None
    v_next = velocity(x_pred, t_next)
    return x + dt * 0.5 * (v + v_next), None

  x, _ = jax.lax.scan(step, x_init, (times[:-1], times[1:]))
  return x
