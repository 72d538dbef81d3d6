"""Wan2.2 VAE (mirage_jax.families.wan.vae): parity with diffusers' AutoencoderKLWan (the
Wan2.2 residual variant), chunked == whole clip, tiling, and the weight layout of
Wan2.2_VAE.pth.

Weights start random in the ORIGINAL naming (``wan2_2/modules/vae2_2.py``), listed from our
``original_layout``; they load into ours with ``original_layout.load_params`` and into
diffusers through the original -> diffusers key mapping below (diffusers ships no converter
for this VAE). Parity criterion: max abs error <= 1e-4 * max |oracle| in float32.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax.errors import InputError
from mirage_jax.families.wan import original_layout as ol
from mirage_jax.families.wan import vae as wv

torch = pytest.importorskip("torch")
diffusers_wan = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")

TOL = 1e-4


# ----------------------------------------------------------------------------- key mapping


_RES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
        "residual.6": "conv2", "shortcut": "conv_shortcut"}


def original_to_diffusers(key: str, enc_blocks: int, dec_blocks: int) -> str:
  """A key of Wan2.2_VAE.pth (vae2_2.py naming) -> the AutoencoderKLWan(is_residual=True) key.

  Read from the two codebases: vae2_2's ``conv1``/``conv2`` are diffusers' quant convs; its
  ``head`` (RMS_norm, SiLU, conv) is norm_out/conv_out; ``middle`` (res, attn, res) is the
  mid block; level i's ``downsamples``/``upsamples`` list holds the residual blocks and, after
  them, the Resample (diffusers' downsampler/upsampler); a ResidualBlock's Sequential indices
  0/2/3/6 are norm1/conv1/norm2/conv2.
  """
  m = re.fullmatch(r"conv([12])\.(weight|bias)", key)
  if m:
    return f"{'quant_conv' if m[1] == '1' else 'post_quant_conv'}.{m[2]}"
  part, rest = key.split(".", 1)
  assert part in ("encoder", "decoder"), key
  res = lambda s: next((s.replace(a, b, 1) for a, b in _RES.items() if s.startswith(a + ".")),
                       None)
  for pat, fn in [
      (r"conv1\.(.+)", lambda m: f"conv_in.{m[1]}"),
      (r"head\.0\.(.+)", lambda m: f"norm_out.{m[1]}"),
      (r"head\.2\.(.+)", lambda m: f"conv_out.{m[1]}"),
      (r"middle\.1\.(.+)", lambda m: f"mid_block.attentions.0.{m[1]}"),
      (r"middle\.([02])\.(.+)", lambda m: f"mid_block.resnets.{int(m[1]) // 2}.{res(m[2])}"),
  ]:
    m = re.fullmatch(pat, rest)
    if m:
      return f"{part}.{fn(m)}"
  level = "downsamples" if part == "encoder" else "upsamples"
  blocks, sampler = (enc_blocks, "downsampler") if part == "encoder" else (dec_blocks, "upsampler")
  new = "down_blocks" if part == "encoder" else "up_blocks"
  m = re.fullmatch(rf"{level}\.(\d+)\.{level}\.(\d+)\.(.+)", rest)
  assert m, key
  i, j, tail = m[1], int(m[2]), m[3]
  if j == blocks:  # the Resample after the residual blocks
    assert tail.split(".")[0] in ("resample", "time_conv"), key
    return f"{part}.{new}.{i}.{sampler}.{tail}"
  assert res(tail) is not None, key
  return f"{part}.{new}.{i}.resnets.{j}.{res(tail)}"


def _diffusers_kwargs(cfg) -> dict:
  return dict(base_dim=cfg.encoder_dim, decoder_base_dim=cfg.decoder_dim, z_dim=cfg.z_dim,
              dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.encoder_res_blocks,
              temperal_downsample=list(cfg.temporal_downsample), is_residual=True,
              in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
              scale_factor_spatial=16, latents_mean=list(cfg.latents_mean),
              latents_std=list(cfg.latents_std))


# ----------------------------------------------------------------------------- fixtures


def _random_original(cfg, seed: int) -> dict[str, np.ndarray]:
  """Random weights in the original naming and shapes, scaled so activations stay O(1)."""
  sd = ol.random_original(wv.original_layout(cfg), seed)
  # Keep most decoded pixels inside the [-1, 1] clamp, so decode parity is not trivial.
  sd["decoder.head.2.weight"] *= 0.5
  return sd


@pytest.fixture(scope="module")
def setup():
  cfg = wv.wan_vae_config("tiny")
  sd = _random_original(cfg, 0)
  ref = diffusers_wan.AutoencoderKLWan(**_diffusers_kwargs(cfg)).eval()
  mapped = {original_to_diffusers(k, cfg.encoder_res_blocks, cfg.decoder_res_blocks):
            torch.from_numpy(v) for k, v in sd.items()}
  ref.load_state_dict(mapped, strict=True)  # every diffusers tensor named exactly once
  model = wv.from_original(cfg, sd.__getitem__)  # no random init: the tensors come from sd
  rng = np.random.default_rng(1)
  # Non-square frames, T = 1 + 4k with k = 2; a smooth-ish video in [-1, 1].
  video = np.clip(rng.standard_normal((1, 9, 32, 48, 3)) * 0.5, -1, 1).astype(np.float32)
  latents = rng.standard_normal((1, 3, 2, 3, 48)).astype(np.float32)
  return dict(cfg=cfg, sd=sd, ref=ref, model=model, video=video, latents=latents, cache={})


def _ours(s, kind: str, chunked: bool = True) -> np.ndarray:
  key = (kind, chunked)
  if key not in s["cache"]:
    if kind == "encode":
      s["cache"][key] = np.asarray(wv.jit_encode(s["model"], jnp.asarray(s["video"]),
                                                 chunked=chunked))
    else:
      # Unclamped (shared with tiled_decode's compiled tile); clamped as ``decode`` does.
      raw = wv.jit_decode(s["model"], jnp.asarray(s["latents"]), chunked=chunked, clamp=False)
      s["cache"][key] = np.clip(np.asarray(raw), -1.0, 1.0)
  return s["cache"][key]


def _rel_err(ours: np.ndarray, oracle: np.ndarray) -> tuple[float, float]:
  assert ours.shape == oracle.shape
  scale = float(np.abs(oracle).max())
  return float(np.abs(ours - oracle).max()), scale


# ----------------------------------------------------------------------------- parity


def test_encode_matches_diffusers(setup):
  s = setup
  cfg = s["cfg"]
  x = torch.from_numpy(np.ascontiguousarray(s["video"].transpose(0, 4, 1, 2, 3)))
  with torch.no_grad():
    mu = s["ref"].encode(x).latent_dist.mean.numpy()  # raw mu, (B, 48, T_lat, h, w)
  mean = np.asarray(cfg.latents_mean, np.float32)[None, :, None, None, None]
  inv_std = 1.0 / np.asarray(cfg.latents_std, np.float32)[None, :, None, None, None]
  oracle = ((mu - mean) * inv_std).transpose(0, 2, 3, 4, 1)
  ours = _ours(s, "encode")
  assert ours.shape == (1, 3, 2, 3, 48)
  err, scale = _rel_err(ours, oracle)
  print(f"\nencode vs diffusers: max abs err {err:.3g}, scale {scale:.3g}, rel {err / scale:.3g}")
  assert scale > 0.1
  assert err <= TOL * scale


def test_decode_matches_diffusers(setup):
  s = setup
  cfg = s["cfg"]
  mean = np.asarray(cfg.latents_mean, np.float32)
  std = np.asarray(cfg.latents_std, np.float32)
  raw = s["latents"] * std + mean  # diffusers decodes raw latents
  z = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 4, 1, 2, 3)))
  with torch.no_grad():
    oracle = s["ref"].decode(z).sample.numpy().transpose(0, 2, 3, 4, 1)
  ours = _ours(s, "decode")
  assert ours.shape == (1, 9, 32, 48, 3)
  # Most pixels must be strictly inside the clamp range, or the comparison says little.
  assert np.mean(np.abs(oracle) < 0.999) > 0.5
  err, scale = _rel_err(ours, oracle)
  print(f"\ndecode vs diffusers: max abs err {err:.3g}, scale {scale:.3g}, rel {err / scale:.3g}")
  assert err <= TOL * scale


def test_chunked_equals_whole_clip(setup):
  s = setup
  for kind in ("encode", "decode"):
    chunked, whole = _ours(s, kind, True), _ours(s, kind, False)
    err, scale = _rel_err(whole, chunked)
    print(f"\n{kind}: chunked vs whole clip max abs err {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-5 * scale


def test_patchify_and_shortcuts_match_diffusers():
  rng = np.random.default_rng(3)
  cf = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))
  cl = lambda t: np.moveaxis(t.numpy(), 1, -1)
  video = rng.standard_normal((2, 3, 8, 12, 3)).astype(np.float32)
  p = wv.patchify(jnp.asarray(video))
  np.testing.assert_array_equal(np.asarray(p), cl(diffusers_wan.patchify(cf(video), 2)))
  np.testing.assert_array_equal(np.asarray(wv.unpatchify(p)), video)
  x = rng.standard_normal((1, 5, 4, 6, 8)).astype(np.float32)
  ref = diffusers_wan.AvgDown3D(8, 16, factor_t=2, factor_s=2)(cf(x))
  np.testing.assert_allclose(np.asarray(wv.avg_down(jnp.asarray(x), 16, 2, 2)), cl(ref),
                             rtol=1e-6, atol=1e-6)
  for first in (True, False):
    ref = diffusers_wan.DupUp3D(8, 4, factor_t=2, factor_s=2)(cf(x), first_chunk=first)
    np.testing.assert_array_equal(np.asarray(wv.dup_up(jnp.asarray(x), 4, 2, 2, first)), cl(ref))


def test_bf16_compute_close_to_f32(setup):
  s = setup
  cfg = wv.wan_vae_config("tiny")
  cfg.dtype = "bfloat16"
  model = wv.from_original(cfg, s["sd"].__getitem__)
  out = wv.jit_encode(model, jnp.asarray(s["video"]))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))
  err, scale = _rel_err(np.asarray(out), _ours(s, "encode"))
  print(f"\nbf16 encode vs f32: max abs err {err:.3g} (scale {scale:.3g})")
  assert err <= 0.1 * scale


# ----------------------------------------------------------------------------- tiling


def test_one_tile_equals_untiled(setup):
  s = setup
  m = s["model"]
  # The default tile (30, 52) latents covers these frames: one tile, weight 1 everywhere.
  assert wv.tile_tasks(2, 3, (30, 52), (15, 26)) == [(0, 30, 0, 52)]
  tiled = np.asarray(m.tiled_encode(jnp.asarray(s["video"])))
  np.testing.assert_allclose(tiled, _ours(s, "encode"), rtol=0, atol=1e-6)
  tiled = np.asarray(m.tiled_decode(jnp.asarray(s["latents"])))
  np.testing.assert_allclose(tiled, _ours(s, "decode"), rtol=0, atol=1e-6)


def _np_ramp_mask(h: int, w: int, top: bool, bottom: bool, left: bool, right: bool,
                  bh: int, bw: int) -> np.ndarray:
  """The blend weight of one tile, restated cell by cell: distance-based linear ramps."""
  out = np.ones((h, w), np.float64)
  for i in range(h):
    for j in range(w):
      wr = 1.0
      if not top and i < bh:
        wr = min(wr, (i + 1) / bh)
      if not bottom and h - 1 - i < bh:
        wr = min(wr, (h - i) / bh)
      wc = 1.0
      if not left and j < bw:
        wc = min(wc, (j + 1) / bw)
      if not right and w - 1 - j < bw:
        wc = min(wc, (w - j) / bw)
      out[i, j] = min(wr, wc)
  return out


def _np_tiled(fn, x: np.ndarray, rows: int, cols: int, size, stride, in_scale: int,
              out_scale: int, out_shape) -> np.ndarray:
  """Mirage's tiled blend restated in numpy around ``fn`` (one tile in, one tile out)."""
  values = np.zeros(out_shape, np.float64)
  weight = np.zeros(out_shape[2:4], np.float64)
  starts = lambda n, sz, st: [p for p in range(0, n, st) if p == 0 or p - st + sz < n]
  for r in starts(rows, size[0], stride[0]):
    for c in starts(cols, size[1], stride[1]):
      tile = fn(x[:, :, r * in_scale:(r + size[0]) * in_scale,
                  c * in_scale:(c + size[1]) * in_scale])
      h, w = tile.shape[2:4]
      mask = _np_ramp_mask(h, w, r == 0, r + size[0] >= rows, c == 0, c + size[1] >= cols,
                           (size[0] - stride[0]) * out_scale, (size[1] - stride[1]) * out_scale)
      y, xx = r * out_scale, c * out_scale
      values[:, :, y:y + h, xx:xx + w] += tile * mask[:, :, None]
      weight[y:y + h, xx:xx + w] += mask
  assert weight.min() > 0
  return values / weight[:, :, None]


def test_multi_tile_matches_numpy_blend(setup):
  s = setup
  m = s["model"]
  size, stride = (4, 4), (2, 2)  # ramps 2 latent cells / 32 pixels wide
  rows, cols = 5, 6  # tiles: rows [0,4) [2,5), cols [0,4) [2,6); the lower ones cut short
  assert wv.tile_tasks(rows, cols, size, stride) == [(0, 4, 0, 4), (0, 4, 2, 6),
                                                     (2, 6, 0, 4), (2, 6, 2, 6)]
  rng = np.random.default_rng(2)
  video = np.clip(rng.standard_normal((1, 1, rows * 16, cols * 16, 3)) * 0.5, -1, 1)
  video = video.astype(np.float32)
  enc = lambda v: np.asarray(wv.jit_encode(m, jnp.asarray(v)))
  want = _np_tiled(enc, video, rows, cols, size, stride, 16, 1, (1, 1, rows, cols, 48))
  got = np.asarray(m.tiled_encode(jnp.asarray(video), size, stride))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  # Tiles see less context than the whole frame: the blend differs from untiled encoding.
  assert np.abs(got - enc(video)).max() > 1e-3

  latents = rng.standard_normal((1, 1, rows, cols, 48)).astype(np.float32)
  dec = lambda z: np.asarray(wv.jit_decode(m, jnp.asarray(z), clamp=False))
  want = np.clip(_np_tiled(dec, latents, rows, cols, size, stride, 1, 16,
                           (1, 1, rows * 16, cols * 16, 3)), -1, 1)
  got = np.asarray(m.tiled_decode(jnp.asarray(latents), size, stride))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- layout


def test_full_size_layout_and_diffusers_names():
  cfg = wv.wan_vae_config("ti2v_5b")
  model = nnx.eval_shape(lambda: wv.WanVAE(cfg, rngs=nnx.Rngs(0)))
  params = {tuple(str(p) for p in path): tuple(v.shape)
            for path, v in nnx.state(model, nnx.Param).flat_state()}
  layout = wv.original_layout(cfg)
  assert set(layout) == set(params)
  assert all(layout[p].param_shape == params[p] for p in params)
  originals = ol.original_shapes(layout)
  assert len(originals) == 196
  assert sum(int(np.prod(s)) for s in originals.values()) == 704_688_668
  assert sum(int(np.prod(s)) for s in params.values()) == 704_688_668

  # The reference's names, as diffusers' full-size model lists them, mapped back.
  with torch.device("meta"):
    ref = diffusers_wan.AutoencoderKLWan(**_diffusers_kwargs(cfg))
  forward = {k: original_to_diffusers(k, cfg.encoder_res_blocks, cfg.decoder_res_blocks)
             for k in originals}
  assert len(set(forward.values())) == len(forward)  # the mapping is one-to-one
  back = {v: k for k, v in forward.items()}
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  unmapped = sorted(set(ref_shapes) - set(back))
  assert not unmapped, unmapped[:5]
  assert {back[k]: s for k, s in ref_shapes.items()} == originals


def test_load_params_round_trip(setup):
  s = setup
  layout = wv.original_layout(s["cfg"])
  state = {tuple(str(p) for p in path): np.asarray(v[...])
           for path, v in nnx.state(s["model"], nnx.Param).flat_state()}
  for path, t in layout.items():
    np.testing.assert_array_equal(t.to_original(state[path]), s["sd"][t.keys[0]])
  loaded = ol.load_params(layout, s["sd"].__getitem__)
  assert all(np.array_equal(loaded[p], state[p]) for p in layout)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_are_input_errors(setup):
  m = setup["model"]
  with pytest.raises(InputError, match="frames must be 1"):
    m.encode(jnp.zeros((1, 4, 32, 32, 3)))
  with pytest.raises(InputError, match="multiples of 16"):
    m.encode(jnp.zeros((1, 5, 24, 32, 3)))
  with pytest.raises(InputError, match="video"):
    m.encode(jnp.zeros((1, 5, 32, 32, 4)))
  with pytest.raises(InputError, match="latents"):
    m.decode(jnp.zeros((1, 2, 2, 2, 16)))
  with pytest.raises(InputError, match="stride"):
    m.tiled_decode(jnp.zeros((1, 1, 2, 2, 48)), (4, 4), (4, 2))
  with pytest.raises(InputError, match="variant"):
    wv.wan_vae_config("huge")
  with pytest.raises(InputError, match="shape"):
    wv.load_original(m, lambda k: np.zeros((1,), np.float32))
  with pytest.raises(InputError, match="missing"):
    wv.load_original(m, {}.__getitem__)


# ----------------------------------------------------------------------------- sharding


def test_shards_on_a_mesh_with_the_same_output(setup):
  from mirage_jax import sharding
  model = setup["model"]
  graphdef, params = nnx.split(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  conv = specs["encoder"]["levels"][1]["blocks"][0]["conv1"]["kernel"].get_value()
  assert tuple(conv) == (None, None, None, "conv_in", "conv_out")
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  shardings = sharding.logical_to_sharding(specs, mesh, shapes=params)
  sh = shardings["encoder"]["levels"][1]["blocks"][0]["conv1"]["kernel"].get_value()
  assert sh.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp", "tensor")
  sharded = jax.device_put(params, shardings)
  video = jnp.asarray(setup["video"][:, :5].repeat(2, axis=0))  # B = 2, T = 5: one scan step
  ref = np.asarray(wv.jit_encode(model, video))
  f = jax.jit(lambda p, v: nnx.merge(graphdef, p).encode(v))
  with jax.set_mesh(mesh):
    out = np.asarray(f(sharded, video))
  err, scale = _rel_err(out, ref)
  assert err <= 1e-5 * scale
