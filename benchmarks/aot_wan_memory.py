"""The memory's share of one Wan generation chunk at Mirage's shape, AOT for a TPU chip.

  python benchmarks/aot_wan_memory.py --topology=v5p:2x2x1 [--chunks=1,4,16]
      [--backends=rgb_points,mirage,voxel] [--height=704 --width=1280 --frames=33]

Per backend and trajectory length (N chunks: frame 0 written twice, then 8 latent frames a
chunk), compiles for ONE chip of ``--topology`` (a trajectory's memory is per trajectory;
nothing is sharded) exactly the memory part of ``WanRollout``'s chunk step: the read into
the chunk's cameras and the write of its 8 new latent frames. ``rgb_points`` (the pixel
point cloud) reads by rendering all 33 video frames at full resolution and encoding them
with the Wan2.2 VAE (real config, abstract f32 params, tiled as the rollout), and writes 8
full-resolution RGB-D frames; ``mirage`` / ``voxel`` read and write 44x80 latents. The VAE
encode is also compiled on its own (it does not depend on N). Nothing is allocated: states
and params are abstract, compiled by libtpu (``pip install -e .[tpu]``).

``rgb_points`` renders its target frames in steps (``rgb_points.render``: a ``lax.map`` over
steps of ``render_frames_per_step`` frames). XLA's cost analysis counts a loop body once,
so with ``--render_step`` the step is also compiled alone and the row gets
``loops_counted``: the read + write's figures plus (steps - 1) x the step's.

``--encode_unit`` compiles the repeated unit of the tiled encode instead of all of it (which
is too slow to compile on a small host): one tile's ``encode`` at the largest tile shape
(frame 0, then 4-frame chunks under ``lax.scan``) and one 4-frame chunk step alone (the scan
body: the encoder with its cache), so one tile = tile - chunk + (chunks) x chunk, and the
encode ~ that x (latent cells of all tiles / of the largest), with the traced FLOPs beside.

Prints JSON: per (backend, N) the state bytes (analytic: the state's array shapes, every
slot live since append-only capacities fit N chunks exactly; ``voxel`` keeps its bounded
``--voxel_capacity``), the compiled per-chip memory, XLA's FLOPs and bytes accessed, and a
roofline time max(FLOPs / peak, bytes / HBM bandwidth). The DiT sampler and VAE decode of
the chunk, common to every backend, are ``aot_wan_dit.py --generate``'s (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from mirage_jax import aot  # noqa: E402
from mirage_jax import memory as memory_lib  # noqa: E402
from mirage_jax.memory import rgb_points  # noqa: E402
from mirage_jax.families.wan import conditioning as wan_mirage  # noqa: E402
from mirage_jax.families.wan import vae as wan_vae  # noqa: E402

flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology; one of its chips is compiled for.")
flags.DEFINE_list("backends", ["rgb_points", "mirage", "voxel"], "Memory backends.")
flags.DEFINE_list("chunks", ["1", "4", "16"], "Trajectory lengths in chunks.")
flags.DEFINE_integer("height", 704, "Video height in pixels.")
flags.DEFINE_integer("width", 1280, "Video width in pixels.")
flags.DEFINE_integer("frames", 33, "Video frames per chunk (1 + 4k).")
flags.DEFINE_integer("voxel_capacity", 0, "voxel slots (0: the 5B config's memory.settings).")
flags.DEFINE_bool("encode", True, "Also compile the VAE encode of one chunk on its own.")
flags.DEFINE_bool("encode_unit", False, "Compile the tiled encode's repeated unit: one tile "
                  "(largest shape) and one 4-frame chunk step of it.")
flags.DEFINE_bool("render_step", True, "rgb_points: also compile one render step alone (XLA "
                  "counts the render loop's body once; see loops_counted).")
flags.DEFINE_bool("rgb_encode", True, "rgb_points' read includes the VAE encode (false: a "
                  "stand-in that only pools the rendered video, to compile render + write "
                  "alone; the encode's cost is then --encode's or traced_encode_tflops).")
FLAGS = flags.FLAGS


def _stats(fn, *args) -> dict:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  return {"compile_s": round(time.perf_counter() - t0, 1),
          "memory_per_chip_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2**30,
          "temporaries_gib": mem.temp_size_in_bytes / 2**30,
          "xla_gflops": flops / 1e9, "xla_bytes_accessed_gib": accessed / 2**30,
          "roofline_ms": _roofline_ms(flops, accessed)}


def _roofline_ms(flops: float, accessed: float) -> float:
  _, peak_tflops, hbm_gbs = aot.CHIPS[FLAGS.topology.split(":")[0]]
  return 1e3 * max(flops / (peak_tflops * 1e12), accessed / (hbm_gbs * 1e9))


def _loops_counted(whole: dict, body: dict, trips: int) -> dict:
  """XLA figures of ``whole`` with a loop's body (counted once by XLA) counted ``trips`` times."""
  flops = 1e9 * (whole["xla_gflops"] + (trips - 1) * body["xla_gflops"])
  accessed = 2**30 * (whole["xla_bytes_accessed_gib"] + (trips - 1) * body["xla_bytes_accessed_gib"])
  return {"trips": trips, "xla_gflops": flops / 1e9, "xla_bytes_accessed_gib": accessed / 2**30,
          "roofline_ms": _roofline_ms(flops, accessed)}


def main(argv) -> None:
  del argv
  from experiments import mirage_wan22_5b  # pylint: disable=g-import-not-at-top
  config = mirage_wan22_5b.get_config("ti2v_5b")
  config.data.resolution = (FLAGS.height, FLAGS.width)
  device = aot.topology_devices(FLAGS.topology)[0]
  one = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
  abstract = lambda tree: jax.tree.map(lambda a: spec(a.shape, a.dtype), tree)

  vae = nnx.eval_shape(lambda: wan_vae.WanVAE(config.autoencoder, rngs=nnx.Rngs(0)))
  vae_graphdef, vae_params = nnx.split(vae)
  vae_params = abstract(vae_params)

  def encode(vae_state, rgb01):  # the rollout's rgb_points encoder (WorldModel._encode_rgb)
    v = nnx.merge(vae_graphdef, vae_state)
    return v.tiled_encode((rgb01 * 2.0 - 1.0)[None])[0].astype(jnp.float32)

  H, W, C = FLAGS.height, FLAGS.width, FLAGS.frames
  L = (C - 1) // 4 + 1
  base = wan_mirage.memory_config(config)
  h, w, ch = base.latent_height, base.latent_width, base.latent_channels
  voxel_capacity = FLAGS.voxel_capacity or base.capacity
  report = {"topology": FLAGS.topology, "chip": str(device.device_kind),
            "rgb_points_read_includes_encode": FLAGS.rgb_encode,
            "shape": {"video": [C, H, W], "latents": [L, h, w, ch]},
            "voxel_capacity": voxel_capacity, "rows": []}
  # Traced conv/matmul FLOPs of the encode (no compile: cheap on any host).
  from mirage_jax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  report["traced_encode_tflops"] = flops_lib.jaxpr_flops(encode, vae_params,
                                                         spec((C, H, W, 3))) / 1e12
  print(json.dumps({"traced_encode_tflops": report["traced_encode_tflops"]}), file=sys.stderr)
  if FLAGS.encode:
    report["vae_encode_one_chunk"] = _stats(encode, vae_params, spec((C, H, W, 3)))
    print(json.dumps(report["vae_encode_one_chunk"]), file=sys.stderr)
  if FLAGS.encode_unit:
    report["vae_encode_unit"] = _encode_unit(vae_graphdef, vae_params, spec, C, H, W)
    print(json.dumps(report["vae_encode_unit"]), file=sys.stderr)

  for name in FLAGS.backends:
    reads_video = name == "rgb_points"
    for n in (int(x) for x in FLAGS.chunks):
      written = 2 + (L - 1) * n  # latent frames in memory after n chunks
      per_frame = {"mirage": h * w, "rgb_points": H * W}
      capacity = written * per_frame[name] if name in per_frame else voxel_capacity
      cfg = wan_mirage.memory_config(config, capacity=capacity)
      init = memory_lib.get_backend(name, encode_fn=lambda x: x).init
      state = jax.eval_shape(lambda cfg=cfg, init=init: init(cfg))
      state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))

      def chunk_memory(vae_state, state, K_read, c2w_read, lat, depth, K, c2w, static, frame,
                       rgb, name=name):
        if FLAGS.rgb_encode:
          enc = lambda x: encode(vae_state, x)
        else:  # stand-in: the latent-shaped mean of each 4-frame group (keeps the render live)
          enc = lambda x: jnp.broadcast_to(
              jnp.concatenate([x[:1], x[1:].reshape(-1, 4, H, W, 3).mean(1)]).reshape(
                  L, h, H // h, w, W // w, 3).mean((2, 4)).mean(-1, keepdims=True), (L, h, w, ch))
        be = memory_lib.get_backend(name, encode_fn=enc)
        mem, cov = be.read(state, K_read, c2w_read)
        return mem, cov, be.write(state, lat, depth, K, c2w, static, frame, rgb=rgb)

      reads = C if reads_video else L
      new = L - 1
      args = (vae_params if reads_video else None, abstract(state), spec((reads, 3, 3)), spec((reads, 4, 4)),
              spec((new, h, w, ch)), spec((new, H, W)), spec((new, 3, 3)), spec((new, 4, 4)),
              spec((new, H, W), jnp.bool_), spec((new,), jnp.int32),
              spec((new, H, W, 3)) if reads_video else None)
      row = {"backend": name, "chunks": n, "latent_frames_written": written,
             "capacity": capacity, "state_bytes_analytic": state_bytes,
             "read_write": _stats(chunk_memory, *args)}
      if reads_video:
        step = rgb_points.render_frames_per_step(capacity, reads)
        trips = reads // step if step < reads else 1  # lax.map's scan; the remainder is outside
        row["render_frames_per_step"], row["render_loop_trips"] = step, trips
        if FLAGS.render_step and trips > 1:
          render_step = lambda state, K, c2w: rgb_points.render(state, K, c2w, frames_per_step=step)
          row["render_step"] = _stats(render_step, abstract(state), spec((step, 3, 3)),
                                      spec((step, 4, 4)))
          row["loops_counted"] = _loops_counted(row["read_write"], row["render_step"], trips)
      print(json.dumps(row), file=sys.stderr)
      report["rows"].append(row)
  print(json.dumps(report, indent=2))


def _encode_unit(graphdef, vae_params, spec, C: int, H: int, W: int) -> dict:
  """The tiled encode's repeated unit compiled: one tile's encode at the largest tile shape
  and one 4-frame chunk step of it (``WanVAE._encode_chunked``'s scan body)."""
  v = nnx.merge(graphdef, vae_params)
  f, t = wan_vae.spatial_factor(v.cfg), wan_vae.temporal_factor(v.cfg)
  p = v.cfg.patch_size
  rows, cols = H // f, W // f
  tasks = wan_vae.tile_tasks(rows, cols, v.cfg.tile_size, v.cfg.tile_stride)
  cells = [(min(r1, rows) - r0) * (min(c1, cols) - c0) for r0, r1, c0, c1 in tasks]
  th, tw = min(v.cfg.tile_size[0], rows), min(v.cfg.tile_size[1], cols)
  tile = spec((1, C, th * f, tw * f, 3))

  def tile_encode(vae_state, video):  # what tiled_encode's jit_encode runs per tile
    return nnx.merge(graphdef, vae_state).encode(video, chunked=True)

  def first(vae_state, x0):
    return nnx.merge(graphdef, vae_state).encoder(x0, None)

  def chunk_step(vae_state, cache, chunk):  # the scan body: one chunk of t frames
    return nnx.merge(graphdef, vae_state).encoder(chunk, cache)

  x0 = spec((1, 1, th * f // p, tw * f // p, 3 * p * p))
  _, cache = jax.eval_shape(first, vae_params, x0)
  cache = jax.tree.map(lambda a: spec(a.shape, a.dtype), cache)
  chunk = spec((1, t, th * f // p, tw * f // p, 3 * p * p))
  from mirage_jax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  k = (C - 1) // t
  out = {"tile_pixels": [th * f, tw * f], "tiles": len(tasks), "tile_cells": cells,
         "chunks_per_tile": k,
         "traced_tile_tflops": flops_lib.jaxpr_flops(tile_encode, vae_params, tile) / 1e12,
         "traced_chunk_step_tflops": flops_lib.jaxpr_flops(chunk_step, vae_params, cache,
                                                           chunk) / 1e12}
  print(json.dumps(out), file=sys.stderr)
  out["chunk_step"] = _stats(chunk_step, vae_params, cache, chunk)
  print(json.dumps(out["chunk_step"]), file=sys.stderr)
  out["tile"] = _stats(tile_encode, vae_params, tile)
  print(json.dumps(out["tile"]), file=sys.stderr)
  one = _loops_counted(out["tile"], out["chunk_step"], k)
  scale = sum(cells) / (th * tw)  # all tiles' cells over the largest tile's
  out["tile_loops_counted"] = one
  out["encode_estimate"] = {"scale": scale, "xla_tflops": one["xla_gflops"] * scale / 1e3,
                            "xla_bytes_accessed_gib": one["xla_bytes_accessed_gib"] * scale,
                            "roofline_ms": one["roofline_ms"] * scale}
  return out


if __name__ == "__main__":
  app.run(main)
