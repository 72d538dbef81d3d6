"""Training: tiny smoke run, state sharding, sharded == unsharded step, non-finite handling."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from experiments import tiny_cpu
from mirage_jax import geometry, metrics_log, sharding
from mirage_jax import families
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import conditioning as small_conditioning
from mirage_jax.families.small import stages as small_stages
from mirage_jax.training import flops as flops_lib
from mirage_jax.training import inputs as inputs_lib
from mirage_jax.training import loop as loop_lib
from mirage_jax.training import mesh as mesh_lib
from mirage_jax.training import step as step_lib


def synthetic_clip(seed: int, frames: int = 12, size: int = 16) -> dict:
  """A posed clip: the camera walks along an arc looking at the origin."""
  rng = np.random.default_rng(seed)
  K = geometry.intrinsics_from_fov(60.0, size, size)
  angles = np.linspace(0.0, 0.8, frames) + seed
  poses = np.stack([geometry.look_at([2 * np.cos(a), 0.2, 2 * np.sin(a)], [0, 0, 0])
                    for a in angles]).astype(np.float32)
  return dict(frames=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
              depths=rng.uniform(1.0, 3.0, (frames, size, size)).astype(np.float32),
              intrinsics=np.repeat(K[None], frames, 0), poses_c2w=poses, fps=np.float32(10))


def synthetic_sources(n: int = 8) -> dict:
  clips = [synthetic_clip(i) for i in range(n)]
  return {"train": clips, "validation": clips[:2]}


def tiny_config(stage: str = "autoencoder"):
  c = tiny_cpu.get_config(stage)
  c.data.update(resolution=(16, 16), batch_size=8, read_threads=0, read_buffer_size=1)
  c.autoencoder.base_channels = 8
  c.denoiser.model.update(embed_dim=32, num_layers=2, num_heads=2, control_layers=1,
                          cond_dim=0, time_freq_dim=32)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=2)
  c.train.update(steps=10, log_every=1, peak_tflops_per_device=1.0)
  c.checkpoint.update(every=5, keep=2)
  return c


def read_jsonl(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def random_frozen_autoencoder(config) -> dict:
  model = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(1))
  return nnx.state(model, nnx.Param).to_pure_dict()


def test_smoke_train_loss_decreases_and_logs(tmp_path):
  workdir = str(tmp_path)
  last = loop_lib.train_and_evaluate(tiny_config(), workdir, synthetic_sources())
  rows = read_jsonl(workdir)
  assert [r["step"] for r in rows] == list(range(1, 11))
  losses = [r["loss"] for r in rows]
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  for key in ("grad_norm", "learning_rate", "step_time_s", "examples_per_s", "mfu"):
    assert np.isfinite(last[key]) and last[key] >= 0, key
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  scalars = metrics_log.read_events(os.path.join(workdir, "tensorboard", events[0]))
  assert [s for s, _ in scalars] == list(range(1, 11))
  assert scalars[-1][1]["loss"] == pytest.approx(losses[-1], rel=1e-6)
  assert json.load(open(os.path.join(workdir, "config.json")))["stage"] == "autoencoder"
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "10"))


def _mesh_config(config, **mesh):
  config = config.copy_and_resolve_references()
  config.mesh = {**dict(data=1, fsdp=1, context=1, tensor=1), **mesh}
  return config


def test_big_weights_are_split_across_fsdp_and_tensor():
  config = _mesh_config(tiny_config("denoiser"), fsdp=4, tensor=2)
  stage = small_stages.DenoiserStage(config, random_frozen_autoencoder(config))
  mesh = mesh_lib.build_mesh(config)
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  big = {path: x for path, x in jax.tree_util.tree_leaves_with_path(state["params"])
         if x.size >= 32 * 32}
  assert big
  both = 0
  for path, x in big.items():
    axes = {a for entry in x.sharding.spec if entry for a in
            ((entry,) if isinstance(entry, str) else entry)}
    assert axes, f"{jax.tree_util.keystr(path)} is replicated"
    shard = x.addressable_shards[0].data
    assert shard.size * math.prod(mesh.shape[a] for a in axes) == x.size
    both += axes >= {"fsdp", "tensor"}
  assert both >= len(big) // 2  # attention / MLP matrices use both axes
  # Adam moments shard like their params.
  mu = state["opt_state"][1][0].mu
  for (path, p), m in zip(jax.tree_util.tree_leaves_with_path(state["params"]),
                          jax.tree.leaves(mu)):
    assert m.sharding == p.sharding, jax.tree_util.keystr(path)


def _one_step(config, batch_np, frozen):
  stage = step_lib.make_stage(config, frozen=frozen)
  mesh = mesh_lib.build_mesh(config, jax.devices()[:math.prod(
      v for v in config.mesh.values() if v > 0)])
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  batch = {k: jax.device_put(batch_np[k], specs[k].sharding) for k in stage.fields}
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  frozen = jax.device_put(stage.frozen, jax.sharding.NamedSharding(mesh, PartitionSpec()))
  with setup.context():
    state, m1 = step(state, batch, frozen)
    state, m2 = step(state, batch, frozen)
  return jax.device_get((m1, m2, state["params"]))


def _batch(config):
  from data_pipelines import pipeline
  it = pipeline.from_config(synthetic_sources()["train"], config.data)
  return next(iter(it))


@pytest.mark.parametrize("stage", ["autoencoder", "denoiser"])
def test_sharded_step_matches_unsharded(stage):
  base = tiny_config(stage)
  # Adam divides by sqrt(v): for near-zero gradients it would turn float32 round-off into
  # lr-sized updates; a large eps keeps the update proportional to the gradient.
  base.optimizer.eps = 1.0
  frozen = random_frozen_autoencoder(base) if stage == "denoiser" else None
  batch = _batch(base)
  m_ref = _one_step(_mesh_config(base, fsdp=1), batch, frozen)
  m_sh = _one_step(_mesh_config(base, data=2, fsdp=2, tensor=2), batch, frozen)
  for a, b in zip(m_ref[:2], m_sh[:2]):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
    # Sharded reductions sum in another order: float32 round-off, not a different result.
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=2e-3)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=2e-5),
               m_ref[2], m_sh[2])
  if stage == "denoiser":
    assert 0 < m_ref[0]["memory_coverage"] <= 1  # memory from earlier frames reaches targets


@pytest.mark.parametrize("warmup, end_rate", [(2, 3e-4), (0, 3e-4), (0, 3e-3)])
def test_the_run_length_is_an_input_of_the_compiled_step(warmup, end_rate):
  """Runs of 10 and 30 steps lower to the same program (one executable for both, from the
  compilation cache or an AOT file), and the length still sets the learning rate: after the
  warmup each run follows optax's warmup-cosine schedule over its own length."""
  import optax  # pylint: disable=g-import-not-at-top
  programs, rates = [], []
  for steps in (10, 30):
    config = tiny_config()
    config.optimizer.update(warmup_steps=warmup, end_learning_rate=end_rate)
    config.train.steps = steps
    stage = step_lib.make_stage(config)
    mesh = mesh_lib.build_mesh(config, jax.devices()[:1])
    setup = step_lib.make_setup(config, stage, mesh)
    specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
    step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
    with setup.context():
      programs.append(step.lower(setup.abstract, specs, stage.frozen).as_text())
      state = step_lib.init_state(config, stage, setup)
      state["step"] = jnp.int32(6)  # past the warmup, in both runs' decay
      batch = {k: jax.device_put(np.asarray(v), specs[k].sharding)
               for k, v in _batch(config).items() if k in stage.fields}
      rates.append(float(step(state, batch, stage.frozen)[1]["learning_rate"]))
    opt = config.optimizer
    want = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup,
                                              max(steps, warmup + 1), end_rate)(6)
    np.testing.assert_allclose(rates[-1], float(want), rtol=1e-6)
  assert programs[0] == programs[1]
  assert (rates[0] == rates[1]) == (end_rate == config.optimizer.learning_rate and not warmup)


def test_nonfinite_step_leaves_state_unchanged():
  config = _mesh_config(tiny_config(), fsdp=8)
  stage = step_lib.make_stage(config)
  mesh = mesh_lib.build_mesh(config)
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  before = jax.device_get(state)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  batch_np = _batch(config)
  from data_pipelines import pipeline
  frames = pipeline.frames_to_float(batch_np["frames"])  # uint8 frames cannot hold a NaN
  frames[0, 0, 0, 0, 0] = np.nan
  batch_np["frames"] = frames
  specs["frames"] = jax.ShapeDtypeStruct(frames.shape, frames.dtype,
                                         sharding=specs["frames"].sharding)
  batch = {k: jax.device_put(batch_np[k], specs[k].sharding) for k in stage.fields}
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  with setup.context():
    state, metrics = step(state, batch, {})
  assert int(metrics["nonfinite"]) == 1
  after = jax.device_get(state)
  assert int(after["step"]) == 1
  jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
  jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])


def test_nonfinite_halt_names_step_and_batch_and_keeps_the_last_good_checkpoint(tmp_path):
  """``train.nonfinite='halt'``: a huge learning rate overflows the parameters at step 1, so
  step 2 is not finite; the error names step 2 and its batch, and step 1's checkpoint is the
  last. Checkpoints every step but metrics only every 4: the halt comes before step 2's save."""
  import re  # pylint: disable=g-import-not-at-top
  from tests import test_faults  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.train.update(nonfinite="halt", steps=4, log_every=4)
  config.checkpoint.update(every=1)
  config.optimizer.update(learning_rate=1e30, warmup_steps=0, grad_clip_norm=0.0)
  with pytest.raises(FloatingPointError) as e:
    loop_lib.train_and_evaluate(config, str(tmp_path), synthetic_sources())
  found = re.match(r"step (\d+): non-finite loss or gradient norm on the batch of clip_index "
                   r"\[([\d, ]+)\]", str(e.value))
  assert found and int(found.group(1)) == 2, str(e.value)
  clip_index = [int(i) for i in found.group(2).split(",")]
  assert len(clip_index) == 8 and all(0 <= i < 8 for i in clip_index)  # train records
  assert test_faults.complete_steps(tmp_path) == [1]
  state = test_faults.load_checkpoint(tmp_path, 1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_analytic_flops_match_xla_cost_analysis():
  # The denoiser's analytic count vs XLA on one device. No remat (recompute is not "model"
  # FLOPs) and no layer scan (XLA's cost analysis counts a while-loop body once).
  config = _mesh_config(tiny_config("denoiser"), fsdp=1)
  # Patches of 1 so the model, not the memory write/read around it, dominates the step.
  config.denoiser.model.update(embed_dim=64, num_heads=4, remat="none", scan_layers=False,
                               patch_size=1)
  frozen = random_frozen_autoencoder(config)
  stage = step_lib.make_stage(config, frozen=frozen)
  mesh = mesh_lib.build_mesh(config, jax.devices()[:1])
  setup = step_lib.make_setup(config, stage, mesh)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  frozen_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
  with setup.context():
    cost = step.lower(setup.abstract, specs, frozen_abs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = stage.step_flops(config.data.batch_size)
  assert abs(analytic - cost["flops"]) / cost["flops"] < 0.10, (analytic, cost["flops"])


def test_jaxpr_flops_counts_matmuls_and_scans():
  x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  assert flops_lib.jaxpr_flops(lambda a, b: a @ b, x, w) == 2 * 4 * 8 * 16
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=3)[1]
  assert flops_lib.jaxpr_flops(scanned, x, w) == 3 * 2 * 4 * 8 * 16


def test_denoiser_stage_conditions_on_object_slots():
  """Moving memory frames stay out of the static memory, but their slot covers the targets."""
  config = tiny_config("denoiser")
  config.data.batch_size = 2
  stage = small_stages.DenoiserStage(config, random_frozen_autoencoder(config))
  d = config.denoiser
  t = d.memory_frames + d.target_frames
  h, w = config.data.resolution
  # A camera standing still in front of a wall that is moving as a whole.
  c2w = np.broadcast_to(geometry.look_at([0, 0, 0], [0, 0, 1]), (2, t, 4, 4))
  batch = dict(depths=jnp.full((2, t, h, w), 2.0), poses_c2w=jnp.asarray(c2w, jnp.float32),
               intrinsics=jnp.broadcast_to(jnp.asarray(geometry.intrinsics_from_fov(60, h, w)),
                                           (2, t, 3, 3)),
               dynamic_masks=jnp.ones((2, t, h, w), jnp.uint8))
  # Frame f's latents are all f, so which frame a slot holds is plain to see.
  latents = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None, :, None, None, None],
                             (2, t, *stage.latent_hw, 8))
  cond = jax.jit(stage._condition)(latents, batch)
  assert float(cond["coverage"].mean()) > 0.9
  # The slot holds the last memory frame's latents, drawn where it was seen.
  last = latents[:, d.memory_frames - 1]
  err = jnp.abs(cond["memory"][:, 0] - last) * cond["coverage"][:, 0, ..., None]
  assert float(err.max()) < 1e-3 and float(last.min()) > 0

  config.objects.backends = ()  # no slots: nothing static was seen
  condition = jax.jit(small_stages.DenoiserStage(config, random_frozen_autoencoder(config))._condition)
  batch["depth_valid"] = jnp.ones((2, t, h, w), jnp.uint8)
  cond = condition(latents, batch)
  assert float(cond["coverage"].max()) == 0
  # A static wall is seen, but not through depth holes: holes never enter the memory.
  batch["dynamic_masks"] = jnp.zeros((2, t, h, w), jnp.uint8)
  assert float(condition(latents, batch)["coverage"].mean()) > 0.9
  batch["depth_valid"] = batch["depth_valid"].at[:, :, :, : w // 2].set(0)  # left half: holes
  coverage = condition(latents, batch)["coverage"]
  half = coverage.shape[-1] // 2
  assert float(coverage[..., :half - 1].max()) == 0 and float(coverage[..., half + 1:].mean()) > 0.9


def test_self_generated_memory_is_what_the_rollout_writes():
  """Scheduled sampling: the memory frames a training example replaces are the rollout's own
  chunk (read -> sample -> decode -> re-encode) from the frames before them, and they change
  the loss only when drawn. (Each side runs jitted, as training and the rollout run them.)"""
  from mirage_jax import rollout
  config = tiny_config("denoiser")
  config.data.batch_size = 1
  config.denoiser.self_generated_memory = 1.0
  frozen = random_frozen_autoencoder(config)
  stage = small_stages.DenoiserStage(config, frozen)
  model = stage.build(nnx.Rngs(3))
  # A model that is not just the memory prior (its output head starts at zero).
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape),
                        params)
  model = nnx.merge(graphdef, params, rest)
  batch = {k: jnp.asarray(v[:1]) for k, v in step_lib.model_inputs(_batch(config)).items()}
  d = config.denoiser
  m, g = d.memory_frames, stage.generated_frames
  assert g == 2 and m - g >= d.context_frames
  latents = jax.jit(stage._encode)(frozen, batch["frames"], batch["depths"])
  rng = jax.random.key(11)
  gen, gen_depth = nnx.jit(stage._generate_memory)(model, frozen, latents, batch, rng)

  roll = rollout.make_rollout(config, nnx.merge(stage.ae_graphdef, nnx.State(frozen)), model)
  n = m - g
  nc = d.context_frames
  wm = roll.model

  @jax.jit
  def rollout_chunk(ae_state, dn_state, latents, K, c2w, depth, static):
    """The rollout's chunk of frames n..m-1 after frames 0..n-1: (latents, re-encoded, depth)."""
    state = roll.backend.write(roll.backend.init(roll.memory_cfg), latents[:n], depth[:n],
                               K[:n], c2w[:n], static[:n], jnp.arange(n, dtype=jnp.int32))
    mem, cov = roll.backend.read(state, K[n:m], c2w[n:m])
    cond, _ = small_conditioning.dit_inputs(roll.memory_cfg, mem, cov, K[n:m], c2w[n:m],
                                            latents[n - nc:n], K[n - nc:n], c2w[n - nc:n])
    lat, rgb, depth = wm._denoise_impl(ae_state, dn_state, cond, rng)
    return lat, wm._encode_impl(ae_state, rgb, depth), depth  # sampler.reencode_latents

  lat, want, want_depth = rollout_chunk(wm.ae_state, wm.dn_state, latents[0],
                                        batch["intrinsics"][0], batch["poses_c2w"][0],
                                        batch["depths"][0], batch["dynamic_masks"][0] == 0)
  assert float(jnp.abs(want - lat).max()) > 1e-3  # re-encoding is not the identity
  np.testing.assert_allclose(gen[0], want, atol=2e-4)
  np.testing.assert_allclose(gen_depth[0], want_depth, rtol=1e-4, atol=1e-4)

  # The loss conditions on them: memory and context come from the generated frames.
  def conditioned_on(stage, model, frozen, batch, rng, generate=True):
    """(latents, depths) ``stage.loss`` conditions on, the data's latents and (``generate``)
    ``_generate_memory`` with the loss's key: one jitted program."""
    seen = []
    original = stage._condition
    stage._condition = lambda lat, b, *a: seen.append((lat, b["depths"])) or original(lat, b, *a)
    try:
      stage.loss(model, frozen, batch, rng)
    finally:
      stage._condition = original
    data = stage._encode(frozen, batch["frames"], batch["depths"])
    if not generate:
      return seen[-1], data
    return seen[-1], data, stage._generate_memory(model, frozen, data, batch,
                                                 jax.random.split(rng, 3)[0])

  (lat_seen, depth_seen), data, (gen, gen_depth) = nnx.jit(
      functools.partial(conditioned_on, stage))(model, frozen, batch, rng)
  # One program: the same bits for the same values, up to how XLA fuses its copies.
  np.testing.assert_allclose(lat_seen[:, m - g:m], gen, atol=1e-6)
  np.testing.assert_allclose(depth_seen[:, m - g:m], gen_depth, atol=1e-6)
  assert float(jnp.abs(gen - data[:, m - g:m]).max()) > 1e-2  # generated, not the data's
  np.testing.assert_allclose(lat_seen[:, :n], data[:, :n], atol=1e-6)  # the rest is the data's
  np.testing.assert_allclose(lat_seen[:, m:], data[:, m:], atol=1e-6)
  config.denoiser.self_generated_memory = 0.0
  stage = small_stages.DenoiserStage(config, frozen)
  (lat_seen, _), data = nnx.jit(functools.partial(conditioned_on, stage, generate=False))(
      model, frozen, batch, rng)
  np.testing.assert_allclose(lat_seen, data, atol=1e-6)
