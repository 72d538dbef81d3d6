"""AOT-compiles one Wan2.2-TI2V-5B DiT forward (+ VACE) for a TPU topology on this CPU host.

  python benchmarks/aot_wan_dit.py --topology=v5p:2x2x1 [--backward] [--height=704 --width=1280
      --frames=33 --references=4 --preceding=2 --batch=1 --mesh=fsdp:4]

The shape is Mirage's inference call: ``references`` retrieved latent frames, the 33-frame
target chunk (9 latent frames) and ``preceding`` latent frames, at 704x1280 (44x80 latent,
880 tokens a frame), 512 text tokens, with the VACE branch on the non-reference frames.
Nothing is allocated: the model is abstract (``nnx.eval_shape``) and compiled by libtpu
(``pip install -e .[tpu]``). Prints per-chip memory from XLA's memory analysis and the
forward FLOPs three ways: the closed-form count below, the matmul/conv FLOPs of the traced
jaxpr (``training.flops.jaxpr_flops``, scans times their length) and XLA's cost analysis (which
counts a scanned layer stack's body once, so it undercounts by about the layer count).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from mirage_jax import aot, sharding  # noqa: E402
from mirage_jax.families.wan import dit as wan_dit  # noqa: E402
from mirage_jax.training import flops as flops_lib  # noqa: E402

flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology to compile for.")
flags.DEFINE_string("mesh", "fsdp:-1", "Mesh axes as name:size,... (data, fsdp, context, tensor).")
flags.DEFINE_integer("height", 704, "Video height in pixels.")
flags.DEFINE_integer("width", 1280, "Video width in pixels.")
flags.DEFINE_integer("frames", 33, "Target video frames (1 + 4k).")
flags.DEFINE_integer("references", 4, "Retrieved reference latent frames.")
flags.DEFINE_integer("preceding", 2, "Preceding latent frames.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("text_tokens", 512, "Text tokens.")
flags.DEFINE_bool("vace", True, "Run the VACE branch.")
flags.DEFINE_string("param_dtype", "bfloat16", "Stored parameter dtype (an inference export).")
flags.DEFINE_bool("backward", False, "Compile forward + backward w.r.t. the trainable params "
                  "(VACE + LoRA) instead of the forward alone.")
flags.DEFINE_bool("generate", False, "Compile one generation chunk instead: the FlowUniPC "
                  "sampler of the Wan rollout (DiT + VACE at every step) and the VAE decode of "
                  "one latent tile (the rollout decodes the chunk tile by tile).")
flags.DEFINE_integer("steps", 20, "Sampler steps (--generate).")
flags.DEFINE_string("depth_variant", "large", "--generate: also compile the chunk's depth "
                    "estimation (Depth Anything V2 of this size, metric, f32, replicated) and "
                    "its alignment to the memory for the chunk's new latent frames ('' = off).")
flags.DEFINE_string("remat", None, "Override the config's remat policy.")
flags.DEFINE_bool("scan_layers", True, "Scan the layer stacks.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "chunked", "splash"],
                  "Attention implementation (models/attention.py; 'auto' = splash on TPU).")
FLAGS = flags.FLAGS


def forward_flops(cfg, *, batch: int, frames: int, references: int, tokens_per_frame: int,
                  text_tokens: int, vace: bool) -> float:
  """Closed-form FLOPs (2 per multiply-add) of the matmuls of one forward.

  Per block and token: q, k, v, o (4 d^2), cross-attention q, o (2 d^2), FFN (2 d f), the
  attention itself (2 L d for scores and values) and cross-attention (2 Lt d); per block
  once: the text k, v projections (2 Lt d^2). Plus the patch embedding, the head, the text
  embedding MLP and, for VACE, its blocks on the non-reference tokens with their
  before/after projections and the 96-channel patch embedding.
  """
  d, f, lt = cfg.dim, cfg.ffn_dim, text_tokens
  patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]

  def blocks(n_blocks, length):
    per_token = 4 * d * d + 2 * d * d + 2 * d * f + 2 * length * d + 2 * lt * d
    return n_blocks * (length * per_token + lt * 2 * d * d)

  length = frames * tokens_per_frame
  macs = blocks(cfg.num_layers, length)
  macs += length * cfg.in_channels * patch * d  # patch embedding
  macs += length * d * cfg.out_channels * patch  # head
  macs += lt * (cfg.text_dim * d + d * d)  # text embedding
  if vace:
    n_vace = len(cfg.vace_layers)
    vace_length = (frames - references) * tokens_per_frame
    macs += blocks(n_vace, vace_length)
    macs += vace_length * (cfg.vace_in_channels * patch * d + d * d * (n_vace + 1))
  return 2.0 * batch * macs


def _compiled_stats(fn, *args):
  """(memory per chip in bytes, memory_analysis, XLA flops per chip, traced matmul flops)."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return per_chip, mem, float(cost.get("flops", 0.0)), flops_lib.jaxpr_flops(fn, *args)


def generate_report(cfg, mesh, rules, graphdef, abstract_params, lat_t, h, w,
                    tokens_per_frame) -> None:
  """AOT of one generation chunk: ``WanRollout``'s sampler, then one VAE tile decode."""
  from experiments import mirage_wan22_5b  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import world_model as wan_world_model  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  config = mirage_wan22_5b.get_config("ti2v_5b")
  config.denoiser.model = cfg
  config.denoiser.update(target_frames=FLAGS.frames, reference_frames=FLAGS.references,
                         preceding_frames=4 * FLAGS.preceding, text_len=FLAGS.text_tokens)
  config.data.resolution = (FLAGS.height, FLAGS.width)
  config.sampler.num_steps = FLAGS.steps
  vae_cfg = config.autoencoder
  vae_cfg.attention = FLAGS.attention
  vae = nnx.eval_shape(lambda: wan_vae.WanVAE(vae_cfg, rngs=nnx.Rngs(0)))
  # The rollout merges its own graphdef (same config) with the abstract sharded params.
  ro = wan_world_model.WorldModel(config, vae, nnx.merge(graphdef, abstract_params))
  c, r, p = cfg.in_channels, FLAGS.references, FLAGS.preceding
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(
      mesh, PartitionSpec()))
  text = f32(1, FLAGS.text_tokens, cfg.text_dim)
  sample_args = (abstract_params, f32(1, lat_t, h, w, c), f32(1, 1, h, w, c),
                 f32(1, r, h, w, c), f32(1, p, h, w, c), f32(1, lat_t + p, h, w, 2 * c), text,
                 text)
  tiles = wan_vae.tile_tasks(h, w, tuple(vae_cfg.tile_size), tuple(vae_cfg.tile_stride))
  th, tw = min(h, vae_cfg.tile_size[0]), min(w, vae_cfg.tile_size[1])
  vae_graphdef, vae_params = nnx.split(vae)
  replicated = NamedSharding(mesh, PartitionSpec())
  vae_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                             sharding=replicated), vae_params)

  def decode(state, latents):
    return wan_vae.jit_decode(nnx.merge(vae_graphdef, state), latents, clamp=False)

  depth = None
  if FLAGS.depth_variant:
    from mirage_jax.depth import depth_anything, estimator  # pylint: disable=g-import-not-at-top
    depth_cfg = depth_anything.model_config(FLAGS.depth_variant, "metric")
    mono = estimator.Monocular(depth_anything.abstract_model(depth_cfg), depth_cfg)
    depth_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                              sharding=replicated), mono.state)
    new = lat_t - 1  # latents 1.. of a chunk are new; each is estimated from its video frame
    depth_args = (depth_state, f32(new, FLAGS.height, FLAGS.width, 3), f32(new, h, w),
                  jax.ShapeDtypeStruct((new, h, w), jnp.bool_, sharding=replicated), f32(2))
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    s_bytes, s_mem, s_xla, s_traced = _compiled_stats(ro._sample_impl, *sample_args)  # pylint: disable=protected-access
    d_bytes, d_mem, d_xla, d_traced = _compiled_stats(decode, vae_abstract,
                                                      f32(1, lat_t, th, tw, c))
    if FLAGS.depth_variant:
      e_bytes, e_mem, e_xla, e_traced = _compiled_stats(mono.chunk, *depth_args)
      depth = {"variant": FLAGS.depth_variant, "frames": new,
               "input_hw": list(depth_anything.input_hw(FLAGS.height, FLAGS.width,
                                                        depth_cfg.input_size)),
               "params": depth_anything.num_params(depth_anything.abstract_model(depth_cfg)),
               "memory_per_chip_gib": e_bytes / 2**30,
               "temporaries_gib": e_mem.temp_size_in_bytes / 2**30,
               "traced_tflops": e_traced / 1e12, "xla_cost_tflops_per_chip": e_xla / 1e12}
  n = mesh.size
  frames = r + lat_t + p
  forward = forward_flops(cfg, batch=1, frames=frames, references=r,
                          tokens_per_frame=tokens_per_frame, text_tokens=FLAGS.text_tokens,
                          vace=True)
  passes = 2 if ro.guidance_scale else 1
  hbm_gib, peak_tflops, _ = aot.CHIPS[FLAGS.topology.split(":")[0]]
  report = {
      "topology": FLAGS.topology, "chips": n, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "attention": FLAGS.attention, "steps": FLAGS.steps, "cfg_passes": passes,
      "tokens": frames * tokens_per_frame,
      "sampler": {
          "memory_per_chip_gib": s_bytes / 2**30,
          "temporaries_gib": s_mem.temp_size_in_bytes / 2**30,
          "analytic_tflops_total": FLAGS.steps * passes * forward / 1e12,
          "traced_matmul_tflops_total": s_traced / 1e12,
          "xla_cost_tflops_per_chip_scan_bodies_once": s_xla / 1e12,
          "at_peak_s": FLAGS.steps * passes * forward / n / (peak_tflops * 1e12)},
      "decode_one_tile": {
          "tile_latent_hw": [th, tw], "tiles_per_chunk": len(tiles),
          "memory_per_chip_gib": d_bytes / 2**30,
          "temporaries_gib": d_mem.temp_size_in_bytes / 2**30,
          "traced_tflops_per_tile": d_traced / 1e12,
          "xla_cost_tflops_per_chip": d_xla / 1e12},
      "hbm_per_chip_gib": hbm_gib,
  }
  if depth is not None:
    report["depth_estimate_and_align"] = depth
  print(json.dumps(report, indent=2))


def main(argv) -> None:
  del argv
  cfg = wan_dit.wan_dit_config("ti2v_5b")
  cfg.vace = FLAGS.vace
  cfg.param_dtype = FLAGS.param_dtype
  cfg.scan_layers = FLAGS.scan_layers
  cfg.attention = FLAGS.attention
  if FLAGS.remat is not None:
    cfg.remat = FLAGS.remat
  devices = aot.topology_devices(FLAGS.topology)
  mesh_shape = {a: 1 for a in sharding.MESH_AXES}
  for item in FLAGS.mesh.split(","):
    name, size = item.split(":")
    mesh_shape[name] = int(size)
  mesh = sharding.make_mesh(mesh_shape, devices, where="--mesh")
  rules = sharding.DEFAULT_LOGICAL_RULES

  lat_t = (FLAGS.frames - 1) // 4 + 1
  frames = FLAGS.references + lat_t + FLAGS.preceding
  h, w = FLAGS.height // 16, FLAGS.width // 16
  tokens_per_frame = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])

  model = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  specs = nnx.get_partition_spec(params)
  param_shardings = sharding.logical_to_sharding(specs, mesh, rules, params)
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, param_shardings)
  # The batch splits over the data axes where it divides them (batch 1: replicated).
  act = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(
      mesh, sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules, mesh,
                                     shape)))
  latents = act(FLAGS.batch, frames, h, w, cfg.in_channels)
  timesteps = jax.ShapeDtypeStruct((FLAGS.batch, frames), jnp.float32,
                                   sharding=NamedSharding(mesh, PartitionSpec()))
  text = act(FLAGS.batch, FLAGS.text_tokens, cfg.text_dim)
  vace_ctx = act(FLAGS.batch, frames - FLAGS.references, h, w, cfg.vace_in_channels)

  if FLAGS.generate:
    generate_report(cfg, mesh, rules, graphdef, abstract_params, lat_t, h, w,
                    tokens_per_frame)
    return

  def forward(state, latents, timesteps, text, vace_ctx):
    net = nnx.merge(graphdef, state)
    return net(latents, timesteps, text, num_reference=FLAGS.references,
               vace_context=vace_ctx if FLAGS.vace else None)

  if FLAGS.backward:
    trainable = wan_dit.trainable_filter(cfg)
    call = forward

    def forward(state, latents, timesteps, text, vace_ctx):  # noqa: F811
      train_state, frozen_state = state.filter(trainable, ...)

      def loss(train_state):
        merged = nnx.merge_state(train_state, frozen_state)
        out = call(merged, latents, timesteps, text, vace_ctx)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))
      return jax.grad(loss)(train_state)

  args = (abstract_params, latents, timesteps, text, vace_ctx)
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    compiled = jax.jit(forward).lower(*args).compile()
    traced = flops_lib.jaxpr_flops(forward, *args)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = len(devices)
  per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  analytic = forward_flops(cfg, batch=FLAGS.batch, frames=frames, references=FLAGS.references,
                           tokens_per_frame=tokens_per_frame, text_tokens=FLAGS.text_tokens,
                           vace=FLAGS.vace)
  hbm_gib, peak_tflops, _ = aot.CHIPS[FLAGS.topology.split(":")[0]]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  report = {
      "topology": FLAGS.topology, "chips": n, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "shape": {"batch": FLAGS.batch, "latent_frames": frames, "references": FLAGS.references,
                "target_latent_frames": lat_t, "preceding": FLAGS.preceding,
                "latent_hw": [h, w], "tokens": frames * tokens_per_frame,
                "text_tokens": FLAGS.text_tokens, "vace": FLAGS.vace},
      "params": int(n_params), "attention": FLAGS.attention, "remat": cfg.remat,
      "memory_per_chip_gib": per_chip / 2**30,
      "memory_breakdown_gib": {"arguments": mem.argument_size_in_bytes / 2**30,
                               "outputs": mem.output_size_in_bytes / 2**30,
                               "temporaries": mem.temp_size_in_bytes / 2**30},
      "hbm_per_chip_gib": hbm_gib,
      "analytic_tflops_total": analytic / 1e12,
      "traced_matmul_tflops_total": traced / 1e12,
      "traced_over_analytic": traced / analytic,
      "xla_cost_tflops_per_chip": float(cost.get("flops", 0.0)) / 1e12,
      "roofline_forward_s_at_peak": analytic / n / (peak_tflops * 1e12),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
