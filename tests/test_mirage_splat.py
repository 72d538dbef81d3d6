"""The ``mirage`` memory backend against the reference's own LatentPointCloud.

The golden ``tests/goldens/mirage_splat.npz`` is made by hand by
``tests/goldens/make_splat_goldens.py`` (see its docstring): the reference's
``LatentPointCloud`` (one CPU thread, float32) writes 5 frames of a procedural clip in our
format with random 16-channel latents at a 12x16 grid (stride 16) and reads them into 12
target cameras, 11 of them at poses never written. Here our backend writes and reads the same
inputs.

What may differ: the winner of an *exact* depth tie. The reference orders equal depths with
an unstable sort (arbitrary); we give a tie to the newest point. Level cameras and vertical
walls make such ties common here (points of one column at the same depth share a target
cell), so the bar is: cells match exactly, or are exact ties that the reference gave to one
of the tied points. The tie fraction is measured and bounded, so the allowance cannot hide a
broken z-buffer, and the old pixel-centre convention must fail the same bar.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.errors import InputError
from mirage_jax.memory import MemoryConfig, get_backend, mirage, splatting
from mirage_jax.memory.mirage import latent_frame_indices
from tests.conftest import PRODUCTION_COMPILER_OPTIONS

GOLDEN = os.path.join(os.path.dirname(__file__), "goldens", "mirage_splat.npz")
BAR = 0.99
MAX_TIE_FRACTION = 0.1  # of covered cells; the allowance above only covers these


@functools.lru_cache(maxsize=None)
def _golden():
  with np.load(GOLDEN, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  data["config"] = json.loads(str(data["config"]))
  return data


def _setup():
  g = _golden()
  (H, W), (h, w), c = g["config"]["image_hw"], g["config"]["latent_hw"], g["config"]["channels"]
  f = g["inputs/latents"].shape[0]
  cfg = MemoryConfig(image_height=H, image_width=W, latent_height=h, latent_width=w,
                     latent_channels=c, capacity=f * h * w, feature_dtype="float32")
  frames = dict(latents=jnp.asarray(g["inputs/latents"]),
                depth=jnp.asarray(g["inputs/depths"].astype(np.float32)),
                intrinsics=jnp.asarray(g["inputs/intrinsics"]),
                c2w=jnp.asarray(g["inputs/poses_c2w"]),
                static_mask=jnp.asarray(~g["inputs/exclusion"]),
                frame_index=jnp.asarray(g["config"]["write_frames"], jnp.int32))
  return g, cfg, frames


@functools.lru_cache(maxsize=None)
def _ours():
  """Our mirage backend on the golden's inputs: (state, latents (T, h, w, C), coverage)."""
  g, cfg, frames = _setup()
  be = get_backend("mirage")
  state = jax.jit(be.write)(be.init(cfg), **frames)
  lat, cov = jax.jit(be.read)(state, jnp.asarray(g["targets/intrinsics"]),
                              jnp.asarray(g["targets/poses_c2w"]))
  return state, np.asarray(lat), np.asarray(cov)


@functools.lru_cache(maxsize=None)
def _ties():
  """Per target cell, the points at its closest depth under the reference's conventions.

  Returns:
    tied (T, h, w) bool: two or more points share the cell's closest depth exactly;
    closest_sets: list over targets of dicts cell -> array of those points' slots.
  """
  g, cfg, _ = _setup()
  state, _, _ = _ours()
  h, w = cfg.latent_height, cfg.latent_width
  scale = np.array([w / cfg.image_width, h / cfg.image_height, 1.0], np.float32)[:, None]
  K = jnp.asarray(g["targets/intrinsics"] * scale)
  cells, z = jax.jit(jax.vmap(lambda K1, c1: mirage.reference_cells(
      state.points, state.valid, K1, c1, h, w)))(K, jnp.asarray(g["targets/poses_c2w"]))
  cells, z = np.asarray(cells), np.asarray(z)
  tied = np.zeros((len(cells), h * w), bool)
  sets = []
  for t in range(len(cells)):
    hit = cells[t] < h * w
    zmin = np.full(h * w, np.inf, np.float32)
    np.minimum.at(zmin, cells[t][hit], z[t][hit])
    closest = np.flatnonzero(hit & (z[t] == zmin[np.minimum(cells[t], h * w - 1)]))
    per_cell = {}
    for i in closest:
      per_cell.setdefault(int(cells[t][i]), []).append(int(i))
    sets.append({k: np.array(v) for k, v in per_cell.items()})
    for k, v in per_cell.items():
      tied[t, k] = len(v) > 1
  return tied.reshape(len(cells), h, w), sets


def _agreement(lat, cov):
  """(exact, allowing ties) fractions of target cells where (lat, cov) agrees with the reference.

  A cell agrees exactly when coverage and all channels are equal; it agrees allowing ties
  when, besides, it is an exact depth tie and both sides hold one of the tied points.
  """
  g = _golden()
  state, _, _ = _ours()
  ref_lat, ref_cov = g["reference/latents"], g["reference/coverage"]
  exact = (cov == ref_cov) & np.all(lat == ref_lat, axis=-1)
  tied, sets = _ties()
  feats = np.asarray(state.features)
  ok = exact.copy()
  w = ref_cov.shape[2]
  for t, r, c in zip(*np.nonzero(~exact & tied & cov & ref_cov)):
    cand = feats[sets[t][int(r * w + c)]]
    ok[t, r, c] = (np.any(np.all(cand == ref_lat[t, r, c], -1))
                   and np.any(np.all(cand == lat[t, r, c], -1)))
  return float(exact.mean()), float(ok.mean())


def test_write_lifts_the_same_points_as_the_reference():
  state, _, _ = _ours()
  ref = _golden()["reference/points"]
  ours = np.asarray(state.points)[np.asarray(state.valid)]  # slots are in append order here
  assert ours.shape == ref.shape
  # Same points up to float32 rounding of the pose product (~1 ulp of a 10 m coordinate).
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_read_matches_the_reference_up_to_exact_depth_ties():
  g = _golden()
  _, lat, cov = _ours()
  ref_cov = g["reference/coverage"]
  tied, _ = _ties()
  exact, allowing_ties = _agreement(lat, cov)
  tie_fraction = float(tied[ref_cov].mean())
  print(f"mirage vs reference: coverage {np.mean(cov == ref_cov):.4f}, exact {exact:.4f}, "
        f"allowing ties {allowing_ties:.4f}, exact-tie cells {tie_fraction:.4f} of covered")
  assert 0.2 < ref_cov.mean() < 1.0  # the targets see part, not all, of the cloud
  assert np.mean(cov == ref_cov) >= BAR
  assert allowing_ties >= BAR
  assert tie_fraction <= MAX_TIE_FRACTION
  # Everything not explained by a tie agrees exactly.
  assert exact >= allowing_ties - tie_fraction * ref_cov.mean()


def test_old_pixel_centre_convention_fails_the_bar():
  # The old backend: rays through pixel centres (u + 0.5), min-pooled masks, cells by floor
  # (``splatting.lift_frames`` + ``splatting.splat``, which the other backends keep).
  g, cfg, fr = _setup()
  h, w, c = cfg.latent_height, cfg.latent_width, cfg.latent_channels

  @jax.jit
  def old(K_img, c2w):
    pts, valid = splatting.lift_frames(cfg, fr["depth"], fr["intrinsics"], fr["c2w"],
                                       fr["static_mask"], h, w)
    K = splatting.latent_intrinsics(cfg, K_img)
    splat = lambda K1, p1: splatting.splat(pts.reshape(-1, 3), fr["latents"].reshape(-1, c),
                                           valid.reshape(-1), K1, p1, h, w, cfg.near)[:2]
    return jax.vmap(splat)(K, c2w)

  lat, cov = old(jnp.asarray(g["targets/intrinsics"]), jnp.asarray(g["targets/poses_c2w"]))
  exact, allowing_ties = _agreement(np.asarray(lat), np.asarray(cov))
  print(f"old convention vs reference: exact {exact:.4f}, allowing ties {allowing_ties:.4f}")
  assert allowing_ties < BAR - 0.1


def test_half_pixel_shift_of_the_target_camera_fails_the_bar():
  # Our backend, read with the principal point off by half a latent pixel.
  g, cfg, _ = _setup()
  state, _, _ = _ours()
  shift = np.zeros((3, 3), np.float32)
  shift[0, 2] = 0.5 * cfg.image_width / cfg.latent_width
  shift[1, 2] = 0.5 * cfg.image_height / cfg.latent_height
  lat, cov = jax.jit(get_backend("mirage").read)(
      state, jnp.asarray(g["targets/intrinsics"] + shift), jnp.asarray(g["targets/poses_c2w"]))
  _, allowing_ties = _agreement(np.asarray(lat), np.asarray(cov))
  assert allowing_ties < BAR - 0.1


def test_depth_resize_and_mask_resize_are_the_reference_s():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  for (H, W, h, w) in [(192, 256, 12, 16), (50, 70, 12, 16), (13, 17, 12, 16)]:
    depth = rng.uniform(0.5, 20.0, (2, H, W)).astype(np.float32)
    mask = rng.uniform(size=(2, H, W)) > 0.5
    # Bit for bit under XLA's production settings (the suite's fast-compile ones differ from
    # torch in the last bits: conftest.FAST_COMPILE_FLAGS).
    resize = jax.jit(mirage._bilinear_depth, static_argnums=(1, 2)).lower(
        jnp.asarray(depth), h, w).compile(PRODUCTION_COMPILER_OPTIONS)
    ours = resize(jnp.asarray(depth))
    ref = F.interpolate(torch.from_numpy(depth)[:, None], size=(h, w), mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    np.testing.assert_array_equal(np.asarray(ours), ref)
    ours_m = mirage._nearest_mask(jnp.asarray(mask), h, w)
    ref_m = F.interpolate(torch.from_numpy(mask.astype(np.float32))[:, None], size=(h, w),
                          mode="nearest")[:, 0].numpy() > 0
    np.testing.assert_array_equal(np.asarray(ours_m), ref_m)


def test_mask_is_sampled_not_pooled():
  # The reference resizes the exclusion mask by nearest sampling: latent cell (i, j) follows
  # full-resolution pixel (2i, 2j) only, whatever the other pixels of its block say.
  H = W = 8
  cfg = MemoryConfig(image_height=H, image_width=W, latent_height=4, latent_width=4,
                     latent_channels=2, capacity=16, feature_dtype="float32")
  static = np.zeros((1, H, W), bool)
  static[:, ::2, ::2] = True  # only the sampled pixels are static
  K = np.array([[[4.0, 0.0, 4.0], [0.0, 4.0, 4.0], [0.0, 0.0, 1.0]]], np.float32)
  be = get_backend("mirage")
  state = be.write(be.init(cfg), jnp.ones((1, 4, 4, 2)), jnp.full((1, H, W), 2.0), jnp.asarray(K),
                   jnp.eye(4)[None], jnp.asarray(static), jnp.zeros((1,), jnp.int32))
  assert int(state.valid.sum()) == 16
  state = be.write(be.init(cfg), jnp.ones((1, 4, 4, 2)), jnp.full((1, H, W), 2.0), jnp.asarray(K),
                   jnp.eye(4)[None], jnp.asarray(~static), jnp.zeros((1,), jnp.int32))
  assert int(state.valid.sum()) == 0


def test_exact_ties_go_to_the_newest_point_across_the_ring_wrap():
  # Three writes of the same geometry with different latents into room for two: the third
  # overwrote the first's slots (lower slot numbers than the second's) and must still win.
  h = w = 4
  cfg = MemoryConfig(image_height=h, image_width=w, latent_height=h, latent_width=w,
                     latent_channels=1, capacity=2 * h * w, feature_dtype="float32")
  K = jnp.asarray([[[3.0, 0.0, 1.5], [0.0, 3.0, 1.5], [0.0, 0.0, 1.0]]], jnp.float32)
  c2w = jnp.eye(4)[None]
  be = get_backend("mirage")
  write = jax.jit(be.write)
  state = be.init(cfg)
  for k in range(3):
    state = write(state, jnp.full((1, h, w, 1), float(k)), jnp.full((1, h, w), 3.0), K, c2w,
                  jnp.ones((1, h, w), bool), jnp.full((1,), k, jnp.int32))
  lat, cov = be.read(state, K, c2w)
  assert bool(cov.all())
  np.testing.assert_array_equal(np.asarray(lat), 2.0)


def test_latent_frame_indices_follow_the_reference():
  # A Wan chunk of 4 N + 1 frames has N + 1 latents: latent k goes with frame 4 k.
  np.testing.assert_array_equal(latent_frame_indices(33), np.arange(0, 33, 4))
  assert len(latent_frame_indices(33)) == (33 - 1) // 4 + 1
  np.testing.assert_array_equal(latent_frame_indices(1), [0])
  # Training's scene projections: targets [t0, t0 + 33) and the 8 preceding frames, [::4].
  t0 = 40
  np.testing.assert_array_equal(latent_frame_indices(33, start=t0), list(range(t0, t0 + 33))[::4])
  np.testing.assert_array_equal(latent_frame_indices(8, start=t0 - 8), [t0 - 8, t0 - 4])
  np.testing.assert_array_equal(latent_frame_indices(9, temporal_stride=2), [0, 2, 4, 6, 8])
  # The golden writes the frames a 17-frame chunk's latents go with.
  np.testing.assert_array_equal(latent_frame_indices(17), _golden()["config"]["write_frames"])
  for bad in (dict(num_video_frames=0), dict(num_video_frames=5, temporal_stride=0)):
    with pytest.raises(InputError):
      latent_frame_indices(**bad)
