"""Reference frames: voxel-IoU retrieval shared by rollout and training, as clean context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax import geometry, rollout
from mirage_jax.families.small import conditioning as small_conditioning
from mirage_jax import memory as memory_lib
from mirage_jax import families
from mirage_jax.memory import frame_bank, splatting
from mirage_jax.memory.config import MemoryConfig
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser
from mirage_jax.families.small import stages as small_stages
from tests.test_rollout import _trajectory
from tests.test_train import _batch, _mesh_config, _one_step, tiny_config

H = W = 32
CFG = MemoryConfig(image_height=H, image_width=W, latent_height=16, latent_width=16,
                                latent_channels=4, capacity=1)
K = geometry.intrinsics_from_fov(70, H, W)
# Bank cameras at the centre of a 2 m box room, by yaw (0 = looking at the +z wall).
# 180 looks away and 90 at another wall (no overlap with a +z target); 65 overlaps a sliver
# (0 < IoU < 0.04); 10, 50, 60 overlap more and more weakly.
YAWS = (0, 180, 90, 10, 50, 60, 65)


def _camera(yaw_deg):
  a = np.radians(yaw_deg)
  return geometry.look_at([0, 0, 0], [np.sin(a), 0, np.cos(a)], up=(0, -1, 0)).astype(np.float32)


def _box_depth(c2w, half=1.0):
  """(H, W) z-depth of the inside of the box [-half, half]^3 seen from ``c2w``."""
  d = np.asarray(geometry.camera_rays(jnp.asarray(K), H, W)) @ c2w[:3, :3].T  # z = 1 rays
  o = c2w[:3, 3]
  with np.errstate(divide="ignore"):
    t = np.where(d > 0, (half - o) / d, np.where(d < 0, (-half - o) / d, np.inf))
  return t.min(-1).astype(np.float32)


def _bank(yaws=YAWS):
  s = len(yaws)
  poses = np.stack([_camera(y) for y in yaws])
  latents = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32)[:, None, None, None], (s, 16, 16, 4))
  depths = jnp.asarray(np.stack([_box_depth(p) for p in poses]))
  return frame_bank.write(
      memory_lib.references.reference_bank_init(CFG, s), latents, depths, jnp.asarray(np.repeat(K[None], s, 0)),
      jnp.asarray(poses), jnp.ones((s, H, W), bool), jnp.arange(s, dtype=jnp.int32))


# One compiled retrieval for every check here: k = S (all bank frames ranked).
_retrieve_all = jax.jit(lambda bank, eligible, K_, c2w: memory_lib.references.retrieve_references(
    bank, eligible, K_, c2w, bank.frame.shape[0]))


def _targets():
  return jnp.asarray(np.repeat(K[None], 2, 0)), jnp.asarray(np.stack([_camera(0), _camera(-5)]))


def test_retrieval_picks_frames_that_saw_the_target_by_iou():
  bank = _bank()
  s = len(YAWS)
  lat, ref_K, ref_c2w, slots, found = _retrieve_all(bank, jnp.ones((s,), bool), *_targets())
  # Best first; looking away (180) or at another wall (90) never passes; the sliver (65)
  # has a positive IoU below 0.04, so it is not kept either; the rest fall back.
  np.testing.assert_array_equal(slots[:4], [0, 3, 4, 5])
  np.testing.assert_array_equal(found, [True] * 4 + [False] * 3)
  np.testing.assert_array_equal(slots[4:], [s - 1] * 3)  # fallback: the newest frame
  np.testing.assert_array_equal(lat[:, 0, 0, 0], np.asarray(slots, np.float32))
  np.testing.assert_allclose(ref_K, np.repeat(K[None], s, 0), rtol=1e-6)  # image resolution
  np.testing.assert_allclose(ref_c2w, np.stack([_camera(YAWS[i]) for i in slots]), atol=1e-6)


def test_retrieval_respects_eligibility_and_keeps_shapes_when_nothing_passes():
  bank = _bank()
  s = len(YAWS)
  not_first = jnp.arange(s) > 0
  _, _, _, slots, found = _retrieve_all(bank, not_first, *_targets())
  np.testing.assert_array_equal(slots[:3], [3, 4, 5])
  np.testing.assert_array_equal(found, [True] * 3 + [False] * (s - 3))
  # Only frames that saw nothing of the target are eligible: fallback in every slot.
  away = jnp.asarray([y in (180, 90) for y in YAWS])
  lat, ref_K, ref_c2w, slots, found = _retrieve_all(bank, away, *_targets())
  assert lat.shape == (s, 16, 16, 4) and ref_K.shape == (s, 3, 3) and ref_c2w.shape == (s, 4, 4)
  assert not found.any()
  np.testing.assert_array_equal(slots, [s - 1] * s)


@pytest.fixture(scope="module")
def models():
  config = tiny_config("denoiser")
  config.denoiser.update(reference_frames=1, reference_bank=4)
  ae = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))
  dn = denoiser.Denoiser(config.denoiser.model, nnx.Rngs(1))
  return config, ae, dn


def test_rollout_with_references_fixed_bank_and_no_recompile(models):
  config, ae, dn = models
  h, w = config.data.resolution
  r = rollout.make_rollout(config, ae, dn, backend="voxel")
  frame0 = np.zeros((h, w, 3), np.uint8)
  depth0 = np.full((h, w), 2.0, np.float32)
  sizes, ref_bytes = [], []
  for n in (5, 11):  # longer trajectories reuse the compiled chunk step
    K_, poses = _trajectory(n, h, w)
    out = r.generate(frame0, depth0, K_, poses, progress=False)
    assert out["frames"].shape == (n, h, w, 3)
    (fns,) = r._per_mesh.values()
    sizes.append([fns[k]._cache_size() for k in ("start", "encode")] + [fns["step"][False]._cache_size()])
    ref_bytes.append(out["reference_bytes"])
    nc, f = config.denoiser.context_frames, config.denoiser.target_frames
    refs = out["references"]
    assert refs.shape == (len(range(1, n, f)), 1)
    for i, (ref,) in enumerate(refs):
      start = 1 + i * f
      # An earlier frame than the context, or none passed (the newest banked frame stood in).
      assert 0 <= ref < start - nc or ref == -1
    assert n < 11 or (refs >= 0).any()  # on the way back, frames seen before pass
  assert sizes[0] == sizes[1] and sizes[0][-1] == 1
  full = memory_lib.references.reference_bank_init(r.memory_cfg, config.denoiser.reference_bank)
  full = full.replace(valid=jnp.ones_like(full.valid))
  assert ref_bytes[0] == ref_bytes[1] == frame_bank.nbytes(full)


def test_denoiser_stage_trains_with_references(models):
  config = tiny_config("denoiser")
  config.denoiser.reference_frames = 1
  config.data.batch_size = 2
  frozen = nnx.state(models[1], nnx.Param).to_pure_dict()  # the same tiny autoencoder
  batch = _batch(config)
  m1, m2, _ = _one_step(_mesh_config(config, fsdp=1), batch, frozen)
  for m in (m1, m2):
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0

  # Context = [the retrieved memory frame, the last context_frames memory frames].
  d = config.denoiser
  m, nc = d.memory_frames, d.context_frames
  stage = small_stages.DenoiserStage(config, frozen)
  shape = (config.data.batch_size, m + d.target_frames, *stage.latent_hw,
           config.autoencoder.latent_channels)
  latents = jax.random.normal(jax.random.key(0), shape)
  cond = jax.jit(stage._condition)(latents, {k: jnp.asarray(batch[k]) for k in stage.fields})
  assert cond["context"].shape[1] == cond["context_rays"].shape[1] == 1 + nc
  np.testing.assert_array_equal(cond["context"][:, 1:], latents[:, m - nc:m])
  # The reference is one of the memory frames (stored in the bank's bfloat16).
  stored = latents[:, :m].astype(stage.memory_cfg.dtype).astype(jnp.float32)
  assert (jnp.abs(stored - cond["context"][:, :1]).max(axis=(2, 3, 4)) == 0).any(axis=1).all()

  k0 = tiny_config("denoiser")
  extra = (stage.step_flops(2) - small_stages.DenoiserStage(k0, frozen).step_flops(2))
  h, w = stage.latent_hw
  expect = 3.0 * (denoiser.denoiser_flops(d.model, 2, d.target_frames, nc + 1, h, w)
                  - denoiser.denoiser_flops(d.model, 2, d.target_frames, nc, h, w))
  assert extra == pytest.approx(expect) and extra > 0


def test_bad_reference_settings_are_rejected():
  config = tiny_config("denoiser")
  config.denoiser.reference_frames = config.denoiser.memory_frames + 1
  with pytest.raises(Exception, match="reference_frames"):
    small_stages.DenoiserStage(config, {})
  config.denoiser.update(reference_frames=2, reference_bank=1)
  with pytest.raises(Exception, match="reference_bank"):
    small_conditioning.reference_settings(config)
