"""The command line of :mod:`mirage_jax.families.wan.convert`: the released Wan2.2-TI2V-5B
weights (+ Mirage's VACE/LoRA files) -> exports, and an export's VACE/LoRA back.

  python -m mirage_jax.convert_wan --wan_dir=Wan2.2-TI2V-5B --vace=vace.safetensors \\
      --lora=lora.safetensors --output=runs/wan_export [--dtype=bfloat16] [--merge_lora] \\
      [--text_encoder=runs/umt5_xxl --tokenizer=Wan2.2-TI2V-5B/google/umt5-xxl]
  python -m mirage_jax.convert_wan --to_reference --checkpoint=runs/wan_export/dit \\
      --output=runs/wan_reference

``--wan_dir`` holds ``diffusion_pytorch_model*.safetensors`` (sharded with its
``.index.json``, or one file) and ``Wan2.2_VAE.pth``; ``--dit`` / ``--vae`` name them
separately. The exports get the configs of ``--config`` (default
``experiments/wan22_ti2v_5b.py``), its ``get_config('<stage>,<--variant>')`` for each stage.
With ``--text_encoder`` (a ``convert_text`` export) and ``--tokenizer``, umT5's embedding of
the empty prompt is stored as ``dit/empty_text.npy`` and both paths in the DiT's config, so
``generate --prompt`` needs no more flags.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import flags, logging

from mirage_jax import paths
from mirage_jax.errors import InputError, load_config_file, run_app
from mirage_jax.families.wan import convert as wan_convert

# The library never imports experiments/: the configs come from this file, by path.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments", "wan22_ti2v_5b.py")


def define_flags(fv: flags.FlagValues) -> None:
  """Registers the command line on ``fv``. Called only when run as a program (or by tests
  on their own ``FlagValues``): ``--output``/``--checkpoint``/``--dtype`` share their names
  with other CLIs' flags, which may be imported in the same process."""
  flags.DEFINE_string("wan_dir", None, "Folder of the released Wan2.2-TI2V-5B files.",
                      flag_values=fv)
  flags.DEFINE_string("dit", None, "DiT weights: .safetensors, .safetensors.index.json or a "
                      "folder of them (default: in --wan_dir).", flag_values=fv)
  flags.DEFINE_string("vae", None, "VAE weights, Wan2.2_VAE.pth (default: in --wan_dir).",
                      flag_values=fv)
  flags.DEFINE_string("vace", None, "Mirage's vace.safetensors (optional).", flag_values=fv)
  flags.DEFINE_string("lora", None, "Mirage's lora.safetensors (optional).", flag_values=fv)
  flags.DEFINE_string("output", None, "Export folder (must not exist); with --to_reference "
                      "the folder for vace/lora.safetensors.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Params dtype (default float32; "
                    "--to_reference: the export's).", flag_values=fv)
  flags.DEFINE_enum("variant", "ti2v_5b", ["ti2v_5b", "tiny"], "Model size.", flag_values=fv)
  flags.DEFINE_string("config", _DEFAULT_CONFIG, "Experiment config file of the exports: "
                      "get_config('<stage>,<--variant>') for stage autoencoder and denoiser.",
                      flag_values=fv)
  flags.DEFINE_bool("merge_lora", False, "Fold --lora into the base weights.", flag_values=fv)
  flags.DEFINE_integer("lora_rank", None, "LoRA rank (default: the variant's).",
                       flag_values=fv)
  flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: the variant's).",
                     flag_values=fv)
  flags.DEFINE_bool("to_reference", False, "Write an export's VACE/LoRA as the reference's "
                    "safetensors instead.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "--to_reference: the DiT export.", flag_values=fv)
  flags.DEFINE_float("save_batch_mb", 256, "Params written per Orbax save (MB); a larger "
                       "parameter is written alone.", flag_values=fv)
  flags.DEFINE_string("text_encoder", None, "umT5 export (python -m mirage_jax.convert_text): "
                      "its embedding of the empty prompt is stored in the DiT export "
                      "(needs --tokenizer).", flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "The umT5 tokenizer folder (google/umt5-xxl in "
                      "--wan_dir) of --text_encoder.", flag_values=fv)
  flags.DEFINE_bool("compress", True, "zstd-compress the stored params (--nocompress: larger "
                    "files, a lower peak memory).", flag_values=fv)


def _dit_files(wan_dir: str | None, dit: str | None) -> str:
  if dit:
    return dit
  if not wan_dir:
    raise InputError("--wan_dir/--dit", "dit", "give --wan_dir (the released files) or --dit")
  for name in (wan_convert.DIT_INDEX, wan_convert.DIT_FILE):
    if os.path.exists(os.path.join(wan_dir, name)):
      return os.path.join(wan_dir, name)
  raise InputError(wan_dir, wan_convert.DIT_INDEX, f"neither {wan_convert.DIT_INDEX} nor {wan_convert.DIT_FILE} in the folder")


def _vae_file(wan_dir: str | None, vae: str | None) -> str:
  if vae:
    return vae
  if not wan_dir:
    raise InputError("--wan_dir/--vae", "vae", "give --wan_dir (the released files) or --vae")
  return os.path.join(wan_dir, wan_convert.VAE_FILE)


# ----------------------------------------------------------------------------- CLI


def run(fv: flags.FlagValues) -> int:
  """The command, from parsed flags (see :func:`define_flags`)."""
  if not fv.output:
    raise InputError("--output", "output", "required")
  # torch/safetensors readers, and a temporary folder renamed into place when complete.
  for name in ("output", "wan_dir", "dit", "vae", "vace", "lora", "checkpoint", "text_encoder",
               "tokenizer"):
    paths.require_local(fv[name].value, f"--{name}", "convert on a local disk, then copy the "
                        "export up")
  if fv.to_reference:
    if not fv.checkpoint:
      raise InputError("--checkpoint", "checkpoint", "required with --to_reference")
    written = wan_convert.to_reference(fv.checkpoint, fv.output, fv.dtype)
    for path in written.values():
      print(f"wrote {path}")
    return 0
  dit = _dit_files(fv.wan_dir, fv.dit)
  vae = _vae_file(fv.wan_dir, fv.vae)
  config_file = load_config_file(fv.config, "--config")
  configs = tuple(config_file.get_config(f"{stage},{fv.variant}")
                  for stage in ("autoencoder", "denoiser"))  # any config file's contract
  summary = wan_convert.convert(fv.output, dit=dit, vae=vae, configs=configs, vace=fv.vace,
                                lora=fv.lora, variant=fv.variant, dtype=fv.dtype,
                                merge_lora=fv.merge_lora, lora_rank=fv.lora_rank,
                                lora_alpha=fv.lora_alpha, batch_mb=fv.save_batch_mb,
                                compress=fv.compress, text_encoder=fv.text_encoder,
                                tokenizer=fv.tokenizer)
  print(f"wrote {fv.output}/vae and {fv.output}/dit ({summary['seconds']:.1f} s, "
        f"LoRA: {summary['lora']})")
  return 0


def _quiet_orbax(record) -> bool:
  """absl handler filter: Orbax logs a dozen INFO lines per save, which would bury the
  progress lines; its warnings and errors still pass."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _main() -> int:
  logging.get_absl_handler().addFilter(_quiet_orbax)
  return run(flags.FLAGS)


if __name__ == "__main__":
  # The conversion is host work: keep JAX (Orbax imports it) off any accelerator.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  define_flags(flags.FLAGS)
  run_app(_main)
