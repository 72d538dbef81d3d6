"""FLOP counting of traced functions (analytic model FLOPs, MFU) and accelerator peaks.

Imports no family and no training loop, so the families' stages count their own FLOPs with
:func:`model_flops`.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections
from flax import nnx


def jaxpr_flops(fn: Callable, *args) -> float:
  """FLOPs (2 per multiply-add) of the matmuls and convolutions ``fn`` traces to.

  Counted from the jaxpr (the model's own operations, before XLA), recursing into scans
  (times their length) and other sub-computations; elementwise work is left out.
  """
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def model_flops(build: Callable[[], nnx.Module], call: Callable, *args) -> float:
  """:func:`jaxpr_flops` of ``call(model, *args)`` for an abstract (never allocated) model."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  return jaxpr_flops(lambda state, *a: call(nnx.merge(graphdef, state), *a), abstract, *args)


def _count(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[i] for i in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out ch, in ch, *spatial)
      per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[i] for i in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    times = eqn.params.get("length", 1) if name == "scan" else 1
    if name == "pallas_call":  # a kernel's body runs once per grid point (splash attention)
      times = math.prod(n for n in eqn.params["grid_mapping"].grid if isinstance(n, int))
    if name == "shard_map":  # the body is one shard's work: every shard of the manual axes runs it
      times = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax_core.Jaxpr):
          total += times * _count(inner)
  return total


PEAK_TFLOPS = {  # dense bf16 TFLOP/s per chip, by jax device_kind prefix
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def measure_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
  """Best achieved TFLOP/s of a float32 ``size``^3 matmul on the default device."""
  x = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best / 1e12


def total_peak_tflops(config: ml_collections.ConfigDict) -> float:
  """Peak TFLOP/s of all devices together, for MFU.

  ``config.train.peak_tflops_per_device`` > 0 wins; else a known accelerator's spec sheet;
  on CPU the fake devices share the host's cores, so the peak is one matmul measured now.
  """
  per_device = config.train.peak_tflops_per_device
  kind = jax.devices()[0].device_kind
  if per_device <= 0 and jax.default_backend() == "cpu":
    return measure_matmul_tflops()
  if per_device <= 0:
    per_device = next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), 0.0)
  return per_device * jax.device_count()
