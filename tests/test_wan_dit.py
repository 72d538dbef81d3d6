"""Wan2.2 DiT + VACE + LoRA (mirage_jax/families/wan/dit.py) against diffusers and itself.

Oracles: diffusers' ``WanTransformer3DModel`` (per-token timesteps, the TI2V path) and
``WanVACETransformer3DModel`` (uniform timestep), given the same random weights: generated
in the ORIGINAL (DiffSynth) naming from ``wan_dit.original_layout``, loaded into ours through
``original_layout.load_params`` and into diffusers through its own
``convert_wan_transformer_to_diffusers``. Pass criterion: max abs error <= 1e-4 * max|oracle|
in float32. Full-size checks run on abstract shapes only (``nnx.eval_shape``, torch meta).

Measured (CPU, float32, run with ``-s`` to print them): DiT with per-token timesteps max abs
err 2.8e-5 at output scale 4.58 (6.0e-6 relative); VACE 1.2e-5 at 4.59 (2.7e-6); time
embedding vs float64 4.3e-7 (a plain float32 ``cos(t f)``: 5.9e-5); LoRA forward vs merged
base ~5e-7 relative. diffusers itself computes the time embedding in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax.errors import InputError
from mirage_jax.families.wan import original_layout
from mirage_jax.families.wan import dit as wan_dit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

REL_TOL = 1e-4


# ----------------------------------------------------------------------------- helpers


def _tiny(**overrides):
  cfg = wan_dit.wan_dit_config("tiny")
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def _random_original(cfg, seed: int, groups=("dit", "vace")) -> dict[str, np.ndarray]:
  """Random tensors for every original key of ``cfg``'s layout in ``groups``."""
  return original_layout.random_original(wan_dit.original_layout(cfg), seed,
                                         keep=lambda k: wan_dit.key_group(k) in groups)


def _abstract(cfg) -> wan_dit.WanDiT:
  # No random init (its many small compiles cost ~25 s on a loaded 2-core machine): shapes
  # only, every value then comes from the weights.
  return nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))


def _ours(cfg, weights: dict[str, np.ndarray]) -> wan_dit.WanDiT:
  model = _abstract(cfg)
  wan_dit.load_original(model, lambda k: weights[k])
  return model


@functools.partial(nnx.jit, static_argnames=("num_reference", "deterministic"))
def _forward(model, latents, timesteps, text, vace_context=None, *, num_reference=0,
             deterministic=True, rngs=None):
  # One compiled graph: far cheaper here than op-by-op dispatch.
  return model(latents, timesteps, text, num_reference=num_reference,
               vace_context=vace_context, deterministic=deterministic, rngs=rngs)


def _diffusers_kwargs(cfg) -> dict:
  return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
              attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_channels,
              out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
              ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=cfg.eps,
              rope_max_seq_len=cfg.rope_positions)


def _diffusers(cfg, weights: dict[str, np.ndarray], vace: bool):
  kw = _diffusers_kwargs(cfg)
  if vace:
    model = diffusers.WanVACETransformer3DModel(
        **kw, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_channels)
  else:
    model = diffusers.WanTransformer3DModel(**kw)
  # The converter pops from its input: hand it a copy.
  sd = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v.copy())
                                             for k, v in weights.items()})
  model.load_state_dict(sd, strict=True)
  return model.eval().float()


def _max_err(got, want) -> tuple[float, float]:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max()), float(np.abs(want).max())


def _inputs(cfg, seed, b=2, f=5, hh=6, ww=4, lt=7):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((b, f, hh, ww, cfg.in_channels)).astype(np.float32)
  text = rng.standard_normal((b, lt, cfg.text_dim)).astype(np.float32)
  vace = rng.standard_normal((b, f, hh, ww, cfg.vace_in_channels)).astype(np.float32)
  return latents, text, vace


# ----------------------------------------------------------------------------- parity


def test_dit_matches_diffusers_per_token_timesteps():
  # Non-square latents (6x4 -> 3x2 tokens), 5 frames, batch 2, one timestep per frame
  # (frame 0 clean as in TI2V), fractional values.
  cfg = _tiny(vace=False)
  weights = _random_original(cfg, seed=1, groups=("dit",))
  latents, text, _ = _inputs(cfg, seed=2)
  b, f, hh, ww, _ = latents.shape
  timesteps = np.array([[0.0, 999.0, 999.0, 523.25, 1.5],
                        [0.0, 13.0, 250.7, 250.7, 1000.0]], np.float32)
  got = _forward(_ours(cfg, weights), jnp.asarray(latents), jnp.asarray(timesteps),
                 jnp.asarray(text))

  tokens_per_frame = (hh // 2) * (ww // 2)
  with torch.no_grad():
    want = _diffusers(cfg, weights, vace=False)(
        torch.from_numpy(latents).permute(0, 4, 1, 2, 3),
        torch.from_numpy(np.repeat(timesteps, tokens_per_frame, axis=1)),  # (B, seq_len)
        torch.from_numpy(text), return_dict=False)[0]
  err, scale = _max_err(got, want.permute(0, 2, 3, 4, 1).numpy())
  print(f"DiT per-token parity: max abs err {err:.3e}, scale {scale:.3f}, "
        f"rel {err / scale:.2e}")
  assert err <= REL_TOL * scale


def test_vace_matches_diffusers_uniform_timestep():
  cfg = _tiny()
  weights = _random_original(cfg, seed=3)
  # after_proj is zero in a fresh branch; random here so the hints matter.
  assert any(k.endswith("after_proj.weight") for k in weights)
  latents, text, vace = _inputs(cfg, seed=4, f=3, hh=4, ww=6)
  b, f = latents.shape[:2]
  timesteps = np.array([617.5, 42.0], np.float32)
  model = _ours(cfg, weights)
  per_frame = jnp.asarray(np.repeat(timesteps[:, None], f, 1))
  got = _forward(model, jnp.asarray(latents), per_frame, jnp.asarray(text), jnp.asarray(vace))
  no_hints = _forward(model, jnp.asarray(latents), per_frame, jnp.asarray(text))
  with torch.no_grad():
    want = _diffusers(cfg, weights, vace=True)(
        torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
        torch.from_numpy(text),
        control_hidden_states=torch.from_numpy(vace).permute(0, 4, 1, 2, 3),
        return_dict=False)[0]
  want = want.permute(0, 2, 3, 4, 1).numpy()
  err, scale = _max_err(got, want)
  print(f"VACE parity: max abs err {err:.3e}, scale {scale:.3f}, rel {err / scale:.2e}")
  assert err <= REL_TOL * scale
  # The hints matter (a model that dropped them would fail by far more than the tolerance).
  assert _max_err(no_hints, want)[0] > 100 * REL_TOL * scale


def test_sinusoidal_embedding_error_vs_float64():
  rng = np.random.default_rng(0)
  t = np.concatenate([np.arange(0, 1001, dtype=np.float64),
                      rng.uniform(0, 1000, 2000), [999.999, 0.001, 1000.0]]).astype(np.float32)
  half = 128
  freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
  arg = t.astype(np.float64)[:, None] * freqs
  want = np.concatenate([np.cos(arg), np.sin(arg)], -1)
  got = np.asarray(jax.jit(wan_dit.sinusoidal_embedding, static_argnums=1)(jnp.asarray(t), 256),
                   np.float64)
  err = np.abs(got - want).max()
  # The plain float32 formula, for the record.
  arg32 = jnp.asarray(t)[:, None] * jnp.asarray(freqs, jnp.float32)
  naive = np.asarray(jnp.concatenate([jnp.cos(arg32), jnp.sin(arg32)], -1), np.float64)
  naive_err = np.abs(naive - want).max()
  print(f"sinusoid vs float64: max abs err {err:.2e} (plain float32: {naive_err:.2e})")
  assert err < 1e-6
  assert err < naive_err / 20


def test_rope_tables_match_diffusers_and_reference_layout():
  # Non-reference tokens: diffusers' table at positions (t, h, w). Reference tokens: time
  # -R..-1 (cos even, sin odd), rows h..2h-1, columns unchanged.
  from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
  cfg = _tiny()
  hd = cfg.dim // cfg.num_heads
  rope = WanRotaryPosEmbed(hd, tuple(cfg.patch_size), cfg.rope_positions)
  t_dim, h_dim, w_dim = rope.t_dim, rope.h_dim, rope.w_dim
  cos_tab = rope.freqs_cos.double().numpy()[:, 0::2]  # (positions, hd/2)
  sin_tab = rope.freqs_sin.double().numpy()[:, 0::2]
  r, f, rows, cols = 2, 5, 3, 4
  cos, sin = wan_dit.rope_tables(cfg, f, rows, cols, num_reference=r)
  cos = cos.reshape(f, rows, cols, -1)
  sin = sin.reshape(f, rows, cols, -1)
  ts, hs = slice(0, t_dim // 2), slice(t_dim // 2, (t_dim + h_dim) // 2)
  ws = slice((t_dim + h_dim) // 2, (t_dim + h_dim + w_dim) // 2)
  for fi in range(f):
    ref = fi < r
    t_pos = fi - r
    for hi in range(rows):
      for wi in range(cols):
        h_pos = hi + rows if ref else hi
        np.testing.assert_allclose(cos[fi, hi, wi, ts], cos_tab[abs(t_pos), ts], atol=1e-6)
        np.testing.assert_allclose(sin[fi, hi, wi, ts], np.sign(t_pos) * sin_tab[abs(t_pos), ts]
                                   if t_pos else 0 * sin_tab[0, ts], atol=1e-6)
        np.testing.assert_allclose(cos[fi, hi, wi, hs], cos_tab[h_pos, hs], atol=1e-6)
        np.testing.assert_allclose(sin[fi, hi, wi, hs], sin_tab[h_pos, hs], atol=1e-6)
        np.testing.assert_allclose(cos[fi, hi, wi, ws], cos_tab[wi, ws], atol=1e-6)
        np.testing.assert_allclose(sin[fi, hi, wi, ws], sin_tab[wi, ws], atol=1e-6)


# ----------------------------------------------------------------------------- LoRA


def _with_random_lora(cfg, seed) -> wan_dit.WanDiT:
  """A model with random base, VACE and LoRA weights (B nonzero)."""
  weights = _random_original(cfg, seed, groups=("dit", "vace", "lora"))
  assert any(k.endswith("lora_B.weight") for k in weights)
  return _ours(cfg, weights)


def test_lora_forward_equals_merged_base():
  cfg = _tiny(lora_rank=4, lora_alpha=8.0)
  model = _with_random_lora(cfg, seed=5)
  latents, text, vace = _inputs(cfg, seed=6, b=1, f=4)
  ts = jnp.asarray([[0.0, 700.0, 700.0, 0.0]])
  args = (jnp.asarray(latents), ts, jnp.asarray(text))
  args = args + (jnp.asarray(vace[:, 1:]),)
  kw = dict(num_reference=1)
  with_lora = _forward(model, *args, **kw)

  base_cfg = _tiny(lora_rank=0)
  base = _abstract(base_cfg)
  merged = wan_dit.merge_lora(nnx.state(model, nnx.Param), cfg)
  assert not any(p[-1].startswith("lora") for p, _ in nnx.to_flat_state(merged))
  nnx.update(base, merged)
  merged_out = _forward(base, *args, **kw)
  err, scale = _max_err(merged_out, with_lora)
  print(f"LoRA vs merged: max abs err {err:.3e}, scale {scale:.3f}")
  assert err <= 1e-5 * scale

  # The adapters change the output (B is nonzero), so the comparison above means something.
  plain = _abstract(base_cfg)
  nnx.update(plain, nnx.State.from_flat_path(
      {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
       if not p[-1].startswith("lora")}))
  assert _max_err(_forward(plain, *args, **kw), with_lora)[0] > 1e-2 * scale

  # The flat-dict form (the converter's) merges to the same kernels.
  flat = {tuple(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  merged_flat = wan_dit.merge_lora(flat, cfg)
  for p, v in nnx.to_flat_state(merged):
    np.testing.assert_allclose(merged_flat[tuple(map(str, p))], np.asarray(v.get_value()),
                               rtol=1e-6, atol=1e-6)
  assert set(merged_flat) == {tuple(map(str, p)) for p, _ in nnx.to_flat_state(merged)}
  # One layer's slices at a time (no stacked axis), as a streaming converter merges.
  q = ("blocks", "self_attn", "o")
  for i in range(cfg.num_layers):
    one = {q + (n,): flat[q + (n,)][i] for n in ("kernel", "lora_a", "lora_b", "bias")}
    np.testing.assert_allclose(wan_dit.merge_lora(one, cfg)[q + ("kernel",)],
                               merged_flat[q + ("kernel",)][i], rtol=1e-6, atol=1e-6)
  # A nested dict of arrays.
  nested = wan_dit.merge_lora(nnx.state(model, nnx.Param).to_pure_dict(), cfg)
  np.testing.assert_allclose(nested["blocks"]["ffn_out"]["kernel"],
                             merged_flat[("blocks", "ffn_out", "kernel")], rtol=1e-6, atol=1e-6)
  assert "lora_a" not in nested["blocks"]["ffn_out"]


def test_lora_dropout_only_in_training():
  cfg = _tiny(lora_rank=4, lora_alpha=8.0, lora_dropout=0.5)
  model = _with_random_lora(cfg, seed=7)
  latents, text, _ = _inputs(cfg, seed=8, b=1, f=3)
  args = (jnp.asarray(latents), jnp.full((1, 3), 300.0), jnp.asarray(text))
  eval_out = _forward(model, *args)
  a = _forward(model, *args, deterministic=False, rngs=nnx.Rngs(dropout=1))
  again = _forward(model, *args, deterministic=False, rngs=nnx.Rngs(dropout=1))
  other = _forward(model, *args, deterministic=False, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
  assert np.abs(np.asarray(a) - np.asarray(eval_out)).max() > 1e-3
  assert np.abs(np.asarray(a) - np.asarray(other)).max() > 1e-3
  with pytest.raises(InputError):
    model(*args, deterministic=False)


def test_fresh_init():
  cfg = _tiny(lora_rank=4)
  model = wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0))
  flat = {tuple(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # The reference's training init: LoRA B zero (A random), VACE after_proj zero, RMSNorm
  # and norm3 scales one; everything else random.
  for path, v in flat.items():
    assert v.dtype == np.float32, path
    if path[-1] == "lora_b" or path[:3] == ("vace", "blocks", "after_proj"):
      assert not v.any(), path
    elif path[-1] in ("norm_q", "norm_k", "norm3_scale"):
      assert np.all(v == 1.0), path
    elif path[-1] == "norm3_bias":
      assert not v.any(), path
    else:
      assert np.abs(v).min() < np.abs(v).max(), path


def test_trainable_filter_selects_adapters_and_vace():
  cfg = _tiny(lora_rank=4)
  model = _with_random_lora(cfg, seed=15)
  paths = lambda flt: {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, flt))}
  everything = paths(nnx.Param)
  trainable = paths(wan_dit.trainable_filter(cfg))
  frozen = paths(wan_dit.frozen_filter(cfg))
  lora = {p for p in everything if p[-1] in ("lora_a", "lora_b")}
  vace = {p for p in everything if p[0] == "vace"}
  assert lora and vace
  assert trainable == lora | vace
  assert frozen == everything - trainable
  assert paths(wan_dit.trainable_filter(cfg, ("lora",))) == lora
  assert paths(wan_dit.trainable_filter(cfg, ("vace",))) == vace
  assert paths(wan_dit.trainable_filter(_tiny(), ("lora",))) == set()  # rank 0: none
  # 'base': every param outside the VACE branch and the adapters, freely combined.
  base = everything - lora - vace
  assert base and paths(wan_dit.trainable_filter(cfg, ("base",))) == base
  assert paths(wan_dit.trainable_filter(cfg, ("base", "lora"))) == base | lora
  assert paths(wan_dit.trainable_filter(cfg, ("vace", "base"))) == base | vace
  assert paths(wan_dit.trainable_filter(cfg, ("base", "vace", "lora"))) == everything
  assert paths(wan_dit.frozen_filter(cfg, ("base", "vace", "lora"))) == set()
  assert paths(wan_dit.frozen_filter(cfg, ("base",))) == lora | vace
  with pytest.raises(InputError, match="bogus"):
    wan_dit.trainable_filter(cfg, ("base", "bogus"))
  # Gradients through the filter reach exactly those params, and all of them.
  latents, text, vace_in = _inputs(cfg, seed=9, b=1, f=2)
  diff = nnx.DiffState(0, wan_dit.trainable_filter(cfg))

  @nnx.jit
  @nnx.grad(argnums=diff)
  def grad_fn(m):
    return jnp.sum(m(jnp.asarray(latents), jnp.asarray([[0.0, 10.0]]), jnp.asarray(text),
                     vace_context=jnp.asarray(vace_in)) ** 2)
  grads = {tuple(map(str, p)): np.asarray(g.get_value())
           for p, g in nnx.to_flat_state(grad_fn(model))}
  assert set(grads) == trainable
  assert all(np.abs(g).max() > 0 for g in grads.values()), [p for p, g in grads.items()
                                                           if not np.abs(g).max()]


# ----------------------------------------------------------------------------- structure


def test_scan_and_loop_agree():
  cfg = _tiny(lora_rank=4, remat="full")
  model = _with_random_lora(cfg, seed=10)
  loop_cfg = _tiny(lora_rank=4, scan_layers=False)
  loop = _abstract(loop_cfg)
  nnx.update(loop, nnx.state(model, nnx.Param))
  latents, text, vace = _inputs(cfg, seed=11, b=1, f=4)
  ts = jnp.asarray([[0.0, 0.0, 900.0, 900.0]])
  args = (jnp.asarray(latents), ts, jnp.asarray(text), jnp.asarray(vace[:, 2:]))
  a = _forward(model, *args, num_reference=2)
  b = _forward(loop, *args, num_reference=2)
  err, scale = _max_err(b, a)
  assert err <= 1e-6 * scale


def test_bfloat16_close_to_float32():
  cfg = _tiny()
  weights = _random_original(cfg, seed=12)
  f32 = _ours(cfg, weights)
  b16 = _ours(_tiny(precision="bf16"), weights)
  latents, text, vace = _inputs(cfg, seed=13, b=1, f=3)
  args = (jnp.asarray(latents), jnp.full((1, 3), 500.0), jnp.asarray(text))
  a = _forward(f32, *args, jnp.asarray(vace))
  b = _forward(b16, *args, jnp.asarray(vace))
  assert b.dtype == jnp.float32
  err, scale = _max_err(b, a)
  assert err <= 5e-2 * scale, (err, scale)


def test_bad_inputs_raise_input_error():
  cfg = _tiny()
  model = _abstract(cfg)
  x = jnp.zeros((1, 3, 4, 4, cfg.in_channels))
  t = jnp.zeros((1, 3))
  txt = jnp.zeros((1, 2, cfg.text_dim))
  bad = [dict(latents=jnp.zeros((1, 3, 4, 4, 5))), dict(latents=jnp.zeros((1, 3, 5, 4, 48))),
         dict(timesteps=jnp.zeros((1, 2))), dict(text=jnp.zeros((1, 2, 3))),
         dict(num_reference=3), dict(vace_context=jnp.zeros((1, 3, 4, 4, 96)), num_reference=1)]
  for case in bad:
    kw = dict(latents=x, timesteps=t, text=txt)
    kw.update(case)
    with pytest.raises(InputError):
      model(kw.pop("latents"), kw.pop("timesteps"), kw.pop("text"), **kw)
  with pytest.raises(InputError):
    _abstract(_tiny(vace=False))(
        x, t, txt, vace_context=jnp.zeros((1, 3, 4, 4, 96)))


# ----------------------------------------------------------------------------- full size


@pytest.fixture(scope="module")
def full():
  cfg = wan_dit.wan_dit_config("ti2v_5b")
  model = nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  return cfg, model


def test_full_size_parameter_counts(full):
  cfg, model = full
  flat = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  layout = wan_dit.original_layout(cfg)
  assert set(flat) == set(layout)
  counts, keys = {"dit": 0, "vace": 0, "lora": 0}, {"dit": 0, "vace": 0, "lora": 0}
  for path, t in layout.items():
    assert tuple(flat[path].shape) == t.param_shape, path
    groups = {wan_dit.key_group(k) for k in t.keys}
    assert len(groups) == 1, path
    g = groups.pop()
    keys[g] += len(t.keys)
    counts[g] += math.prod(flat[path].shape)
    # LoRA params are the LoRAParam type; VACE ones live under 'vace'.
    assert isinstance(flat[path], wan_dit.LoRAParam) == (g == "lora"), path
    assert (path[0] == "vace") == (g == "vace"), path
  assert keys == {"dit": 825, "vace": 439, "lora": 600}
  assert counts["dit"] == 4_999_787_712
  assert counts["vace"] == 2_607_077_376
  assert counts["lora"] == 30 * 32 * (8 * (3072 + 3072) + (3072 + 14336) + (14336 + 3072))
  # Every param has one logical axis name per dimension (the mesh rules shard by them).
  for path, v in flat.items():
    axes = v.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(v.shape), (path, axes, v.shape)
    if path[0] in ("blocks",) or path[:2] == ("vace", "blocks"):
      assert axes[0] == "layers", path


def _meta_state(layout, groups) -> dict:
  return {k: torch.empty(t.original_shape, device="meta")
          for t in layout.values() for k in t.keys if wan_dit.key_group(k) in groups}


def test_full_size_keys_convert_to_diffusers_models(full):
  cfg, _ = full
  layout = wan_dit.original_layout(cfg)
  kw = _diffusers_kwargs(cfg)
  with torch.device("meta"):
    dit = diffusers.WanTransformer3DModel(**kw)
    vace = diffusers.WanVACETransformer3DModel(
        **kw, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_channels)
  for model, groups in ((dit, ("dit",)), (vace, ("dit", "vace"))):
    converted = convert_wan_transformer_to_diffusers(_meta_state(layout, groups))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert got == want, (sorted(set(got) ^ set(want))[:10])


def test_full_size_lora_keys_name_dit_linears(full):
  cfg, _ = full
  layout = wan_dit.original_layout(cfg)
  shapes = {k: t.original_shape for t in layout.values() for k in t.keys}
  lora = [k for k in shapes if wan_dit.key_group(k) == "lora"]
  assert len(lora) == 600
  targets = set()
  for k in lora:
    assert k.startswith("pipe.dit.blocks.")
    module, kind = k[len("pipe.dit."):].rsplit(".lora_", 1)
    weight = shapes[module + ".weight"]
    targets.add(module.split(".", 2)[2])
    if kind == "A.weight":
      assert shapes[k] == (cfg.lora_rank, weight[1]), k
    else:
      assert kind == "B.weight" and shapes[k] == (weight[0], cfg.lora_rank), k
  assert targets == {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"} | {
      "ffn.0", "ffn.2"}


def test_layout_roundtrip():
  cfg = _tiny(lora_rank=4)
  layout = wan_dit.original_layout(cfg)
  weights = _random_original(cfg, seed=14, groups=("dit", "vace", "lora"))
  params = original_layout.load_params(layout, weights.__getitem__)
  for path, t in layout.items():
    for i, k in enumerate(t.keys):
      ours = params[path][i] if t.stacked else params[path]
      np.testing.assert_array_equal(t.to_original(ours), weights[k])


def test_shards_on_a_mesh_with_the_same_output():
  from mirage_jax import sharding
  cfg = _tiny(lora_rank=4)
  model = _with_random_lora(cfg, seed=16)
  graphdef, params = nnx.split(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  assert tuple(specs["blocks"]["self_attn"]["q"]["kernel"].get_value()) == (
      "layers", "embed", "heads", "head_dim")
  assert tuple(specs["blocks"]["ffn_in"]["lora_b"].get_value()) == ("layers", None, "mlp")
  mesh = sharding.make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
  shardings = sharding.logical_to_sharding(specs, mesh, shapes=params)
  ffn = shardings["blocks"]["ffn_in"]["kernel"].get_value()
  assert ffn.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  sharded = jax.device_put(params, shardings)
  latents, text, vace = _inputs(cfg, seed=17, b=2, f=5, hh=6, ww=4)
  args = (jnp.asarray(latents), jnp.asarray([[0.0, 0.0, 0.0, 800.0, 800.0]] * 2),
          jnp.asarray(text), jnp.asarray(vace[:, 1:]))
  f = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a[:3], num_reference=1, vace_context=a[3]))
  ref = f(params, *args)
  with jax.set_mesh(mesh):
    out = f(sharded, *args)
  err, scale = _max_err(out, ref)
  assert err <= 1e-5 * scale
