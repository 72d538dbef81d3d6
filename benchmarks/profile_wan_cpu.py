"""Where the CPU time of the tiny Wan DiT / VAE goes: ours (XLA ops) beside diffusers (torch ops).

Usage: python benchmarks/profile_wan_cpu.py [--model dit|attention|vae_encode|vae_decode]
    [--calls 5] [--top 15] [--frames/--height/--width as the two bench scripts] [--impl auto]

Builds the same models and inputs as ``bench_wan_dit.py`` / ``bench_wan_vae.py`` (tiny configs,
the same random weights on both sides), warms both up, then records ``--calls`` calls of each:
ours under ``jax.profiler.trace`` (the XLA CPU runtime's per-op events, read back with
``jax.profiler.ProfileData``), diffusers under ``torch.profiler`` (per-aten-op self CPU time).
Prints, per side, the total and the ``--top`` ops by time per call, each grouped by kind
(convolution, dot/matmul, fusion/elementwise, ...), so the two tables line up by kind, and for
ours the busy time of every XLA runtime thread (does XLA use more than one core?).
``--model attention``: the DiT's self-attention alone at the same token count (``--impl``:
ours' implementation, default 'auto' = what the DiT runs) beside torch's
``scaled_dot_product_attention``, profiled and then timed interleaved (CPU clock).
Run it pinned to one core (``taskset -c 0``) on a loaded machine: per-op times then do not
include other processes' slices.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirage_jax.errors import InputError, run_cli  # noqa: E402

_KINDS = (("conv", r"conv"), ("matmul", r"dot|matmul|mm\b|addmm|bmm|linear|gemm"),
          ("attention", r"attention|softmax"), ("copy/layout", r"copy|transpose|cat|pad|slice|"
                                                             r"contiguous|clone|permute"),
          ("loop", r"while|scan|call"), ("elementwise/fusion", r"."))


def kind(name: str) -> str:
  """Coarse kind of an op name (XLA thunk/fusion or aten op), for lining the sides up."""
  low = name.lower()
  return next(k for k, pattern in _KINDS if re.search(pattern, low))


def _table(title: str, per_op: dict[str, float], calls: int, top: int) -> None:
  total = sum(per_op.values())
  print(f"\n{title}: {total / calls * 1e3:.2f} ms per call in profiled ops")
  by_kind = collections.Counter()
  for name, t in per_op.items():
    by_kind[kind(name)] += t
  print("  by kind: " + ", ".join(f"{k} {t / calls * 1e3:.2f} ms ({t / total:.0%})"
                                  for k, t in by_kind.most_common()))
  for name, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {t / calls * 1e3:8.3f} ms  {t / total:5.1%}  [{kind(name)}] {name[:90]}")


ANY_THREAD = "any thread"


def _busy(intervals: list[tuple[int, int]]) -> int:
  """Nanoseconds covered by the union of (start, end) intervals (nested events count once)."""
  total, end = 0, None
  for a, b in sorted(intervals):
    if end is None or a > end:
      total += b - a
      end = b
    elif b > end:
      total += b - end
      end = b
  return total


def profile_jax(fn, calls: int, threads: dict | None = None) -> dict[str, float]:
  """Seconds per XLA op name over ``calls`` calls of ``fn`` (already compiled).

  ``threads``: if given, filled with thread name -> seconds that thread ran XLA ops (union of
  its op events, so a loop's body inside the loop's own event counts once), and
  ``ANY_THREAD`` -> seconds in which any thread ran one: the threads' sum over it is the
  average number of cores XLA kept busy (a loop may move between threads, so one thread's
  share alone says little)."""
  import jax  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn())
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  every = []  # all threads' op spans
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      # The XLA CPU runtime's per-thunk events; python/TraceMe lines are left out.
      if "XLA" not in line.name and "tf_" not in line.name and "Xla" not in line.name:
        continue
      spans = []
      for ev in line.events:
        if not ev.name.startswith("ThunkExecutor"):  # the executor's spans enclose the ops
          per_op[ev.name] += ev.duration_ns * 1e-9
          spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
      if threads is not None and spans:
        threads[line.name] = threads.get(line.name, 0.0) + _busy(spans) * 1e-9
        every.extend(spans)
  if threads is not None:
    threads[ANY_THREAD] = _busy(every) * 1e-9
  return per_op


def profile_torch(fn, calls: int) -> dict[str, float]:
  """Self CPU seconds per aten op over ``calls`` calls of ``fn``."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      fn()
  return {e.key: e.self_cpu_time_total * 1e-6 for e in prof.key_averages()
          if e.self_cpu_time_total > 0}


def _dit(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  from diffusers.loaders.single_file_utils import (  # pylint: disable=import-outside-toplevel
      convert_wan_transformer_to_diffusers)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=import-outside-toplevel
  from mirage_jax.families.wan import original_layout  # pylint: disable=import-outside-toplevel
  cfg = wan_dit.wan_dit_config("tiny")
  cfg.vace = False
  weights = original_layout.random_original(wan_dit.original_layout(cfg), 0)
  ours = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  wan_dit.load_original(ours, weights.__getitem__)
  theirs = diffusers.WanTransformer3DModel(
      patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
      attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_channels,
      out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
      ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
      qk_norm="rms_norm_across_heads", eps=cfg.eps)
  theirs.load_state_dict(convert_wan_transformer_to_diffusers(
      {k: torch.from_numpy(v.copy()) for k, v in weights.items()}), strict=True)
  theirs.eval()
  rng = np.random.default_rng(0)
  f, hh, ww = args.frames, args.height, args.width
  latents = rng.standard_normal((1, f, hh, ww, cfg.in_channels)).astype(np.float32)
  text = rng.standard_normal((1, 64, cfg.text_dim)).astype(np.float32)
  per_frame = np.linspace(0.0, 999.0, f, dtype=np.float32)[None]
  forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
  j_args = (jnp.asarray(latents), jnp.asarray(per_frame), jnp.asarray(text))
  t_args = (torch.from_numpy(latents).permute(0, 4, 1, 2, 3),
            torch.from_numpy(np.repeat(per_frame, (hh // 2) * (ww // 2), axis=1)),
            torch.from_numpy(text))
  return (lambda: forward(ours, *j_args)), (lambda: theirs(*t_args, return_dict=False))


def _attention(args):
  """The DiT's self-attention alone: (1, tokens, heads, head_dim) q, k, v of the tiny config."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=import-outside-toplevel
  from mirage_jax.nn import attention as attention_lib  # pylint: disable=import-outside-toplevel
  cfg = wan_dit.wan_dit_config("tiny")
  heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
  n = args.frames * (args.height // 2) * (args.width // 2)
  rng = np.random.default_rng(0)
  q, k, v = (2.0 * rng.standard_normal((1, n, heads, head_dim)).astype(np.float32)
             for _ in range(3))
  impl = attention_lib.check_impl(args.impl, "--impl")
  print(f"attention: {n} tokens, {heads} heads of {head_dim}, ours {impl!r} -> "
        f"{attention_lib.resolve(impl, heads * n * n)!r}")
  f = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, impl=impl))
  j_args = tuple(jnp.asarray(x) for x in (q, k, v))
  t_args = tuple(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                 for x in (q, k, v))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  return (lambda: f(*j_args)), (lambda: sdpa(*t_args))


def _vae(args, op: str):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan  # pylint: disable=import-outside-toplevel
  from mirage_jax.families.wan import vae as wv  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  from test_wan_vae import _diffusers_kwargs, _random_original, original_to_diffusers  # pylint: disable=import-outside-toplevel
  cfg = wv.wan_vae_config("tiny")
  sd = _random_original(cfg, 0)
  ours = wv.from_original(cfg, sd.__getitem__)
  ref = AutoencoderKLWan(**_diffusers_kwargs(cfg)).eval()
  ref.load_state_dict({original_to_diffusers(k, cfg.encoder_res_blocks, cfg.decoder_res_blocks):
                       torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  rng = np.random.default_rng(0)
  f, h, w = args.frames, args.height, args.width
  if op == "encode":
    video = np.clip(rng.standard_normal((1, f, h, w, 3)) * 0.5, -1, 1).astype(np.float32)
    v_t = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))
    v_j = jnp.asarray(video)
    return (lambda: wv.jit_encode(ours, v_j)), (lambda: ref.encode(v_t).latent_dist.mean)
  z = rng.standard_normal((1, (f - 1) // 4 + 1, h // 16, w // 16, 48)).astype(np.float32)
  raw = z * np.asarray(cfg.latents_std, np.float32) + np.asarray(cfg.latents_mean, np.float32)
  z_t = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 4, 1, 2, 3)))
  z_j = jnp.asarray(z)
  return (lambda: wv.jit_decode(ours, z_j)), (lambda: ref.decode(z_t).sample)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("dit", "attention", "vae_encode", "vae_decode"),
                      default="dit")
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--frames", type=int, default=None, help="DiT: 9 latent; VAE: 9 video")
  parser.add_argument("--height", type=int, default=None, help="DiT: 16 latent; VAE: 64")
  parser.add_argument("--width", type=int, default=None, help="DiT: 16 latent; VAE: 96")
  parser.add_argument("--impl", default="auto", help="--model attention: ours' implementation "
                      "(nn/attention.py IMPLS)")
  parser.add_argument("--pairs", type=int, default=7, help="--model attention: interleaved "
                      "timing rounds after the profile (CPU clock; 0: none)")
  args = parser.parse_args()
  dit = args.model in ("dit", "attention")
  args.frames = args.frames or 9
  args.height = args.height or (16 if dit else 64)
  args.width = args.width or (16 if dit else 96)
  if args.calls < 1 or args.top < 1:
    raise InputError("--calls/--top", "count", "must be >= 1")
  import torch  # pylint: disable=import-outside-toplevel
  build = {"dit": _dit, "attention": _attention}.get(args.model)
  ours, theirs = build(args) if build else _vae(args, args.model.split("_")[1])
  import jax  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    for _ in range(2):  # compile / warm caches
      jax.block_until_ready(ours())
      theirs()
  print(f"{args.model} {args.frames}x{args.height}x{args.width}, torch threads "
        f"{torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}, load "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
  threads = {}
  _table("ours (XLA CPU ops)", profile_jax(ours, args.calls, threads), args.calls, args.top)
  span = threads.pop(ANY_THREAD, 0.0)
  print("  XLA runtime threads, busy ms per call: " + ", ".join(
      f"{name} {t / args.calls * 1e3:.2f}" for name, t in sorted(threads.items(), key=lambda kv: -kv[1])))
  if span:
    print(f"  any XLA thread busy {span / args.calls * 1e3:.2f} ms per call: on average "
          f"{sum(threads.values()) / span:.2f} threads at work")
  _table("diffusers (torch ops, self time)", profile_torch(theirs, args.calls), args.calls,
         args.top)
  if args.model == "attention" and args.pairs > 0:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import timing  # pylint: disable=import-outside-toplevel
    with torch.no_grad():
      print(timing.compare({"ours": ours, "torch": theirs}, pairs=args.pairs, warmup=1,
                           clock=timing.CLOCKS["cpu"], label="attention").format())
  return 0


if __name__ == "__main__":
  run_cli(main)
