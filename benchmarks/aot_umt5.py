"""AOT-compiles the umT5-xxl text encoder (Wan2.2's) for a TPU topology on this CPU host.

  python benchmarks/aot_umt5.py --topology=v5p:2x2x1 --mesh=fsdp:4 [--batch=1,8 --tokens=512]

The encoder is abstract (``nnx.eval_shape``: nothing allocated), its params in bf16 (as the
release and ``convert_text``'s default) sharded by the logical rules over the mesh (``embed``
over ``fsdp``, heads and MLP units over ``tensor``), the token batch over the data axes where
it divides them. Compiled by libtpu (``pip install -e .[tpu]``); prints, per batch size,
per-chip memory from XLA's memory analysis, the compile time, the closed-form FLOPs and the
roofline time at the chip's peak.
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
from jax.sharding import NamedSharding  # noqa: E402

from mirage_jax import aot, sharding  # noqa: E402
from mirage_jax.text import umt5  # noqa: E402

flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology to compile for.")
flags.DEFINE_string("mesh", "fsdp:-1", "Mesh axes as name:size,... (data, fsdp, context, tensor).")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes (prompts) to compile, one after another.")
flags.DEFINE_integer("tokens", 512, "Tokens per prompt (the released pipeline pads to 512).")
flags.DEFINE_string("param_dtype", "bfloat16", "Stored parameter dtype.")
flags.DEFINE_string("dtype", "bfloat16", "Matmul dtype.")
flags.DEFINE_bool("scan_layers", True, "Scan the layer stack.")
FLAGS = flags.FLAGS


def forward_flops(cfg, batch: int, tokens: int) -> float:
  """Closed-form FLOPs (2 per multiply-add) of one forward: per block and token q, k, v, o
  (4 d * inner) and the gated FFN (3 d f), plus the scores and values (2 L inner)."""
  inner = cfg.num_heads * cfg.head_dim
  per_token = 4 * cfg.dim * inner + 3 * cfg.dim * cfg.ffn_dim + 2 * tokens * inner
  return 2.0 * batch * tokens * cfg.num_layers * per_token


def main(argv) -> None:
  del argv
  cfg = umt5.model_config("xxl", scan_layers=FLAGS.scan_layers)
  devices = aot.topology_devices(FLAGS.topology)
  mesh_shape = {a: 1 for a in sharding.MESH_AXES}
  for item in FLAGS.mesh.split(","):
    name, size = item.split(":")
    mesh_shape[name] = int(size)
  mesh = sharding.make_mesh(mesh_shape, devices, where="--mesh")
  rules = sharding.DEFAULT_LOGICAL_RULES
  model = nnx.eval_shape(lambda: umt5.UMT5Encoder(
      cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(FLAGS.dtype), param_dtype=jnp.dtype(FLAGS.param_dtype)))
  graphdef, params = nnx.split(model)
  specs = nnx.get_partition_spec(params)
  param_shardings = sharding.logical_to_sharding(specs, mesh, rules, params, params=True)
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, param_shardings)

  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  hbm_gib, peak_tflops, _ = aot.CHIPS[FLAGS.topology.split(":")[0]]
  results = []
  for batch in (int(b) for b in FLAGS.batch):
    spec = lambda shape: NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", None), rules, mesh, shape))
    shape = (batch, FLAGS.tokens)
    ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec(shape))
    mask = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=spec(shape))
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.use_rules(rules):
      compiled = jax.jit(forward).lower(abstract_params, ids, mask).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    flops = forward_flops(cfg, batch, FLAGS.tokens)
    results.append({
        "batch": batch, "compile_s": round(seconds, 1),
        "memory_per_chip_gib": per_chip / 2**30,
        "memory_breakdown_gib": {"arguments": mem.argument_size_in_bytes / 2**30,
                                 "outputs": mem.output_size_in_bytes / 2**30,
                                 "temporaries": mem.temp_size_in_bytes / 2**30},
        "analytic_tflops": flops / 1e12,
        "roofline_s_at_peak": flops / mesh.size / (peak_tflops * 1e12)})
  print(json.dumps({
      "topology": FLAGS.topology, "chips": mesh.size,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "tokens": FLAGS.tokens,
      "params": umt5.num_params(model), "param_dtype": FLAGS.param_dtype, "dtype": FLAGS.dtype,
      "hbm_per_chip_gib": hbm_gib, "results": results}, indent=2))


if __name__ == "__main__":
  app.run(main)
