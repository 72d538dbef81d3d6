"""Writes ``tests/goldens/wan_reference.npz``: outputs of the reference's own DiT + VACE code.

diffusers can serve as the oracle for most of the Wan2.2 DiT, but not for two things Mirage
adds: the reference-frame RoPE (reference tokens at t positions -R..-1 and h positions
h..2h-1) and VACE under per-token timesteps. For those the reference code itself is the
oracle. This script is run BY HAND (never at test time) against a local checkout of
microsoft/LatentSpatialMemory, on CPU, in float32:

  git clone https://github.com/microsoft/LatentSpatialMemory /tmp/lsm_ref
  git -C /tmp/lsm_ref checkout b2cd7383140ca0e11cbb0bc9594a7c8286b6a427  # the goldens' reference_commit
  .venv/bin/python tests/goldens/make_wan_goldens.py \\
      --reference=/tmp/lsm_ref --output=tests/goldens/wan_reference.npz

It imports (never copies) ``src/mirage/spatia/wan_video_dit.py`` (``WanModel``),
``wan_video_vace.py`` (``VaceWanModel``) and ``wan_video_new.py`` (``model_fn_wan_video``,
which assembles references/target/preceding, the per-token timesteps, the RoPE tables and the
VACE hints). Optional dependencies of those modules that are not installed (diffsynth, ftfy,
transformers, torchvision, flash-attn, ...) are replaced by empty stand-in modules before the
import; none of them is on the path this script calls (attention falls back to PyTorch SDPA).
Needs torch, einops, numpy, diffusers (imported by the reference's scheduler module).

A tiny model in the original naming and configuration (TI2V: separated timesteps, fused first
frame latent): dim 40, 2 heads of 20 (RoPE split t/h/w = 8/6/6, uneven like the real
44/42/42), 4 layers, ffn 80, text_dim 32, freq_dim 256, in/out 48, patch (1,2,2); VACE on
layers (0, 2) with 96 input channels. Every tensor is random from a fixed seed (norm gains and
VACE ``after_proj`` included, so a wrongly loaded one shows).

Cases (``R`` reference, ``T`` target, ``P`` preceding latent frames; latent 6x10, i.e. 3x5
tokens per frame; batch 2, each sample its own reference call since the reference's
per-token timestep path is batch-1 only). All cases share one set of inputs: 2 reference +
3 target + 2 preceding latent frames, a VACE context for the 5 non-reference frames and the
text; the R=0 cases drop the 2 reference frames and keep everything else:
  refs        R=2 T=3 P=2, DiT only
  refs_vace   R=2 T=3 P=2, with VACE context for the T+P non-reference frames
  noref       R=0 T=3 P=2, DiT only (sanity: no reference RoPE)
  noref_vace  R=0 T=3 P=2, with VACE
Timesteps per latent frame: [0]*R + [0, t, ..., t] + [0]*P, t differs per sample (non-integer
on purpose; the model takes the 0..1000 scale).

npz layout (ONE file, regenerated only by this script, never edited by hand):
  ``config``            JSON string: the reference's constructor kwargs (``dit``, ``vace``),
                        the cases, the seed and the reference commit.
  ``w/<key>``           every DiT and VACE weight, original key names and shapes, float32
                        (VACE keys start with ``vace_``, exactly as in ``vace.safetensors``).
  ``inputs/latents``    (B, 7, H, W, 48)   OUR layout: channels-last, frames [refs|target|prec]
  ``inputs/vace``       (B, 5, H, W, 96)   channels-last, the 5 non-reference frames
  ``inputs/text``       (B, Lt, text_dim)  text-encoder output (before ``text_embedding``)
  ``<case>/num_reference``  scalar int R; the case's latents are ``inputs/latents[:, 2-R:]``
  ``<case>/with_vace``  scalar bool; if set the case's VACE context is ``inputs/vace``
  ``<case>/timesteps``  (B, F)             per latent frame, 0..1000, F = R+5
  ``<case>/output``     (B, F, H, W, 48)   channels-last, the reference's prediction
All arrays are stored in our channels-last layout: the script transposes the reference's
(B, C, F, H, W) tensors, so the test transposes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import types

import numpy as np

SEED = 20240611
DIT_KWARGS = dict(
    dim=40, in_dim=48, ffn_dim=80, out_dim=48, text_dim=32, freq_dim=256, eps=1e-6,
    patch_size=(1, 2, 2), num_heads=2, num_layers=4, has_image_input=False,
    seperated_timestep=True, require_vae_embedding=False, require_clip_embedding=False,
    fuse_vae_embedding_in_latents=True)
VACE_KWARGS = dict(
    vace_layers=(0, 2), vace_in_dim=96, patch_size=(1, 2, 2), has_image_input=False,
    dim=40, num_heads=2, ffn_dim=80, eps=1e-6)
LATENT_HW = (6, 10)
TEXT_LEN = 7
BATCH = 2
TARGET_T = (937.25, 421.5)  # target timestep per sample
NUM_REF, NUM_TARGET, NUM_PRECEDING = 2, 3, 2  # of the shared inputs
CASES = {
    # name: (R, T, P, with_vace); the R=0 cases drop the shared reference frames
    "refs": (2, 3, 2, False),
    "refs_vace": (2, 3, 2, True),
    "noref": (0, 3, 2, False),
    "noref_vace": (0, 3, 2, True),
}
# Modules the reference imports at module level but never uses on this path.
_OPTIONAL = ("diffsynth", "diffsynth.core", "diffsynth.core.vram", "diffsynth.diffusion",
             "diffsynth.diffusion.base_pipeline", "diffsynth.utils", "diffsynth.utils.lora",
             "ftfy", "transformers", "torchvision", "torchvision.transforms")


class _Inert:
  """Accepts any construction arguments and does nothing (class-level defaults only)."""

  def __init__(self, *args, **kwargs):
    pass


class _StandIn(types.ModuleType):
  """An empty module whose every attribute is a fresh inert class (subclassable)."""

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = type(name, (_Inert,), {})
    setattr(self, name, value)
    return value


def _install_stand_ins() -> list[str]:
  stubbed = []
  for name in _OPTIONAL:
    try:
      importlib.import_module(name)
    except ImportError:
      module = _StandIn(name)
      module.__path__ = []  # a package, so its submodules import
      sys.modules[name] = module
      stubbed.append(name)
  return stubbed


def _import_reference(reference: str):
  src = os.path.join(reference, "src")
  if not os.path.isfile(os.path.join(src, "mirage", "spatia", "wan_video_new.py")):
    raise SystemExit(f"--reference={reference}: no src/mirage/spatia/wan_video_new.py there")
  # The reference's scheduler module imports diffusers, which probes for transformers & co.
  # at import time: import it for real before any stand-in exists.
  importlib.import_module("diffusers.configuration_utils")
  importlib.import_module("diffusers.schedulers.scheduling_utils")
  stubbed = _install_stand_ins()
  sys.path.insert(0, src)
  dit_mod = importlib.import_module("mirage.spatia.wan_video_dit")
  vace_mod = importlib.import_module("mirage.spatia.wan_video_vace")
  new_mod = importlib.import_module("mirage.spatia.wan_video_new")
  return dit_mod, vace_mod, new_mod, stubbed


def _randomize(module, gen) -> None:
  """Every parameter random: the default init for matrices, noise on gains and biases."""
  import torch
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("weight") and p.ndim == 1:  # RMSNorm / LayerNorm gains
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith("modulation"):
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
      else:
        bound = 1.0 / (p[0].numel() ** 0.5)  # fan-in scale, as the default init
        p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def _reference_commit(reference: str) -> str:
  try:
    return subprocess.run(["git", "-C", reference, "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", required=True,
                      help="local checkout of microsoft/LatentSpatialMemory")
  parser.add_argument("--output", default="tests/goldens/wan_reference.npz")
  args = parser.parse_args(argv)

  import torch
  torch.set_grad_enabled(False)
  dit_mod, vace_mod, new_mod, stubbed = _import_reference(args.reference)
  gen = torch.Generator().manual_seed(SEED)
  torch.manual_seed(SEED)

  dit = dit_mod.WanModel(**DIT_KWARGS).float().eval()
  vace = vace_mod.VaceWanModel(**VACE_KWARGS).float().eval()
  _randomize(dit, gen)
  _randomize(vace, gen)

  out = {}
  for k, v in dit.state_dict().items():
    out["w/" + k] = v.numpy().astype(np.float32)
  for k, v in vace.state_dict().items():
    out["w/" + k] = v.numpy().astype(np.float32)

  h, w = LATENT_HW
  cl = lambda x: np.ascontiguousarray(x.permute(0, 2, 3, 4, 1).numpy().astype(np.float32))
  text = torch.randn((BATCH, TEXT_LEN, DIT_KWARGS["text_dim"]), generator=gen)
  all_latents = torch.randn(
      (BATCH, DIT_KWARGS["in_dim"], NUM_REF + NUM_TARGET + NUM_PRECEDING, h, w), generator=gen)
  all_vace = torch.randn(
      (BATCH, VACE_KWARGS["vace_in_dim"], NUM_TARGET + NUM_PRECEDING, h, w), generator=gen)
  out["inputs/latents"] = cl(all_latents)
  out["inputs/vace"] = cl(all_vace)
  out["inputs/text"] = text.numpy().astype(np.float32)
  for case, (r, t_frames, p, with_vace) in CASES.items():
    assert r in (0, NUM_REF) and (t_frames, p) == (NUM_TARGET, NUM_PRECEDING), case
    f = r + t_frames + p
    latents = all_latents[:, :, NUM_REF - r:]
    vace_ctx = all_vace if with_vace else None
    timesteps = torch.zeros((BATCH, f), dtype=torch.float32)
    for b in range(BATCH):
      timesteps[b, r + 1:r + t_frames] = TARGET_T[b]
    outputs = []
    for b in range(BATCH):
      # As the reference's inference loop calls it (mirage_pipeline.py): batch 1, one
      # timestep per latent frame, first-frame latent fused, vace_scale 1.
      y = new_mod.model_fn_wan_video(
          dit=dit, vace=vace if with_vace else None, latents=latents[b:b + 1].clone(),
          timestep=timesteps[b].clone(), context=text[b:b + 1].clone(),
          vace_context=None if vace_ctx is None else vace_ctx[b:b + 1].clone(),
          vace_scale=1.0, num_ref_frames=r, fuse_vae_embedding_in_latents=True)
      outputs.append(y)
    output = torch.cat(outputs, 0)
    assert output.shape == latents.shape, (output.shape, latents.shape)
    out[f"{case}/timesteps"] = timesteps.numpy()
    out[f"{case}/output"] = cl(output)
    out[f"{case}/num_reference"] = np.asarray(r, np.int32)
    out[f"{case}/with_vace"] = np.asarray(with_vace)
    print(f"{case}: latents {tuple(latents.shape)} "
          f"max|out| {np.abs(out[f'{case}/output']).max():.4f}")

  config = {
      "dit": {k: list(v) if isinstance(v, tuple) else v for k, v in DIT_KWARGS.items()},
      "vace": {k: list(v) if isinstance(v, tuple) else v for k, v in VACE_KWARGS.items()},
      "cases": {k: dict(zip(("R", "T", "P", "vace"), v)) for k, v in CASES.items()},
      "latent_hw": list(LATENT_HW), "text_len": TEXT_LEN, "batch": BATCH,
      "target_t": list(TARGET_T), "seed": SEED, "vace_scale": 1.0,
      "reference_commit": _reference_commit(args.reference),
      "torch": torch.__version__, "stand_in_modules": stubbed,
      "layout": "channels-last (B, F, H, W, C); weights in original names and shapes",
  }
  out["config"] = np.asarray(json.dumps(config, sort_keys=True))
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  np.savez_compressed(args.output, **out)
  print(f"wrote {args.output}: {len(out)} arrays, {os.path.getsize(args.output)} bytes")


if __name__ == "__main__":
  main()
