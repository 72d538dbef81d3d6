"""CPU time of the Wan2.2 VAE (tiny config) encode/decode: ours (jitted) vs diffusers, one run.

Usage: python benchmarks/bench_wan_vae.py [--frames 9] [--height 64] [--width 96] [--repeats 7]
    [--warmup 1]
Both models carry the same random weights (original naming -> ours via original_layout, ->
diffusers via the test's key mapping). Ours is compiled first (the compile time is printed
apart); diffusers runs eagerly in torch. Encode, then decode: ours chunked (as the original),
ours whole-clip and diffusers run interleaved (``benchmarks/timing.py``: ``--warmup``
discarded rounds, ``--repeats`` kept rounds); printed: median times, the median per-round
ratio ours / diffusers with its IQR, and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mirage_jax.errors import InputError, run_cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=9)
  parser.add_argument("--height", type=int, default=64)
  parser.add_argument("--width", type=int, default=96)
  timing.add_flags(parser, pairs=7, warmup=1, pairs_flag="--repeats")
  args = parser.parse_args()
  if args.frames < 1 or (args.frames - 1) % 4:
    raise InputError("--frames", "frames", f"must be 1 + 4k, got {args.frames}")
  for name in ("height", "width"):
    if getattr(args, name) <= 0 or getattr(args, name) % 16:
      raise InputError(f"--{name}", name, f"must be a positive multiple of 16, "
                       f"got {getattr(args, name)}")
  if args.pairs < 1 or args.warmup < 0:
    raise InputError("--repeats", "repeats", f"need at least 1 (and --warmup >= 0), got "
                     f"{args.pairs} (--warmup {args.warmup})")

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import torch
  from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
  from mirage_jax.families.wan import vae as wv
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
  from test_wan_vae import _diffusers_kwargs, _random_original, original_to_diffusers

  cfg = wv.wan_vae_config("tiny")
  sd = _random_original(cfg, 0)
  ours = wv.from_original(cfg, sd.__getitem__)
  ref = AutoencoderKLWan(**_diffusers_kwargs(cfg)).eval()
  ref.load_state_dict({original_to_diffusers(k, cfg.encoder_res_blocks, cfg.decoder_res_blocks):
                       torch.from_numpy(v) for k, v in sd.items()}, strict=True)

  rng = np.random.default_rng(0)
  video = np.clip(rng.standard_normal((1, args.frames, args.height, args.width, 3)) * 0.5,
                  -1, 1).astype(np.float32)
  t_lat = (args.frames - 1) // 4 + 1
  latents = rng.standard_normal((1, t_lat, args.height // 16, args.width // 16, 48))
  latents = latents.astype(np.float32)
  v_j, z_j = jnp.asarray(video), jnp.asarray(latents)
  v_t = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))
  raw = latents * np.asarray(cfg.latents_std, np.float32) + np.asarray(cfg.latents_mean,
                                                                          np.float32)
  z_t = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 4, 1, 2, 3)))

  print(f"tiny Wan2.2 VAE, video {video.shape[1:]} <-> latents {latents.shape[1:]}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch threads "
        f"{torch.get_num_threads()}")
  compile_s = {}
  for chunked in (True, False):
    t0 = time.perf_counter()
    wv.jit_encode(ours, v_j, chunked=chunked).block_until_ready()
    compile_s["encode", chunked] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wv.jit_decode(ours, z_j, chunked=chunked).block_until_ready()
    compile_s["decode", chunked] = time.perf_counter() - t0
  print("compile (first call): " + ", ".join(
      f"{op} {'chunked' if c else 'whole clip'} {t:.1f} s" for (op, c), t in compile_s.items()))
  size = f"{args.frames}x{args.height}x{args.width}"
  with torch.no_grad():
    for op, ours_fn, ref_fn in (
        ("encode", lambda c: wv.jit_encode(ours, v_j, chunked=c),
         lambda: ref.encode(v_t).latent_dist.mean),
        ("decode", lambda c: wv.jit_decode(ours, z_j, chunked=c), lambda: ref.decode(z_t).sample)):
      result = timing.compare({"ours chunked": lambda: ours_fn(True),
                               "ours whole clip": lambda: ours_fn(False),
                               "diffusers": ref_fn},
                              pairs=args.pairs, warmup=args.warmup,
                              clock=timing.CLOCKS[args.clock], label=f"VAE {op} {size}")
      print(result.format())
      for side in ("ours chunked", "ours whole clip"):
        print(result.format_row(side).replace(f"| VAE {op}", f"| VAE {op}, {side[5:]},", 1))
  return 0


if __name__ == "__main__":
  run_cli(main)
