"""Memory work of the training step on a batch-sharded mesh: every device writes and reads
the memories of its own examples (no collective in the compiled HLO), and the object slots'
component labelling runs one loop per example under vmap (no batch-wide loop predicate)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from experiments import mirage_wan22_5b
from mirage_jax import memory as memory_lib
from mirage_jax.families.small import stages as small_stages
from mirage_jax.families.wan import stages as wan_stage
from mirage_jax.memory import objects
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib
from tests.test_train import _batch, _mesh_config, random_frozen_autoencoder, tiny_config

_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
                "reduce-scatter")


def _collectives(compiled) -> dict[str, int]:
  text = compiled.as_text()
  return {k: len(re.findall(k, text)) for k in _COLLECTIVES if re.search(k, text)}


def _batch_sharded(mesh, setup, tree):
  axes = mesh_lib.batch_axes(mesh, setup.rules)
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(axes))),
                      tree)


def _assert_batch_sharded(mesh, setup, tree):
  axes = mesh_lib.batch_axes(mesh, setup.rules)
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(axes)), x.ndim), (
        jax.tree_util.keystr(path), x.sharding)


@pytest.mark.parametrize("mesh", [dict(fsdp=8), dict(data=2, fsdp=4)])
def test_denoiser_memory_write_read_has_no_collective(mesh):
  # Voxel memory, object slots and the reference frame bank, 8 clips over 8 devices.
  config = _mesh_config(tiny_config("denoiser"), **mesh)
  config.denoiser.reference_frames = 1
  frozen = random_frozen_autoencoder(config)
  stage = small_stages.DenoiserStage(config, frozen)
  assert stage.object_cfg is not None and stage.refs.frames > 0
  mesh = mesh_lib.build_mesh(config)
  setup = step_lib.make_setup(config, stage, mesh)
  batch = {k: jnp.asarray(v) for k, v in _batch(config).items() if k in stage.fields}
  latents = jax.jit(stage._encode)(frozen, batch["frames"], batch["depths"])
  expected = jax.jit(stage._condition)(latents, batch)  # no mesh: one device, plain vmap
  with setup.context():
    latents_sh, batch_sh = _batch_sharded(mesh, setup, (latents, batch))
    condition = jax.jit(stage._condition)
    assert _collectives(condition.lower(latents_sh, batch_sh).compile()) == {}
    out = condition(latents_sh, batch_sh)
  _assert_batch_sharded(mesh, setup, out)
  assert float(out["coverage"].mean()) > 0.05
  for k in expected:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(expected[k]), rtol=1e-5, atol=1e-5)


def wan_memory_batch(stage, seed: int = 0) -> dict:
  """Random latents and depths, cameras stepping sideways (reads see shifted content)."""
  rng = np.random.default_rng(seed)
  shapes = stage.batch_shapes()
  b, f = shapes["target_latents"][0][0], shapes["intrinsics"][0][1]
  h, w = stage.latent_hw
  K = np.broadcast_to(np.array([[16.0 * w, 0, 8.0 * w], [0, 16.0 * w, 8.0 * h], [0, 0, 1]],
                               np.float32), (b, f, 3, 3))
  c2w = np.broadcast_to(np.eye(4, dtype=np.float32), (b, f, 4, 4)).copy()
  c2w[:, :, 0, 3] = rng.uniform(-0.2, 0.2, (b, f))
  batch = {"target_latents": rng.normal(size=shapes["target_latents"][0]).astype(np.float32),
           "preceding_latents": rng.normal(size=shapes["preceding_latents"][0]).astype(np.float32),
           "depths": rng.uniform(1.0, 3.0, (b, f, h, w)).astype(np.float32),
           "static_masks": np.ones((b, f, h, w), bool), "intrinsics": K, "poses_c2w": c2w}
  return jax.tree.map(jnp.asarray, batch)


def test_wan_memory_read_has_no_collective():
  config = _mesh_config(mirage_wan22_5b.get_config("tiny"), fsdp=8)
  config.data.batch_size = 8
  stage = wan_stage.WanStage(config, "abstract")
  mesh = mesh_lib.build_mesh(config)
  setup = step_lib.make_setup(config, stage, mesh)
  batch = wan_memory_batch(stage)
  expected = jax.jit(stage.memory_read)(batch)
  with setup.context():
    batch_sh = _batch_sharded(mesh, setup, batch)
    read = jax.jit(stage.memory_read)
    assert _collectives(read.lower(batch_sh).compile()) == {}
    out = read(batch_sh)
  _assert_batch_sharded(mesh, setup, out)
  assert 0.05 < float(out[1].mean())
  for a, e in zip(out, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_batch_map_without_a_batch_axis_is_the_plain_vmap():
  x = jnp.arange(12.0).reshape(6, 2)  # 6 examples do not split over 8 devices
  config = _mesh_config(tiny_config("denoiser"), fsdp=8)
  mesh = mesh_lib.build_mesh(config)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda x: memory_lib.batch_map(lambda r: r * 2, x))(x)
  np.testing.assert_array_equal(out, 2 * x)


# ----------------------------------------------------------------------------- object slots


def _while_conditions(jaxpr):
  """Primitive names in the condition of every while loop of ``jaxpr`` (nested too)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      found.append({e.primitive.name for e in eqn.params["cond_jaxpr"].jaxpr.eqns})
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found += _while_conditions(sub)
  return found


def _blobs(rng, n, h, w):
  """(n, h, w) masks: random blobs, including long snakes (many loop iterations)."""
  masks = rng.uniform(size=(n, h, w)) < rng.uniform(0.2, 0.7, (n, 1, 1))
  masks[0] = False
  masks[0, ::2, :] = True  # a serpentine: rows joined at alternate ends
  masks[0, 1::4, -1] = True
  masks[0, 3::4, 0] = True
  masks[1] = False  # an empty frame converges at once
  return masks


def test_components_under_vmap_match_per_example_and_connectivity():
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(0)
  masks = _blobs(rng, 6, 9, 11)
  batched = np.asarray(jax.jit(jax.vmap(objects._components))(jnp.asarray(masks)))
  nested = np.asarray(jax.jit(jax.vmap(jax.vmap(objects._components)))(
      jnp.asarray(masks.reshape(2, 3, 9, 11)))).reshape(batched.shape)
  np.testing.assert_array_equal(nested, batched)
  n = 9 * 11
  for mask, labels in zip(masks, batched):
    np.testing.assert_array_equal(labels, np.asarray(jax.jit(objects._components)(mask)))
    # Same partition as scipy's 4-connected labelling; each label is its component's
    # smallest flat index.
    ref, count = scipy_ndimage.label(mask)
    assert np.all(labels[~mask] == n)
    for c in range(1, count + 1):
      cells = np.flatnonzero(ref == c)
      assert np.all(labels.reshape(-1)[cells] == cells.min())
  assert len(np.unique(batched[0][masks[0]])) == 1  # the serpentine is one component


def test_components_loop_has_no_batch_reduction_in_its_condition():
  masks = jnp.zeros((4, 6, 5, 5), bool)
  jaxpr = jax.make_jaxpr(jax.vmap(jax.vmap(objects._components)))(masks).jaxpr
  conds = _while_conditions(jaxpr)
  assert conds, "no while loop found"
  for prims in conds:  # the predicate is the example's own flag, not any() over a batch
    assert not prims & {"reduce_or", "reduce_and", "reduce_max", "reduce_min", "psum"}, prims


def test_observe_under_vmap_keeps_one_loop_per_example():
  cfg = objects.ObjectConfig(image_height=16, image_width=16, latent_height=4, latent_width=4,
                             latent_channels=2)
  f = 3
  args = (jnp.zeros((2, f, 4, 4, 2)), jnp.ones((2, f, 16, 16)),
          jnp.broadcast_to(jnp.array([[16.0, 0, 8], [0, 16, 8], [0, 0, 1]]), (2, f, 3, 3)),
          jnp.broadcast_to(jnp.eye(4), (2, f, 4, 4)), jnp.zeros((2, f, 16, 16), bool),
          jnp.broadcast_to(jnp.arange(f), (2, f)))
  observe = jax.vmap(lambda *a: objects.observe(objects.init(cfg), *a))
  conds = _while_conditions(jax.make_jaxpr(observe)(*args).jaxpr)
  assert conds and not any(p & {"reduce_or", "reduce_and"} for p in conds)
