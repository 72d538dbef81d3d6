"""Property tests (hypothesis): camera geometry and memory write/read over random inputs.

Geometry identities are checked in float64 (``jax.enable_x64``): they are exact maths, and
float32 round-off is a separate question. The memory properties run jitted float32 code
with fixed shapes (one compile per backend), random poses, depths, masks and latents.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.memory import MemoryConfig, get_backend

H, W, C = 6, 8, 3
PROPERTY = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- strategies


@st.composite
def rotations(draw) -> np.ndarray:
  """A uniformly oriented rotation matrix (3, 3) from a random unit quaternion."""
  q = draw(hnp.arrays(np.float64, 4, elements=st.floats(-1.0, 1.0)))
  assume(np.linalg.norm(q) > 0.1)
  w, x, y, z = q / np.linalg.norm(q)
  return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                   [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                   [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


@st.composite
def poses(draw, max_translation: float = 10.0) -> np.ndarray:
  """A rigid OpenCV c2w (4, 4)."""
  c2w = np.eye(4)
  c2w[:3, :3] = draw(rotations())
  c2w[:3, 3] = draw(hnp.arrays(np.float64, 3, elements=st.floats(-max_translation,
                                                                   max_translation)))
  return c2w


@st.composite
def intrinsics(draw, height: int = H, width: int = W) -> np.ndarray:
  """Pinhole K (3, 3) in pixels: focal lengths 2..500, principal point inside the image."""
  fx, fy = draw(st.floats(2.0, 500.0)), draw(st.floats(2.0, 500.0))
  cx, cy = draw(st.floats(0.0, float(width))), draw(st.floats(0.0, float(height)))
  return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


depth_maps = hnp.arrays(np.float64, (H, W), elements=st.floats(0.05, 100.0))


# ----------------------------------------------------------------------------- geometry


@PROPERTY
@given(K=intrinsics(), c2w=poses(), depth=depth_maps)
def test_project_after_unproject_is_identity(K, c2w, depth):
  with jax.enable_x64(True):
    points = geometry.unproject_depth(jnp.asarray(depth), jnp.asarray(K), jnp.asarray(c2w))
    uv, z = geometry.project_points(points.reshape(-1, 3), jnp.asarray(K), jnp.asarray(c2w))
    centres = geometry.pixel_grid(H, W, jnp.float64).reshape(-1, 2)
  np.testing.assert_allclose(np.asarray(uv), np.asarray(centres), atol=1e-6)
  np.testing.assert_allclose(np.asarray(z), depth.reshape(-1), rtol=1e-9)


@PROPERTY
@given(K=intrinsics(), c2w=poses(), depth=depth_maps,
       scale=st.tuples(st.floats(0.25, 4.0), st.floats(0.25, 4.0)))
def test_scaled_intrinsics_scale_the_projection(K, c2w, depth, scale):
  # Resizing an image by (sx, sy) maps continuous pixel coordinates x -> s * x exactly.
  sx, sy = scale
  with jax.enable_x64(True):
    points = geometry.unproject_depth(jnp.asarray(depth), jnp.asarray(K),
                                      jnp.asarray(c2w)).reshape(-1, 3)
    uv, _ = geometry.project_points(points, jnp.asarray(K), jnp.asarray(c2w))
    uv2, _ = geometry.project_points(points, geometry.scale_intrinsics(jnp.asarray(K), sx, sy),
                                     jnp.asarray(c2w))
  np.testing.assert_allclose(np.asarray(uv2), np.asarray(uv) * [sx, sy], rtol=1e-9, atol=1e-9)


@PROPERTY
@given(c2w=poses(), other=poses())
def test_inverse_pose_and_distance(c2w, other):
  with jax.enable_x64(True):
    eye = geometry.invert_pose(jnp.asarray(c2w)) @ jnp.asarray(c2w)
    dt, angle = geometry.pose_distance(jnp.asarray(c2w), jnp.asarray(other))
    dt_back, angle_back = geometry.pose_distance(jnp.asarray(other), jnp.asarray(c2w))
  np.testing.assert_allclose(np.asarray(eye), np.eye(4), atol=1e-12)
  assert float(dt) == pytest.approx(np.linalg.norm(c2w[:3, 3] - other[:3, 3]), abs=1e-9)
  assert 0 <= float(angle) <= np.pi + 1e-9
  assert float(angle) == pytest.approx(float(angle_back), abs=1e-6)  # symmetric
  assert float(dt) == pytest.approx(float(dt_back))


@PROPERTY
@given(trajectory=st.lists(poses(), min_size=1, max_size=5), K=intrinsics())
def test_valid_cameras_pass_the_checks(trajectory, K):
  c2w = np.stack(trajectory).astype(np.float32)  # as files store them
  geometry.check_poses(c2w, "clip")
  geometry.check_intrinsics(np.broadcast_to(K, (len(c2w), 3, 3)), "clip")


CORRUPTIONS = {
    # kind: (corrupt(pose, amount) -> pose, text of the message)
    "scaled": (lambda p, a: p @ np.diag([1.0 + 0.01 + a, 1.0, 1.0, 1.0]), "not orthonormal"),
    "shrunk": (lambda p, a: p @ np.diag([1.0, 1.0 / (1.02 + a), 1.0, 1.0]), "not orthonormal"),
    "reflected": (lambda p, a: p @ np.diag([1.0, 1.0, -1.0, 1.0]), "det"),
    "skewed": (lambda p, a: p + np.pad([[0.0, 0.05 + a, 0.0]], ((0, 3), (0, 1))), "not orthonormal"),
    "nan": (lambda p, a: np.where(np.arange(16).reshape(4, 4) == int(a * 11), np.nan, p),
            "non-finite"),
    "inf_translation": (lambda p, a: p + np.pad([[np.inf]], ((0, 3), (3, 0))), "non-finite"),
    "last_row": (lambda p, a: p + np.pad([[0.1 + a]], ((3, 0), (0, 3))), "last row"),
}


@PROPERTY
@given(trajectory=st.lists(poses(), min_size=1, max_size=5), data=st.data(),
       kind=st.sampled_from(sorted(CORRUPTIONS)), amount=st.floats(0.0, 1.0))
def test_corrupted_pose_is_rejected_naming_its_frame(trajectory, data, kind, amount):
  frame = data.draw(st.integers(0, len(trajectory) - 1))
  corrupt, text = CORRUPTIONS[kind]
  c2w = np.stack(trajectory)
  c2w[frame] = corrupt(c2w[frame], amount)
  with pytest.raises(InputError) as info:
    geometry.check_poses(c2w.astype(np.float32), "clip.npz")
  message = str(info.value)
  assert info.value.field == "poses_c2w" and text in message, message
  assert f"frame {frame}" in message, message


@PROPERTY
@given(K=intrinsics(), which=st.sampled_from([(0, 0), (1, 1)]), bad=st.floats(-100.0, 0.0))
def test_non_positive_focal_length_is_rejected(K, which, bad):
  K = K.copy()
  K[which] = bad
  with pytest.raises(InputError, match="focal"):
    geometry.check_intrinsics(K[None], "clip.npz")


# ----------------------------------------------------------------------------- memory


def _memory_config(capacity: int = 4 * H * W) -> MemoryConfig:
  return MemoryConfig(image_height=H, image_width=W, latent_height=H, latent_width=W,
                      latent_channels=C, capacity=capacity, feature_dtype="float32",
                      voxel_size=0.05, splat_radius=1)


@functools.lru_cache(maxsize=None)
def _write_read(name: str, capacity: int = 4 * H * W):
  """Jitted: write F frames into a fresh memory, read into F cameras; returns also nbytes."""
  be, cfg = get_backend(name), _memory_config(capacity)

  @jax.jit
  def run(latents, depth, K, c2w, mask, read_K, read_c2w):
    state = be.write(be.init(cfg), latents, depth, K, c2w, mask,
                     jnp.arange(len(latents), dtype=jnp.int32))
    return be.read(state, read_K, read_c2w), state

  return run, be


frame_latents = hnp.arrays(np.float32, (1, H, W, C), elements=st.floats(-4.0, 4.0, width=32))
frame_depths = hnp.arrays(np.float32, (1, H, W), elements=st.floats(0.25, 20.0, width=32))
masks = hnp.arrays(np.bool_, (1, H, W))


@PROPERTY
@given(K=intrinsics(), c2w=poses(), depth=frame_depths, latents=frame_latents, mask=masks)
def test_mirage_reads_back_what_it_wrote_exactly_where_it_wrote(K, c2w, depth, latents, mask):
  run, _ = _write_read("mirage")
  K1, c2w1 = K[None].astype(np.float32), c2w[None].astype(np.float32)
  (read, coverage), _ = run(latents, depth, K1, c2w1, mask, K1, c2w1)
  coverage = np.asarray(coverage)
  np.testing.assert_array_equal(coverage, mask)  # every static pixel, no masked one
  np.testing.assert_array_equal(np.asarray(read)[coverage], latents[coverage])
  assert not np.asarray(read)[~coverage].any()  # empty cells read as zeros


@PROPERTY
@given(K=intrinsics(), c2w=poses(), depth=frame_depths, latents=frame_latents,
       mask=masks, view=poses(max_translation=1.0))
def test_voxel_read_is_a_mix_of_written_static_latents(K, c2w, depth, latents, mask, view):
  # Voxels average the samples that fall in them: whatever any camera reads lies inside the
  # range of the static latents written, and a fully masked frame writes nothing at all.
  run, be = _write_read("voxel")
  K1, c2w1 = K[None].astype(np.float32), c2w[None].astype(np.float32)
  views = np.stack([c2w, view]).astype(np.float32)
  (read, coverage), state = run(latents, depth, K1, c2w1, mask, np.repeat(K1, 2, 0), views)
  read, coverage = np.asarray(read), np.asarray(coverage)
  assert be.nbytes(state) <= be.capacity_bytes(state)
  if not mask.any():
    assert not coverage.any() and be.nbytes(state) == 0
    return
  static = latents[mask]  # (n, C)
  seen = read[coverage]
  assert np.all(seen >= static.min(0) - 1e-5) and np.all(seen <= static.max(0) + 1e-5)
  assert not read[~coverage].any()


@PROPERTY
@given(K=intrinsics(), c2w=poses(), depth=frame_depths, latents=frame_latents)
def test_a_full_mirage_buffer_keeps_the_newest_points(K, c2w, depth, latents):
  # Capacity for one frame's worth of points: writing the frame twice, with other latents
  # the second time, must read back only the second one.
  capacity = H * W
  run, _ = _write_read("mirage", capacity)
  K2 = np.repeat(K[None], 2, 0).astype(np.float32)
  c2w2 = np.repeat(c2w[None], 2, 0).astype(np.float32)
  both = np.concatenate([latents, latents + 10.0])
  mask = np.ones((2, H, W), bool)
  (read, coverage), _ = run(both, np.repeat(depth, 2, 0), K2, c2w2, mask, K2[:1], c2w2[:1])
  np.testing.assert_array_equal(np.asarray(coverage), mask[:1])
  np.testing.assert_array_equal(np.asarray(read), latents + 10.0)
