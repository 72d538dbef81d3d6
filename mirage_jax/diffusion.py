"""Flow matching (rectified flow): noising, loss, timestep schedule and ODE samplers.

Samplers: Euler and Heun on a shifted uniform grid (``sample``), and the reference's
FlowUniPC multistep sampler on its own schedule (``sample_unipc``, ``unipc_schedule``).

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
import numpy as np


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


NOISE_LEVELS = ("per_frame", "per_example", "mixed")


def sample_levels(rng: jax.Array, batch: int, frames: int, shift: float = 1.0,
                  scheme: str = "per_frame", mixed_prob: float = 0.5) -> jax.Array:
  """Training times of a chunk of ``frames`` target frames: :func:`sample_time` per frame
  ('per_frame'), one per example shared by its frames ('per_example', as the sampler moves
  them), or per example with probability ``mixed_prob`` and per frame otherwise ('mixed').

  Returns:
    (batch, frames) float32.
  """
  if scheme not in NOISE_LEVELS:
    raise ValueError(f"unknown noise-level scheme {scheme!r}; known: {NOISE_LEVELS}")
  if scheme == "per_frame":  # the same draw as before the other schemes existed
    return sample_time(rng, (batch, frames), shift)
  k_t, k_mix = jax.random.split(rng)
  t = sample_time(k_t, (batch, frames), shift)
  shared = jnp.broadcast_to(t[:, :1], t.shape)
  if scheme == "per_example":
    return shared
  together = jax.random.uniform(k_mix, (batch, 1)) < mixed_prob
  return jnp.where(together, shared, t)


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


def noise_context(rng: jax.Array, context: jax.Array, max_level: float) -> jax.Array:
  """Context noise augmentation: each example's clean context moved toward noise.

  Every example draws a level ``s ~ U(0, max_level)`` and its context frames become
  ``add_noise(context, noise, s)``: the model learns not to copy every detail of a context
  that, in a rollout, is its own (drifting) output.

  Args:
    rng: PRNG key.
    context: (B, T, ...) clean context latents.
    max_level: largest flow level in [0, 1).
  Returns:
    (B, T, ...) the noised context.
  """
  level_rng, noise_rng = jax.random.split(rng)
  level = jax.random.uniform(level_rng, context.shape[:1], jnp.float32, 0.0, max_level)
  noise = jax.random.normal(noise_rng, context.shape, context.dtype)
  return add_noise(context, noise, level).astype(context.dtype)


def sampling_times(num_steps: int, shift: float = 1.0) -> jax.Array:
  """(num_steps + 1,) decreasing times from 1 to 0 on the shifted schedule."""
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


SAMPLERS = ("euler", "heun", "unipc")


def _guided(fn: Callable[..., jax.Array], guidance_scale: float | None) -> Callable:
  """``(x, t) -> v``: ``fn(x, t)``, or with classifier-free guidance
  ``v_u + guidance_scale (v_c - v_u)`` of ``fn(x, t, conditioned=True/False)``."""
  if guidance_scale is None:
    return fn

  def guided(x, t):
    v_c = fn(x, t, conditioned=True)
    v_u = fn(x, t, conditioned=False)
    return v_u + guidance_scale * (v_c - v_u)
  return guided


def sample(velocity_fn: Callable[..., jax.Array], x_init: jax.Array, num_steps: int,
           method: str = "euler", shift: float = 1.0,
           guidance_scale: float | None = None) -> jax.Array:
  """Integrates the flow ODE from noise (t = 1) to data (t = 0).

  Args:
    velocity_fn: ``velocity_fn(x, t)`` -> velocity, x (B, ...) and t a scalar float32
      array; with guidance it is called as ``velocity_fn(x, t, conditioned=bool)``.
    x_init: (B, ...) the noise at t = 1.
    num_steps: number of steps (Heun costs two evaluations per step).
    method: 'euler' (1st order), 'heun' (2nd order, trapezoidal corrector) or 'unipc'
      (the reference's sampler, :func:`sample_unipc` with order 2; it starts from
      t = shifted 0.999 rather than 1, and ``velocity_fn`` gets the reference's truncated
      integer timestep divided by 1000, i.e. what the reference's DiT sees).
    shift: timestep shift of the schedule (the reference samples 20 steps with shift 5).
    guidance_scale: classifier-free guidance ``v_u + s (v_c - v_u)``; None = conditional only.
  Returns:
    (B, ...) the sample at t = 0.
  """
  if method not in SAMPLERS:
    raise ValueError(f"unknown sampler {method!r}; known: "
                     + ", ".join(repr(m) for m in SAMPLERS))
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if method == "unipc":
    def model_fn(x, timestep, **kwargs):
      return velocity_fn(x, timestep / UNIPC_TRAIN_TIMESTEPS, **kwargs)
    return sample_unipc(model_fn, x_init, num_steps, shift, guidance_scale=guidance_scale)

  velocity = _guided(velocity_fn, guidance_scale)
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


# --------------------------------------------------------------------------- FlowUniPC
#
# The reference samples with a UniPC multistep solver (predictor UniP + corrector UniC)
# in data-prediction form on the flow path x_t = (1 - sigma) x0 + sigma noise, whose
# log-SNR is lambda = log((1 - sigma) / sigma). The model's velocity v gives the data
# estimate x0 = x - sigma v. Every update is a fixed linear combination of the current
# sample, the previous (corrected) sample and the last few x0 estimates whose weights
# depend on the schedule only, so they are computed once in float64 with numpy and the
# loop itself is a `lax.scan` of multiply-adds.

UNIPC_TRAIN_TIMESTEPS = 1000


def unipc_schedule(num_steps: int, shift: float = 5.0,
                   num_train_timesteps: int = UNIPC_TRAIN_TIMESTEPS
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The reference's FlowUniPC noise levels and the timesteps its DiT is given.

  The reference's scheduler keeps its training grid ``sigma = 1 - k / N`` (k = 1..N,
  N = num_train_timesteps) in float32, so sampling starts from float32(1 - 1/N), not 1:
  of ``num_steps + 1`` evenly spaced levels from there down to 0, the first num_steps are
  shifted (float64), the model timesteps are ``N sigma`` truncated to integers, and 0 is
  the final level. 20 steps, shift 5: timesteps 999, 989, 978, ..., 356, 208.

  Args:
    num_steps: number of model evaluations (>= 1).
    shift: timestep shift, ``sigma' = shift sigma / (1 + (shift - 1) sigma)``.
    num_train_timesteps: N.
  Returns:
    sigmas: (num_steps + 1,) float32, decreasing from ~0.9998 to sigmas[-1] = 0.
    timesteps: (num_steps,) int64, the model timestep at each of the first num_steps levels.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
  levels = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
  levels = shift * levels / (1.0 + (shift - 1.0) * levels)
  timesteps = (levels * num_train_timesteps).astype(np.int64)  # truncation, as the reference
  sigmas = np.concatenate([levels, [0.0]]).astype(np.float32)
  return sigmas, timesteps


def _unipc_orders(num_steps: int, order: int) -> list[int]:
  """Predictor order per step: at most i + 1 at step i (warm-up: only i earlier estimates
  exist) and, as the reference (``lower_order_final``), at most num_steps - i, so the
  final step, to sigma = 0, is order 1."""
  return [min(order, num_steps - i, i + 1) for i in range(num_steps)]


def _unipc_rhs(hh: float, order: int) -> tuple[np.ndarray, float]:
  """UniPC's order conditions for a step with ``hh = -(lambda_t - lambda_s)``.

  Returns b (order,), the right-hand side the rho weights solve for, and
  ``e^hh - 1``, which is both the first-order step's weight and the 'bh2' variant's B(h).
  ('bh1', B(h) = hh, is left out: with the final level 0 its last step is inf * 0 in the
  reference's arithmetic.)
  """
  phi_1 = float(np.expm1(hh))
  # At iteration k, phi_k holds hh * phi_{k+1}(hh), with the phi functions of exponential
  # integrators: phi_1(h) = (e^h - 1) / h, phi_{k+1}(h) = (phi_k(h) - 1/k!) / h.
  phi_k, factorial, b = phi_1 / hh - 1.0, 1.0, []
  for k in range(1, order + 1):
    b.append(phi_k * factorial / phi_1)
    factorial *= k + 1
    phi_k = phi_k / hh - 1.0 / factorial
  return np.asarray(b), phi_1


def _unipc_coefficients(sigmas: np.ndarray, order: int) -> dict[str, np.ndarray]:
  """Per-step weights of the corrector and predictor, as linear combinations.

  With ``s = (x0_i, x0_{i-1}, ..., x0_{i-order})`` the data estimates at levels i, i-1, ...
  (newest first), step i computes
    corrected = c_x x_i + c_last x_{i-1}^c + sum_k c_s[k] s[k]
    x_{i+1}   = p_x corrected + sum_k p_s[k] s[k]
  where x_{i-1}^c is the corrected sample the previous predictor started from.

  Args:
    sigmas: (n + 1,) levels, sigmas[-1] = 0. order: predictor order (>= 1).
  Returns:
    c_x, c_last, p_x: (n,) float64; c_s, p_s: (n, order + 1) float64.
  """
  s = sigmas.astype(np.float64)
  n = len(s) - 1
  alpha = 1.0 - s
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(s)  # +inf at the final level 0
  orders = _unipc_orders(n, order)
  c_x, c_last, p_x = np.zeros(n), np.zeros(n), np.zeros(n)
  c_s, p_s = np.zeros((n, order + 1)), np.zeros((n, order + 1))
  for i in range(n):
    # UniC: re-do the step (i-1 -> i) that produced x_i with the order of that step, now
    # also using x0_i (the model evaluated at x_i); x0_i is not re-evaluated afterwards.
    if i == 0:
      c_x[i] = 1.0
    else:
      q = orders[i - 1]
      h = lam[i] - lam[i - 1]
      b, phi_1 = _unipc_rhs(-h, q)
      # Offsets of the older levels i-1-j (j = 1..q-1) in units of h, then the new level i.
      rk = np.array([(lam[i - 1 - j] - lam[i - 1]) / h for j in range(1, q)] + [1.0])
      rho = np.array([0.5]) if q == 1 else np.linalg.solve(np.vander(rk, q, increasing=True).T, b)
      scale = alpha[i] * phi_1  # alpha_t B(h)
      c_last[i] = s[i] / s[i - 1]
      c_s[i, 1] = -alpha[i] * phi_1
      for j in range(1, q):  # differences (x0_{i-1-j} - x0_{i-1}) / rk_j
        c_s[i, 1 + j] -= scale * rho[j - 1] / rk[j - 1]
        c_s[i, 1] += scale * rho[j - 1] / rk[j - 1]
      c_s[i, 0] -= scale * rho[-1]  # the difference x0_i - x0_{i-1}
      c_s[i, 1] += scale * rho[-1]
    # UniP: level i -> i + 1 from x0_i and the p - 1 estimates before it.
    p = orders[i]
    h = lam[i + 1] - lam[i]
    b, phi_1 = _unipc_rhs(-h, p)
    p_x[i] = s[i + 1] / s[i]
    p_s[i, 0] = -alpha[i + 1] * phi_1
    if p > 1:  # never at the final level 0 (lower_order_final), where h is infinite
      rk = np.array([(lam[i - j] - lam[i]) / h for j in range(1, p)])
      # Order 2 uses the fixed weight 1/2, as the reference; higher orders solve for it.
      rho = np.array([0.5]) if p == 2 else np.linalg.solve(
          np.vander(rk, p - 1, increasing=True).T, b[:-1])
      scale = alpha[i + 1] * phi_1
      for j in range(1, p):
        p_s[i, j] -= scale * rho[j - 1] / rk[j - 1]
        p_s[i, 0] += scale * rho[j - 1] / rk[j - 1]
  out = dict(c_x=c_x, c_last=c_last, c_s=c_s, p_x=p_x, p_s=p_s)
  if not all(np.all(np.isfinite(v)) for v in out.values()):
    raise ValueError(f"UniPC weights are not finite for sigmas {sigmas} (order {order})")
  return out


def sample_unipc(model_fn: Callable[..., jax.Array], x_init: jax.Array, num_steps: int = 20,
                 shift: float = 5.0, order: int = 2, *,
                 guidance_scale: float | None = None,
                 after_step: Callable[[jax.Array], jax.Array] | None = None,
                 num_train_timesteps: int = UNIPC_TRAIN_TIMESTEPS) -> jax.Array:
  """The reference's sampler: FlowUniPC multistep (UniP predictor + UniC corrector).

  As the reference: UniPC's 'bh2' variant in data (x0) prediction, defaults 20 steps,
  shift 5, order 2, the corrector on every step but the first, the final step order 1
  (``lower_order_final``), final level 0. One model evaluation per step; the result is
  the last predictor step, to sigma = 0, i.e. the x0 estimate at the last level. The whole
  loop is one ``lax.scan`` (num_steps, shift, order static).

  Args:
    model_fn: ``model_fn(x, timestep)`` -> velocity (noise - x0) of x's shape; timestep is
      a float32 scalar holding the reference's integer model timestep (999, 989, ...).
      With guidance it is called as ``model_fn(x, timestep, conditioned=bool)``.
    x_init: (B, ...) the noise (at sigma = sigmas[0] ~ 0.9998, taken as pure noise as the
      reference does).
    num_steps, shift, num_train_timesteps: the schedule, see :func:`unipc_schedule`.
    order: predictor order (>= 1); the corrector raises it by one.
    guidance_scale: classifier-free guidance ``v_u + s (v_c - v_u)``; None = conditional only.
    after_step: optional ``x -> x`` applied to each new sample (e.g. the reference re-writes
      the clean first-frame latent after every step); shape and dtype preserved.
  Returns:
    (B, ...) the sample at sigma = 0, x_init's dtype (the arithmetic is float32).
  """
  if order < 1:
    raise ValueError(f"UniPC order must be >= 1, got {order}")
  sigmas, timesteps = unipc_schedule(num_steps, shift, num_train_timesteps)
  w = _unipc_coefficients(sigmas, order)
  dtype, f32 = x_init.dtype, jnp.float32

  velocity = _guided(model_fn, guidance_scale)

  def step(carry, xs):
    x, last, history = carry  # history: x0 at the `order` previous levels, newest first
    sigma, timestep, c_x, c_last, c_s, p_x, p_s = xs
    x0 = x.astype(f32) - sigma * velocity(x, timestep).astype(f32)
    s = (x0,) + history
    corrected = c_x * x.astype(f32) + c_last * last + sum(c_s[k] * s[k] for k in range(order + 1))
    x_next = (p_x * corrected + sum(p_s[k] * s[k] for k in range(order))).astype(dtype)
    if after_step is not None:
      x_next = after_step(x_next)
    return (x_next, corrected, s[:order]), None

  zeros = jnp.zeros(x_init.shape, f32)
  xs = (jnp.asarray(sigmas[:-1], f32), jnp.asarray(timesteps, f32),
        *(jnp.asarray(w[k], f32) for k in ("c_x", "c_last", "c_s", "p_x", "p_s")))
  (x, _, _), _ = jax.lax.scan(step, (x_init, zeros, (zeros,) * order), xs)
  return x
