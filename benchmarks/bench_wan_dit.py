"""CPU forward time of the Wan DiT (tiny config): ours (jitted) vs diffusers (torch, no_grad).

Usage: python benchmarks/bench_wan_dit.py [--frames 9 --height 16 --width 16 --text 64
    --batch 1 --repeats 7 --warmup 2] [--vace]

Both models get the same random weights (generated in the original naming and loaded
through ``wan_dit.original_layout`` and diffusers' own converter). Without ``--vace``:
``WanTransformer3DModel`` with per-token timesteps (one per latent frame); with ``--vace``:
``WanVACETransformer3DModel`` with a uniform timestep and a 96-channel control input.
Ours is compiled and run once before timing; then the two run interleaved
(``benchmarks/timing.py``: ``--warmup`` discarded rounds, ``--repeats`` kept pairs) and the
median per-pair ratio ours / diffusers is printed with its IQR and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mirage_jax.errors import InputError, run_cli  # noqa: E402
from mirage_jax.families.wan import original_layout  # noqa: E402
from mirage_jax.families.wan import dit as wan_dit  # noqa: E402
import timing  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=9, help="latent frames")
  parser.add_argument("--height", type=int, default=16, help="latent height (even)")
  parser.add_argument("--width", type=int, default=16, help="latent width (even)")
  parser.add_argument("--text", type=int, default=64, help="text tokens")
  parser.add_argument("--batch", type=int, default=1)
  timing.add_flags(parser, pairs=7, warmup=2, pairs_flag="--repeats")
  parser.add_argument("--vace", action="store_true", help="time the VACE model")
  args = parser.parse_args()
  if args.height % 2 or args.width % 2:
    raise InputError("--height/--width", "size", f"must be even, got {args.height}x{args.width}")
  if min(args.frames, args.text, args.batch, args.pairs) < 1 or args.warmup < 0:
    raise InputError("command line", "frames/text/batch/repeats", "must be >= 1 (warmup >= 0)")
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  from diffusers.loaders.single_file_utils import (  # pylint: disable=import-outside-toplevel
      convert_wan_transformer_to_diffusers)

  cfg = wan_dit.wan_dit_config("tiny")
  cfg.vace = args.vace
  rng = np.random.default_rng(0)
  weights = original_layout.random_original(wan_dit.original_layout(cfg), 0)
  ours = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  wan_dit.load_original(ours, weights.__getitem__)
  kw = dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_channels,
            out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=cfg.eps)
  if args.vace:
    theirs = diffusers.WanVACETransformer3DModel(
        **kw, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_channels)
  else:
    theirs = diffusers.WanTransformer3DModel(**kw)
  theirs.load_state_dict(convert_wan_transformer_to_diffusers(
      {k: torch.from_numpy(v.copy()) for k, v in weights.items()}), strict=True)
  theirs.eval()

  b, f, hh, ww = args.batch, args.frames, args.height, args.width
  latents = rng.standard_normal((b, f, hh, ww, cfg.in_channels)).astype(np.float32)
  text = rng.standard_normal((b, args.text, cfg.text_dim)).astype(np.float32)
  vace = rng.standard_normal((b, f, hh, ww, cfg.vace_in_channels)).astype(np.float32)
  if args.vace:
    per_frame = np.full((b, f), 700.0, np.float32)
    torch_t = torch.full((b,), 700.0)
  else:
    per_frame = np.tile(np.linspace(0.0, 999.0, f, dtype=np.float32), (b, 1))
    torch_t = torch.from_numpy(np.repeat(per_frame, (hh // 2) * (ww // 2), axis=1))

  @nnx.jit
  def forward(model, x, t, c, v):
    return model(x, t, c, vace_context=v)

  j_args = (jnp.asarray(latents), jnp.asarray(per_frame), jnp.asarray(text),
            jnp.asarray(vace) if args.vace else None)
  t_args = (torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch_t, torch.from_numpy(text))
  t_kw = dict(return_dict=False)
  if args.vace:
    t_kw["control_hidden_states"] = torch.from_numpy(vace).permute(0, 4, 1, 2, 3)

  t0 = time.perf_counter()
  got = np.asarray(jax.block_until_ready(forward(ours, *j_args)))
  compile_s = time.perf_counter() - t0
  with torch.no_grad():
    want = theirs(*t_args, **t_kw)[0].permute(0, 2, 3, 4, 1).numpy()
    result = timing.compare({"ours": lambda: forward(ours, *j_args),
                             "diffusers": lambda: theirs(*t_args, **t_kw)},
                            pairs=args.pairs, warmup=args.warmup,
                            clock=timing.CLOCKS[args.clock],
                            label=f"DiT{' + VACE' if args.vace else ''} {f}x{hh}x{ww}")
  err = float(np.abs(got - want).max())
  tokens = f * (hh // 2) * (ww // 2)
  print(f"wan_dit tiny ({'VACE' if args.vace else 'DiT, per-token t'}): batch {b}, {f} latent "
        f"frames {hh}x{ww} ({tokens} tokens), {args.text} text tokens, "
        f"torch threads {torch.get_num_threads()}, ours' first call (compile) {compile_s:.2f} s, "
        f"max abs diff {err:.2e} (scale {np.abs(want).max():.2f})")
  print(result.format())
  print(result.format_row())
  return 0


if __name__ == "__main__":
  run_cli(main)
