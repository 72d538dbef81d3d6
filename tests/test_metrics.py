import jax
import numpy as np
import pytest

from mirage_jax import geometry
from mirage_jax.evaluation import metrics


def _smooth_images(rng, shape):
  """Images in [0.1, 0.9] with structure (so SSIM is meaningful), shape (..., H, W, 3)."""
  h, w = shape[-3], shape[-2]
  y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  phase = rng.uniform(0, 2 * np.pi, size=shape[:-3] + (1, 1, 3))
  img = 0.5 + 0.3 * np.sin(6 * x[..., None] + phase) * np.cos(4 * y[..., None] - phase)
  return (img + 0.05 * rng.normal(size=shape)).clip(0.1, 0.9).astype(np.float32)


# ----------------------------------------------------------------------------- PSNR


def test_psnr_of_gaussian_noise_matches_sigma():
  rng = np.random.default_rng(0)
  sigma = 0.05
  a = np.full((4, 64, 64, 3), 0.5, np.float32)
  b = a + rng.normal(scale=sigma, size=a.shape).astype(np.float32)
  values = np.asarray(metrics.psnr(a, b))
  assert values.shape == (4,)
  expected = 10 * np.log10(1.0 / sigma ** 2)  # 26.02 dB
  np.testing.assert_allclose(values, expected, atol=0.2)
  # The same noise on the 0..255 scale gives the same dB.
  np.testing.assert_allclose(np.asarray(metrics.psnr(a * 255, b * 255, data_range=255.0)),
                             values, atol=1e-3)


def test_psnr_identical_is_capped_and_batched():
  a = np.random.default_rng(1).uniform(size=(2, 3, 8, 8, 3)).astype(np.float32)
  values = np.asarray(metrics.psnr(a, a))
  assert values.shape == (2, 3)
  np.testing.assert_array_equal(values, metrics.DEFAULT_MAX_DB)
  assert float(metrics.psnr(a, a, max_db=60.0)[0, 0]) == 60.0


def test_psnr_uint8_does_not_wrap():
  a = np.zeros((1, 4, 4, 3), np.uint8)
  b = np.full((1, 4, 4, 3), 255, np.uint8)
  assert abs(float(metrics.psnr(a, b, data_range=255.0)[0])) < 1e-5  # MSE = 255^2 -> 0 dB


def test_masked_psnr_counts_only_the_mask():
  rng = np.random.default_rng(2)
  a = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  b = a + rng.normal(scale=0.1, size=a.shape).astype(np.float32)
  mask = np.zeros((2, 16, 16), bool)
  mask[:, :, :8] = True
  value = np.asarray(metrics.masked_psnr(a, b, mask))
  np.testing.assert_allclose(value, np.asarray(metrics.psnr(a[:, :, :8], b[:, :, :8])), rtol=1e-5)
  b2 = b.copy()
  b2[:, :, 8:] = rng.uniform(size=b2[:, :, 8:].shape)
  b2[0, 0, 15] = np.nan  # even non-finite values outside the mask must not leak in
  np.testing.assert_array_equal(np.asarray(metrics.masked_psnr(a, b2, mask)), value)


def test_masked_psnr_empty_mask_is_nan_and_skipped_by_mean():
  a = np.zeros((2, 4, 4, 3), np.float32)
  b = a + 0.1
  mask = np.zeros((2, 4, 4), bool)
  mask[1] = True
  value = np.asarray(metrics.masked_psnr(a, b, mask))
  assert np.isnan(value[0]) and abs(value[1] - 20.0) < 1e-4
  assert abs(float(metrics.frame_mean(value)) - 20.0) < 1e-4


# ----------------------------------------------------------------------------- SSIM


def test_ssim_identity_symmetry_and_noise_ordering():
  rng = np.random.default_rng(3)
  a = _smooth_images(rng, (2, 24, 24, 3))
  np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-5)
  noisy = [a + rng.normal(scale=s, size=a.shape).astype(np.float32) for s in (0.02, 0.05, 0.1, 0.2)]
  np.testing.assert_allclose(np.asarray(metrics.ssim(a, noisy[1])),
                             np.asarray(metrics.ssim(noisy[1], a)), atol=1e-6)
  values = np.stack([np.asarray(metrics.ssim(a, n)) for n in noisy])  # (4 noise levels, 2)
  assert np.all(np.diff(values, axis=0) < 0), values
  assert np.all(values < 1.0)


def test_masked_ssim_full_mask_equals_ssim_and_ignores_outside():
  rng = np.random.default_rng(4)
  a = _smooth_images(rng, (2, 24, 24, 3))
  b = a + rng.normal(scale=0.05, size=a.shape).astype(np.float32)
  full = np.ones((2, 24, 24), bool)
  np.testing.assert_allclose(np.asarray(metrics.masked_ssim(a, b, full)),
                             np.asarray(metrics.ssim(a, b)), atol=1e-5)
  mask = np.zeros((2, 24, 24), bool)
  mask[:, 4:20, 3:14] = True
  value = np.asarray(jax.jit(metrics.masked_ssim)(a, b, mask))
  b2 = b.copy()
  b2[:, ~mask[0]] = rng.uniform(size=b2[:, ~mask[0]].shape)
  value2 = np.asarray(metrics.masked_ssim(a, b2, mask))
  np.testing.assert_allclose(value2, value, atol=1e-6)
  # ...while the unmasked SSIM does see the change, and the masked value does see changes inside.
  assert np.all(np.abs(np.asarray(metrics.ssim(a, b2)) - np.asarray(metrics.ssim(a, b))) > 1e-2)
  b3 = b.copy()
  b3[:, mask[0]] = rng.uniform(size=b3[:, mask[0]].shape)
  assert np.all(np.asarray(metrics.masked_ssim(a, b3, mask)) < value - 0.1)


def test_masked_ssim_mask_outside_window_centres_is_nan():
  a = _smooth_images(np.random.default_rng(5), (1, 16, 16, 3))
  mask = np.zeros((1, 16, 16), bool)
  mask[0, 0, 0] = True  # the corner is never an 11x11 window centre
  assert np.isnan(float(metrics.masked_ssim(a, a, mask)[0]))


# ----------------------------------------------------------------------------- depth


def test_depth_metrics_known_values_and_invalid_pixels():
  gt = np.full((2, 8, 8), 2.0, np.float32)
  pred = np.stack([gt[0] * 1.1, gt[1] * 1.3])
  out = {k: np.asarray(v) for k, v in metrics.depth_metrics(pred, gt).items()}
  np.testing.assert_allclose(out["abs_rel"], [0.1, 0.3], rtol=1e-5)
  np.testing.assert_allclose(out["rmse"], [0.2, 0.6], rtol=1e-5)
  np.testing.assert_allclose(out["delta1"], [1.0, 0.0])
  # Invalid pixels (gt <= 0, non-finite, or masked out) change nothing.
  gt2, pred2 = gt.copy(), pred.copy()
  gt2[:, 0, :3] = [0.0, np.nan, np.inf]
  pred2[:, 0, :3] = 100.0
  pred2[:, 1, 0] = 50.0
  valid = np.ones_like(gt, bool)
  valid[:, 1, 0] = False
  out2 = metrics.depth_metrics(pred2, gt2, valid)
  for k in out:
    np.testing.assert_allclose(np.asarray(out2[k]), out[k], rtol=1e-5)
  assert np.isnan(float(metrics.depth_metrics(pred, gt, np.zeros_like(valid))["rmse"][0]))


# ----------------------------------------------------------------------------- geometric consistency

H = W = 32
PLANE_Z = 3.0


def _texture(points):
  """Colour as a smooth function of the 3D point, (..., 3) -> (..., 3) in [0.1, 0.9]."""
  x, y = points[..., 0], points[..., 1]
  return 0.5 + 0.4 * np.stack([np.sin(2 * np.pi * x / 1.5), np.cos(2 * np.pi * y / 1.5),
                               np.sin(2 * np.pi * (x + y) / 2.0)], axis=-1)


def _render_plane(K, c2w):
  """Analytic render of the plane world z = PLANE_Z: (H, W, 3) colours and (H, W) z-depth."""
  rays = np.asarray(geometry.camera_rays(K, H, W))            # camera frame, z = 1
  dirs = rays @ c2w[:3, :3].T                                 # world frame
  depth = (PLANE_Z - c2w[2, 3]) / dirs[..., 2]                # z-depth since ray z = 1
  points = c2w[:3, 3] + dirs * depth[..., None]
  return _texture(points).astype(np.float32), depth.astype(np.float32)


def _two_views():
  K = geometry.intrinsics_from_fov(60, H, W)
  c2w0 = np.eye(4, dtype=np.float32)
  c2w1 = geometry.look_at([0.3, -0.1, 0.2], [0.1, 0.0, PLANE_Z])
  views = [_render_plane(K, c) for c in (c2w0, c2w1)]
  frames = np.stack([v[0] for v in views])
  depths = np.stack([v[1] for v in views])
  return frames, depths, np.stack([K, K]), np.stack([c2w0, c2w1])


def test_geometric_consistency_high_for_consistent_render():
  frames, depths, Ks, poses = _two_views()
  out = metrics.geometric_consistency(frames, depths, Ks, poses)
  psnr, fraction = float(out["psnr"][0]), float(out["fraction"][0])
  assert out["psnr"].shape == (1,)
  assert psnr > 28.0, psnr
  assert 0.7 < fraction <= 1.0, fraction


def test_geometric_consistency_drops_when_a_frame_is_shifted():
  frames, depths, Ks, poses = _two_views()
  base = float(metrics.geometric_consistency(frames, depths, Ks, poses)["psnr"][0])
  shifted = frames.copy()
  shifted[1] = np.roll(frames[1], 3, axis=1)
  value = float(metrics.geometric_consistency(shifted, depths, Ks, poses)["psnr"][0])
  assert value < base - 8.0, (base, value)


def test_geometric_consistency_z_test_rejects_wrong_depth():
  frames, depths, Ks, poses = _two_views()
  wrong = depths.copy()
  wrong[1] *= 1.5  # view j now claims the plane is much farther: nothing passes the z-test
  out = metrics.geometric_consistency(frames, wrong, Ks, poses)
  assert float(out["fraction"][0]) == 0.0
  assert np.isnan(float(out["psnr"][0]))


def test_geometric_consistency_pairs_and_stride():
  frames, depths, Ks, poses = _two_views()
  frames3 = np.concatenate([frames, frames[:1]])
  depths3 = np.concatenate([depths, depths[:1]])
  out = metrics.geometric_consistency(frames3, depths3, np.concatenate([Ks, Ks[:1]]),
                                      np.concatenate([poses, poses[:1]]), stride=2)
  # Pair (0, 2) is the same camera twice: every pixel maps onto itself.
  assert float(out["fraction"][0]) == 1.0
  assert float(out["psnr"][0]) == metrics.DEFAULT_MAX_DB
  with pytest.raises(ValueError, match="stride"):
    metrics.geometric_consistency(frames, depths, Ks, poses, stride=2)
