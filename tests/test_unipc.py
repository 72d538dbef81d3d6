"""The reference's FlowUniPC sampler: schedule, parity with diffusers, accuracy on a known ODE.

Oracle: diffusers' ``UniPCMultistepScheduler`` with flow sigmas, data prediction and the
reference's sigmas given explicitly (the reference's own scheduler is the same algorithm;
diffusers' built-in flow schedule differs from it by up to ~3.5e-3 in sigma).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import diffusion

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")


def _reference_schedule(num_steps: int, shift: float, n_train: int = 1000):
  """The reference's schedule re-stated in float64: its float32 training grid starts at
  1 - 1/N, evenly spaced levels to 0 are shifted, the model gets int(N sigma)."""
  grid = (1.0 - np.linspace(1.0, 1.0 / n_train, n_train)[::-1]).astype(np.float32)
  levels = np.linspace(float(grid[0]), float(grid[-1]), num_steps + 1)[:-1]
  levels = shift * levels / (1.0 + (shift - 1.0) * levels)
  return levels, np.floor(levels * n_train).astype(np.int64)


def _oracle_scheduler(levels: np.ndarray, order: int):
  sch = schedulers.UniPCMultistepScheduler(
      num_train_timesteps=1000, solver_order=order, solver_type="bh2",
      prediction_type="flow_prediction", predict_x0=True, use_flow_sigmas=True,
      flow_shift=1.0,  # the levels given are shifted already
      lower_order_final=True, final_sigmas_type="zero", disable_corrector=[])
  sch.set_timesteps(sigmas=np.array(levels))
  return sch


def test_schedule_is_the_references():
  sigmas, timesteps = diffusion.unipc_schedule(20, 5.0)
  levels, ts_ref = _reference_schedule(20, 5.0)
  print("model timesteps:", timesteps.tolist())
  assert sigmas.dtype == np.float32 and sigmas.shape == (21,) and sigmas[-1] == 0.0
  np.testing.assert_array_equal(sigmas[:-1], levels.astype(np.float32))
  np.testing.assert_array_equal(timesteps, ts_ref)
  # The numbers the spec quotes: the DiT sees 999, 989, ..., 208.
  assert timesteps[:3].tolist() == [999, 989, 978] and timesteps[-1] == 208
  assert np.all(np.diff(timesteps) < 0)
  # diffusers given these levels builds the same sigmas and timesteps.
  sch = _oracle_scheduler(levels, 2)
  np.testing.assert_array_equal(sch.sigmas.numpy(), sigmas)
  np.testing.assert_array_equal(sch.timesteps.numpy(), timesteps)


# A deterministic toy "velocity model": nonlinear in x and t, mixing channels; the same
# formula in torch (for the oracle, channels-first (B, C, F, H, W)) and in jnp.
_W = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32) / 2.0


def _toy_torch(x, t):
  w = torch.from_numpy(_W)
  mix = torch.einsum("ij,bj...->bi...", w, x)
  return 0.7 * x + 0.5 * torch.tanh(mix + 0.3) * np.cos(t / 400.0) - 0.2 * np.sin(t / 250.0)


def _toy_jnp(x, t):
  mix = jnp.einsum("ij,bj...->bi...", jnp.asarray(_W), x)
  return 0.7 * x + 0.5 * jnp.tanh(mix + 0.3) * jnp.cos(t / 400.0) - 0.2 * jnp.sin(t / 250.0)


def _oracle_run(x_init: np.ndarray, num_steps: int, order: int,
                clean_first: np.ndarray | None = None) -> np.ndarray:
  levels, _ = _reference_schedule(num_steps, 5.0)
  sch = _oracle_scheduler(levels, order)
  x = torch.from_numpy(x_init.copy())
  for ts in sch.timesteps:
    v = _toy_torch(x, float(ts.to(torch.float32)))
    x = sch.step(v, ts, x, return_dict=False)[0]
    if clean_first is not None:  # the reference re-writes the clean first latent frame
      x[:, :, :1] = torch.from_numpy(clean_first)
  return x.numpy()


@pytest.mark.parametrize("num_steps,order,clean_first", [
    (20, 2, False),  # the reference's configuration
    (20, 2, True),   # ... with its first-frame re-write after every step
    (20, 3, False),
    (12, 1, False),
    (2, 2, False),
    (1, 2, False),
])
def test_parity_with_diffusers(num_steps, order, clean_first):
  x_init = np.random.default_rng(1).normal(size=(2, 4, 3, 5, 6)).astype(np.float32)
  first = np.random.default_rng(2).normal(size=(2, 4, 1, 5, 6)).astype(np.float32)
  want = _oracle_run(x_init, num_steps, order, first if clean_first else None)
  after = (lambda x: x.at[:, :, :1].set(first)) if clean_first else None
  run = jax.jit(lambda x: diffusion.sample_unipc(_toy_jnp, x, num_steps, 5.0, order,
                                                 after_step=after))
  got = np.asarray(run(jnp.asarray(x_init)))
  err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  print(f"steps {num_steps} order {order} clean_first {clean_first}: "
        f"max abs err {err:.3e}, scale {scale:.3f}")
  assert np.all(np.isfinite(got))
  assert err <= 1e-4 * scale, (err, scale)
  # The sampler moved the sample: not a no-op that the oracle happens to agree with.
  assert float(np.abs(want - x_init).max()) > 0.1


def test_model_sees_integer_timesteps_and_guidance():
  seen = []

  def model(x, t, conditioned=True):
    jax.debug.callback(lambda tt: seen.append(float(tt)), t)
    return jnp.full_like(x, 2.0 if conditioned else 1.0)

  x = jnp.zeros((1, 3))
  out = diffusion.sample_unipc(model, x, 20, 5.0, guidance_scale=3.0)
  _, timesteps = diffusion.unipc_schedule(20, 5.0)
  assert sorted(set(seen), reverse=True) == [float(t) for t in timesteps]
  # A constant velocity c moves x from sigma_0 to 0 by -sigma_0 c exactly (x0 = x - sigma c).
  sigma0 = float(diffusion.unipc_schedule(20, 5.0)[0][0])
  np.testing.assert_allclose(out, -sigma0 * (1.0 + 3.0 * (2.0 - 1.0)) * np.ones((1, 3)), rtol=1e-5)
  # Keeps the input's dtype (the arithmetic is float32).
  out16 = diffusion.sample_unipc(lambda x, t: 0.5 * x, x.astype(jnp.bfloat16) + 1, 4, 5.0)
  assert out16.dtype == jnp.bfloat16 and out16.shape == (1, 3)


def test_sample_dispatches_unipc():
  x = jax.random.normal(jax.random.key(0), (2, 4, 3, 5, 6))

  def velocity(x, t):  # t in [0, 1], as the in-house denoisers take it
    return _toy_jnp(x, t * 1000.0)

  got = diffusion.sample(velocity, x, 20, "unipc", 5.0)
  want = diffusion.sample_unipc(_toy_jnp, x, 20, 5.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="'euler', 'heun', 'unipc'"):
    diffusion.sample(velocity, x, 2, "dpm")


def _gaussian_problem():
  """Data x0 ~ N(mu, s^2) per dimension (s in [0.5, 1.5], latent-like): on
  x_t = (1 - t) x0 + t noise the marginal is N((1 - t) mu, r_t^2),
  r_t^2 = (1 - t)^2 s^2 + t^2, and the flow ODE keeps z = (x - (1 - t) mu) / r_t fixed, so
  v(x, t) = -mu + r_t'/r_t (x - (1 - t) mu) and x(0) = mu + s z."""
  rng = np.random.default_rng(3)
  mu = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
  s = jnp.asarray(rng.uniform(0.5, 1.5, size=(32,)), jnp.float32)

  def r(t):
    return jnp.sqrt((1 - t) ** 2 * s**2 + t**2)

  def velocity(x, t):
    return -mu + (t - (1 - t) * s**2) / r(t) ** 2 * (x - (1 - t) * mu)

  def exact(x, t_start):  # the ODE's solution at t = 0 from x at t_start
    return mu + s * (x - (1 - t_start) * mu) / r(t_start)

  return velocity, exact


def _errors(num_steps: int, shift: float) -> dict[str, float]:
  """Max abs error at t = 0 against the exact ODE solution from each sampler's start."""
  velocity, exact = _gaussian_problem()
  x1 = jax.random.normal(jax.random.key(4), (256, 32))
  sigmas, timesteps = diffusion.unipc_schedule(num_steps, shift)
  table_t, table_sigma = jnp.asarray(timesteps, jnp.float32), jnp.asarray(sigmas[:-1])

  def at_level(x, timestep):  # the solver's own level: measures the solver alone
    return velocity(x, table_sigma[jnp.argmin(jnp.abs(table_t - timestep))])

  want = exact(x1, float(sigmas[0]))  # UniPC starts at sigma_0 ~ 0.9998, not 1
  x = x1  # Euler on UniPC's own levels
  for i in range(num_steps):
    x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
  err = {
      "unipc": diffusion.sample_unipc(at_level, x1, num_steps, shift) - want,
      # sample(method='unipc'): the model sees the truncated timestep / 1000, as the
      # reference's DiT does.
      "unipc_truncated_t": diffusion.sample(velocity, x1, num_steps, "unipc", shift) - want,
      "euler": diffusion.sample(velocity, x1, num_steps, "euler", shift) - exact(x1, 1.0),
      "euler_same_levels": x - want,
  }
  return {k: float(jnp.abs(v).max()) for k, v in err.items()}


def test_unipc_beats_euler_on_gaussian_flow():
  err = {(n, shift): _errors(n, shift) for n in (10, 20) for shift in (1.0, 5.0)}
  for key, e in err.items():
    print(f"steps {key[0]} shift {key[1]}: " + ", ".join(f"{k} {v:.3e}" for k, v in e.items()))
  for shift in (1.0, 5.0):
    e10, e20 = err[10, shift], err[20, shift]
    for euler in ("euler", "euler_same_levels"):
      assert e10["unipc"] < e10[euler], (shift, e10)
    # Converges faster than Euler's first order.
    assert e10["unipc"] / e20["unipc"] > 2.5, (shift, e10, e20)
    assert e10["euler"] / e20["euler"] < 2.2, (shift, e10, e20)
  # On the unshifted grid, where all steps are of like size, by far.
  assert err[10, 1.0]["unipc"] < err[10, 1.0]["euler"] / 5, err[10, 1.0]
  # The reference's timestep truncation costs little next to the solver's own error.
  assert err[10, 5.0]["unipc_truncated_t"] < 1.1 * err[10, 5.0]["unipc"], err[10, 5.0]
