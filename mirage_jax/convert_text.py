"""The command line of :mod:`mirage_jax.text.convert`: released umT5 encoder weights -> an
export that :func:`mirage_jax.text.umt5.load_export` reads.

  python -m mirage_jax.convert_text --weights=Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth \\
      --output=runs/umt5_xxl
  python -m mirage_jax.convert_text --weights=text_encoder/ --output=runs/umt5_xxl

``--weights``: the Wan release's ``.pth`` or transformers safetensors (a file, an index or a
folder of shards). The export's ``config.json`` holds ``text_encoder``
(:func:`~mirage_jax.text.umt5.model_config` of ``--variant``); params are stored in
``--dtype`` (bf16 by default, as released: 11 GiB for xxl).
"""

from __future__ import annotations

import os

from absl import flags

from mirage_jax import paths
from mirage_jax.errors import InputError, run_app
from mirage_jax.text import convert, umt5


def define_flags(fv: flags.FlagValues) -> None:
  """Registers the command line on ``fv`` (called when run as a program, or by tests on
  their own ``FlagValues``: ``--output`` is shared with other CLIs)."""
  flags.DEFINE_string("weights", None, "Released weights: the Wan .pth or transformers "
                      ".safetensors (file, index or folder).", flag_values=fv)
  flags.DEFINE_enum("variant", "xxl", list(umt5.VARIANTS), "Model size.", flag_values=fv)
  flags.DEFINE_string("output", None, "Export folder (must not exist).", flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Params dtype.",
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
  if os.path.exists(fv.output):
    raise InputError("--output", "output", f"{fv.output} already exists")
  cfg = umt5.model_config(fv.variant)
  params = convert.convert_params(fv.weights, cfg, dtype=fv.dtype)
  convert.write_export(fv.output, params, cfg, source=os.path.abspath(fv.weights),
                       dtype=fv.dtype)
  print(f"wrote {fv.output} (umT5 {fv.variant} encoder, {fv.dtype})")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host work: keep JAX off any accelerator
  define_flags(flags.FLAGS)
  run_app(lambda: run(flags.FLAGS))
