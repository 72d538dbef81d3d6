"""The command line of :mod:`mirage_jax.depth.convert`: released Depth Anything V2 weights ->
an export that :func:`mirage_jax.depth.depth_anything.load_export` reads.

  python -m mirage_jax.convert_depth --weights=model.safetensors --variant=small \\
      --kind=relative --output=runs/depth_small
  python -m mirage_jax.convert_depth --weights=depth_anything_v2_metric_hypersim_vits.pth \\
      --variant=small --kind=metric --max_depth=20 --output=runs/depth_small_indoor

``--weights``: transformers' ``model.safetensors`` (``depth-anything/Depth-Anything-V2-*-hf``)
or the original repository's ``.pth``. The export's ``config.json`` holds ``depth_model``
(:func:`~mirage_jax.depth.depth_anything.model_config` of ``--variant``, ``--kind``,
``--max_depth``).
"""

from __future__ import annotations

import os

from absl import flags

from mirage_jax import paths
from mirage_jax.depth import convert, depth_anything
from mirage_jax.errors import InputError, run_app


def define_flags(fv: flags.FlagValues) -> None:
  """Registers the command line on ``fv`` (called when run as a program, or by tests on
  their own ``FlagValues``: ``--output`` is shared with other CLIs)."""
  flags.DEFINE_string("weights", None, "Released weights: .safetensors or .pth.", flag_values=fv)
  flags.DEFINE_enum("variant", "small", list(depth_anything.VARIANTS), "Model size.",
                    flag_values=fv)
  flags.DEFINE_enum("kind", "relative", list(depth_anything.KINDS), "relative (disparity) or "
                    "metric (metres).", flag_values=fv)
  flags.DEFINE_float("max_depth", None, "Metric kind: the release's max depth (20 indoor, 80 "
                     "outdoor; default 20).", flag_values=fv)
  flags.DEFINE_string("output", None, "Export folder (must not exist).", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Params dtype (default float32).",
                    flag_values=fv)


def run(fv: flags.FlagValues) -> int:
  """The command, from parsed flags (see :func:`define_flags`)."""
  for name in ("weights", "output"):
    if not fv[name].value:
      raise InputError(f"--{name}", name, "required")
    paths.require_local(fv[name].value, f"--{name}", "convert on a local disk, then copy the "
                        "export up")
  if not os.path.exists(fv.weights):
    raise InputError("--weights", "weights", f"{fv.weights} does not exist")
  overrides = {}
  if fv.max_depth is not None:
    if fv.kind != "metric":
      raise InputError("--max_depth", "max_depth", "only the metric kind has a max depth")
    overrides["max_depth"] = float(fv.max_depth)
  cfg = depth_anything.model_config(fv.variant, fv.kind, **overrides)
  params = convert.convert_params(fv.weights, cfg)
  convert.write_export(fv.output, params, cfg, source=os.path.abspath(fv.weights),
                       dtype=fv.dtype)
  print(f"wrote {fv.output} (Depth Anything V2 {fv.variant} {fv.kind})")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host work: keep JAX off any accelerator
  define_flags(flags.FLAGS)
  run_app(lambda: run(flags.FLAGS))
