"""Converter time and peak memory at the real widths: is the peak a parameter or the model?

Writes random weights in the released layout to a temporary folder (deleted afterwards):
the Wan2.2-TI2V-5B DiT at full width (dim 3072, ffn 14336, text 4096, 24 heads) but
``--layers`` blocks, sharded in two safetensors + index, in ``--input_dtype`` (the release is
bf16); Mirage's VACE (one block per two DiT layers) and rank-32 LoRA safetensors; the VAE as
a torch-format ``.pth`` (``--vae=tiny`` by default: at full size it adds 2.8 GB of f32 to
write and read, and none of its tensors is as large as a stacked DiT param). Then runs the
converter in a subprocess and reads its peak RSS from ``getrusage(RUSAGE_CHILDREN)``. A run
of the tiny variant measures the fixed cost (Python, JAX, Orbax imports) the same way.

  python -m benchmarks.bench_convert [--layers=2] [--dtype=float32] [--save_batch_mb=256]
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from absl import app, flags

from mirage_jax import weight_files
from mirage_jax.errors import InputError, run_cli

_LAYERS = flags.DEFINE_integer("layers", 2, "DiT blocks (the release has 30).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Exported dtype.")
_INPUT_DTYPE = flags.DEFINE_enum("input_dtype", "bfloat16", ["float32", "bfloat16"],
                                 "Dtype of the random input files.")
_VAE = flags.DEFINE_enum("vae", "tiny", ["tiny", "ti2v_5b"], "VAE size.")
_BATCH_MB = flags.DEFINE_integer("save_batch_mb", 256, "The converter's --save_batch_mb.")
_COMPRESS = flags.DEFINE_bool("compress", True, "The converter's --compress.")
_TMP = flags.DEFINE_string("tmp", None, "Parent of the temporary folder (default: system tmp).")

ROOT = Path(__file__).resolve().parents[1]

# The child: converts and prints its summary as JSON (configs rebuilt from the same spec).
_CHILD = """
import json, sys
from experiments import wan22_ti2v_5b
from mirage_jax.families.wan import convert as wan_convert
spec = json.loads(sys.argv[1])
ae = wan22_ti2v_5b.get_config("autoencoder," + spec["vae"])
dn = wan22_ti2v_5b.get_config("denoiser," + spec["dit"])
overrides = spec["dit_overrides"]
if "vace_layers" in overrides:
  overrides["vace_layers"] = tuple(overrides["vace_layers"])
dn.denoiser.model.update(overrides)
out = wan_convert.convert(spec["output"], dit=spec["dit_path"], vae=spec["vae_path"],
                          configs=(ae, dn), vace=spec["vace"], lora=spec["lora"],
                          variant=spec["dit"], dtype=spec["dtype"],
                          lora_rank=spec["lora_rank"], batch_mb=spec["batch_mb"],
                          compress=spec["compress"])
print("SUMMARY " + json.dumps(out))
"""


def _dit_config(variant: str, overrides: dict):
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  cfg = wan_dit.wan_dit_config(variant)
  cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  return cfg


def write_release(d: Path, variant: str, overrides: dict, vae_variant: str,
                  dtype: np.dtype, seed: int = 0) -> dict:
  """Random weights in the released naming, generated tensor by tensor while written."""
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top  # only to write the .pth the release has
  rng = np.random.default_rng(seed)
  layout = wan_dit.original_layout(_dit_config(variant, overrides))
  shapes = {k: t.original_shape for t in layout.values() for k in t.keys}

  def lazy(shape, dt):
    return weight_files.LazyArray(shape, dt, lambda: (
        0.02 * rng.standard_normal(shape, np.float32)).astype(dt))

  groups = {g: {k: s for k, s in shapes.items() if wan_dit.key_group(k) == g}
            for g in ("dit", "vace", "lora")}
  keys = sorted(groups["dit"])
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
    weight_files.write_safetensors(str(d / name), {k: lazy(shapes[k], dtype) for k in part})
    weight_map.update({k: name for k in part})
  index = d / "diffusion_pytorch_model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  for g in ("vace", "lora"):
    weight_files.write_safetensors(str(d / f"{g}.safetensors"),
                                  {k: lazy(s, dtype) for k, s in groups[g].items()})
  vae_layout = wan_vae.original_layout(wan_vae.wan_vae_config(vae_variant))
  torch.save({k: torch.from_numpy(0.02 * rng.standard_normal(t.original_shape, np.float32))
              for t in vae_layout.values() for k in t.keys}, str(d / "Wan2.2_VAE.pth"))
  largest = max(layout.values(), key=lambda t: math.prod(t.param_shape))
  return dict(index=str(index), vae=str(d / "Wan2.2_VAE.pth"), vace=str(d / "vace.safetensors"),
              lora=str(d / "lora.safetensors"),
              params=sum(math.prod(t.param_shape) for t in layout.values()),
              vae_params=sum(math.prod(t.param_shape) for t in vae_layout.values()),
              largest=(largest.keys[0], largest.param_shape),
              input_bytes=sum(os.path.getsize(d / n) for n in os.listdir(d)))


def run_child(spec: dict) -> tuple[dict, float, int]:
  """(summary, seconds, peak RSS bytes) of one conversion in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="")
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f"converter failed:\n{done.stderr[-3000:]}")
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  if peak <= before:  # ru_maxrss is the max over waited children: runs go small to large
    raise RuntimeError("peak RSS not above the previous run's: order the runs small first")
  summary = json.loads([l for l in done.stdout.splitlines() if l.startswith("SUMMARY ")][-1][8:])
  return summary, seconds, peak * 1024  # Linux reports KiB


def _case(tmp: Path, name: str, variant: str, overrides: dict, vae: str, lora_rank: int) -> dict:
  d = tmp / name
  d.mkdir()
  start = time.perf_counter()
  made = write_release(d, variant, overrides, vae, np.dtype(
      ml_dtypes.bfloat16 if _INPUT_DTYPE.value == "bfloat16" else np.float32))
  made["write_seconds"] = time.perf_counter() - start
  spec = dict(output=str(d / "export"), dit_path=made["index"], vae_path=made["vae"],
              vace=made["vace"], lora=made["lora"], dit=variant, vae=vae,
              dit_overrides=overrides, dtype=_DTYPE.value, lora_rank=lora_rank,
              batch_mb=_BATCH_MB.value, compress=_COMPRESS.value)
  made["summary"], made["seconds"], made["peak_rss"] = run_child(spec)
  made["output_bytes"] = sum(f.stat().st_size for f in (d / "export").rglob("*") if f.is_file())
  shutil.rmtree(d)
  return made


def _main() -> int:
  if _LAYERS.value < 1:
    raise InputError("--layers", "layers", f"need at least 1, got {_LAYERS.value}")
  out_size = 4 if _DTYPE.value == "float32" else 2
  tmp = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=_TMP.value))
  try:
    base = _case(tmp, "tiny", "tiny", {"lora_rank": 4}, "tiny", 4)
    layers = _LAYERS.value
    full = _case(tmp, "full", "ti2v_5b",
                 {"num_layers": layers, "vace_layers": list(range(0, layers, 2))}, _VAE.value, 32)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  key, shape = full["largest"]
  largest = math.prod(shape) * out_size
  model = (full["params"] + full["vae_params"]) * out_size
  extra = full["peak_rss"] - base["peak_rss"]
  mb = lambda n: f"{n / 2**20:,.0f} MiB"
  print(f"DiT at full width, {layers} layers (+ VACE, LoRA r32; VAE {_VAE.value}); "
        f"inputs {_INPUT_DTYPE.value}, export {_DTYPE.value}"
        f"{'' if _COMPRESS.value else ' uncompressed'}, save batches {_BATCH_MB.value} MB")
  print(f"  params: DiT+VACE+LoRA {full['params']:,}, VAE {full['vae_params']:,}")
  print(f"  input files {mb(full['input_bytes'])}; model in {_DTYPE.value} {mb(model)}; "
        f"export on disk {mb(full['output_bytes'])}")
  print(f"  largest param {shape} ({key} ...): {mb(largest)}")
  print(f"  convert: {full['seconds']:.1f} s wall ({full['summary']['seconds']:.1f} s in "
        f"convert(), {full['input_bytes'] / 2**20 / full['summary']['seconds']:.0f} MiB/s read)")
  print(f"  peak RSS {mb(full['peak_rss'])}; the tiny conversion's (imports, fixed cost) "
        f"{mb(base['peak_rss'])}; difference {mb(extra)}")
  print(f"  ratios: peak RSS / model {full['peak_rss'] / model:.2f}; (peak - fixed) / model "
        f"{extra / model:.2f}; (peak - fixed) / largest param {extra / largest:.2f}")
  print(json.dumps({"layers": layers, "dtype": _DTYPE.value, "input_dtype": _INPUT_DTYPE.value,
                    "vae": _VAE.value, "save_batch_mb": _BATCH_MB.value,
                    "compress": _COMPRESS.value,
                    "params": full["params"], "vae_params": full["vae_params"],
                    "input_bytes": full["input_bytes"], "model_bytes": model,
                    "largest_param_bytes": largest, "seconds": round(full["seconds"], 2),
                    "convert_seconds": round(full["summary"]["seconds"], 2),
                    "peak_rss": full["peak_rss"], "fixed_rss": base["peak_rss"]}))
  return 0


def main(argv) -> None:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]} (all options are --flags)")
  run_cli(_main)


if __name__ == "__main__":
  app.run(main)
