"""Alignment of monocular depth to the memory's depth (mirage_jax.depth.align), and the
depth choice's checks (mirage_jax.depth.estimator.depth_options)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.depth import align, estimator
from mirage_jax.memory import splatting
from mirage_jax.errors import InputError


def _scene(seed=0, f=3, h=8, w=8, s=4):
  """True depth (F, H, W) of random planes and the latent-grid memory depth (F, h, w)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(h * s), np.arange(w * s), indexing="ij")
  true = np.stack([1.5 + rng.uniform(0, 2) + 0.05 * yy + 0.03 * xx * rng.uniform(-1, 1)
                   for _ in range(f)]).astype(np.float32)
  memory = true.reshape(f, h, s, w, s).mean(axis=(2, 4))
  return true, memory


def test_median_scale_recovers_the_scale_through_outliers():
  true, memory = _scene()
  est = true / np.array([3.0, 0.5, 1.7], np.float32)[:, None, None]
  cov = np.ones(memory.shape, bool)
  bad = memory.copy()
  bad[:, :3] *= 4.0  # 3 of 8 rows disagree (an occlusion edge, moved content)
  scale, enough = align.median_scale(jnp.asarray(est), jnp.asarray(bad), jnp.asarray(cov))
  np.testing.assert_allclose(np.asarray(scale), [3.0, 0.5, 1.7], rtol=0.03)
  assert np.asarray(enough).all()


def test_median_scale_needs_enough_covered_cells():
  true, memory = _scene()
  cov = np.zeros(memory.shape, bool)
  cov[0, :2, :2] = True  # 4 cells < min_cells
  cov[1] = True
  scale, enough = align.median_scale(jnp.asarray(true * 2), jnp.asarray(memory),
                                     jnp.asarray(cov), min_cells=8)
  assert np.asarray(enough).tolist() == [False, True, False]
  assert float(scale[0]) == 1.0 and float(scale[2]) == 1.0
  assert abs(float(scale[1]) - 0.5) < 0.02


def test_inverse_affine_recovers_disparity_scale_and_shift_through_outliers():
  true, memory = _scene(seed=1)
  a, b = np.array([0.2, 1.5, 0.7], np.float32), np.array([0.05, -0.1, 0.2], np.float32)
  # A relative model's output: disparity with an unknown scale and shift of inverse depth.
  disp = (1.0 / true - b[:, None, None]) / a[:, None, None]
  cov = np.ones(memory.shape, bool)
  bad = memory.copy()
  bad[:, :, :2] *= 3.0  # 2 of 8 columns wrong
  fa, fb, enough = align.inverse_affine(jnp.asarray(disp), jnp.asarray(bad), jnp.asarray(cov))
  assert np.asarray(enough).all()
  # The fitted depth is within a few percent of the truth where the memory was right.
  fitted = 1.0 / (np.asarray(fa)[:, None, None] * disp + np.asarray(fb)[:, None, None])
  rel = np.abs(fitted - true) / true
  assert np.median(rel) < 0.03, np.median(rel)
  # Plain least squares over the same cells is pulled by the wrong columns: the robust fit
  # is what makes the difference.
  plain_a, plain_b = align._weighted_line(
      jnp.asarray(splatting.depth_at(jnp.asarray(disp), 8, 8).reshape(3, -1)),
      jnp.asarray((1.0 / bad).reshape(3, -1)), jnp.ones((3, 64)))
  plain = 1.0 / (np.asarray(plain_a)[:, None, None] * disp + np.asarray(plain_b)[:, None, None])
  assert np.median(np.abs(plain - true) / true) > 2 * np.median(rel)


def test_depth_options_refuse_what_the_family_cannot_take():
  opts = estimator.depth_options(None, None, None, default="decoder",
                                 allowed=("decoder", "given", "depth_anything"), family="small")
  assert opts.estimator == "decoder"
  assert estimator.depth_options(None, "d", None, default="given", allowed=("given", "depth_anything"),
                                 family="wan").estimator == "depth_anything"
  cases = [("decoder", None, None, "depth_estimator"), ("depth_anything", None, None, "depth_model"),
           ("given", "some/export", None, "depth_model"), ("given", None, False, "depth_align"),
           ("magic", None, None, "depth_estimator")]
  for est, model, al, field in cases:
    with pytest.raises(InputError, match=field):
      estimator.depth_options(est, model, al, default="given",
                              allowed=("given", "depth_anything"), family="wan")


def _monocular(kind="metric", align_=True):
  """A Monocular around a tiny random network whose output is then replaced by a known
  function of the image (channel 0 + 2): the alignment is what is under test."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mirage_jax.depth import depth_anything  # pylint: disable=g-import-not-at-top
  cfg = depth_anything.model_config("tiny", kind)
  mono = estimator.Monocular(depth_anything.DepthAnythingV2(cfg, rngs=nnx.Rngs(0)), cfg,
                             align=align_, min_cells=8)
  mono._raw = lambda state, rgb: rgb[..., 0] + 2.0  # pylint: disable=protected-access
  return mono


def _images_for(out):
  """(F, H, W, 3) images whose patched network output is ``out`` (F, H, W)."""
  return jnp.repeat((jnp.asarray(out) - 2.0)[..., None], 3, -1)


def test_monocular_first_frame_takes_the_given_depth_or_the_metric_estimate():
  mono = _monocular()
  true, _ = _scene(f=1)
  depth, fit = mono.first(mono.state, _images_for(true / 2.0)[0], jnp.asarray(true[0]))
  np.testing.assert_allclose(np.asarray(depth), true[0])  # the given depth is kept
  np.testing.assert_allclose(np.asarray(fit), [2.0, 0.0], rtol=1e-5)  # and sets the scale
  depth, fit = mono.first(mono.state, _images_for(true / 2.0)[0], jnp.zeros_like(true[0]))
  np.testing.assert_allclose(np.asarray(depth), true[0] / 2.0, rtol=1e-6)  # metric as is
  np.testing.assert_allclose(np.asarray(fit), [1.0, 0.0])


def test_monocular_chunk_fits_covered_frames_and_carries_the_last_fit():
  mono = _monocular()
  true, memory = _scene(f=3)
  est = true / np.array([3.0, 5.0, 7.0], np.float32)[:, None, None]  # drifting scale
  cov = np.ones(memory.shape, bool)
  cov[2] = False  # frame 2 sees only new content
  depth, fit, own = mono.chunk(mono.state, _images_for(est), jnp.asarray(memory),
                               jnp.asarray(cov), jnp.array([2.0, 0.0]))
  assert np.asarray(own).tolist() == [True, True, False]
  # Covered frames land on the memory's scale; the uncovered one takes the last fit (5).
  np.testing.assert_allclose(np.asarray(depth[:2]), true[:2], rtol=0.03)
  np.testing.assert_allclose(np.asarray(depth[2]), est[2] * 5.0, rtol=0.03)
  np.testing.assert_allclose(float(fit[0]), 5.0, rtol=0.03)
  # Nothing covered: the carried fit for every frame, and it stays.
  depth, fit2, own = mono.chunk(mono.state, _images_for(est), jnp.asarray(memory),
                                jnp.zeros(memory.shape, bool), jnp.array([2.0, 0.0]))
  assert not np.asarray(own).any() and np.asarray(fit2).tolist() == [2.0, 0.0]
  np.testing.assert_allclose(np.asarray(depth), est * 2.0, rtol=1e-6)
  # Unaligned: the raw metric output, whatever the memory says.
  raw = _monocular(align_=False)
  depth, _, own = raw.chunk(raw.state, _images_for(est), jnp.asarray(memory), jnp.asarray(cov),
                            jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(np.asarray(depth), est, rtol=1e-6)


def test_relative_models_need_alignment_and_frame_zero_depth():
  with pytest.raises(InputError, match="depth_align"):
    _monocular("relative", align_=False)
  mono = _monocular("relative")
  assert mono.needs_first_depth and not _monocular().needs_first_depth
  true, memory = _scene(f=2, seed=3)
  disp = (1.0 / true - 0.05) / 0.4  # relative inverse depth, unknown affine
  depth, fit, own = mono.chunk(mono.state, _images_for(disp), jnp.asarray(memory),
                               jnp.ones(memory.shape, bool), jnp.array([1.0, 0.0]))
  assert np.asarray(own).all()
  assert np.median(np.abs(np.asarray(depth) - true) / true) < 0.03
