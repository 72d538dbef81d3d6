"""The umT5 encoder in NNX vs transformers' UMT5EncoderModel (the oracle): parity through the
converter from both released layouts (transformers safetensors, the Wan .pth), the relative
position buckets, padding (a prompt's embedding does not depend on the padding around it),
the full-size (xxl) parameter set, the export round trip and one-line refusals."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from mirage_jax import convert_text, weight_files
from mirage_jax.errors import InputError
from mirage_jax.text import convert, umt5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-4  # relative to max|oracle|; measured values are in BENCHMARKS.md
LENGTHS = (160, 100, 7)  # 160 > max_distance 128: the last log bucket is reached
TIED = "encoder.embed_tokens.weight"


def _hf_config(cfg):
  return transformers.UMT5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, num_heads=cfg.num_heads,
      d_ff=cfg.ffn_dim, num_layers=cfg.num_layers,
      relative_attention_num_buckets=cfg.num_buckets,
      relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu",
      dropout_rate=0.0, layer_norm_epsilon=cfg.eps)


def _wan_name(key: str) -> str | None:
  """A transformers key -> the Wan release's name (None for the tied embedding copy)."""
  if key == TIED:
    return None
  top = {"shared.weight": "token_embedding.weight",
         "encoder.final_layer_norm.weight": "norm.weight"}
  if key in top:
    return top[key]
  m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
  for wan, theirs in convert._BLOCK.values():  # pylint: disable=protected-access
    if m.group(2) == theirs:
      return f"blocks.{m.group(1)}.{wan}"
  raise AssertionError(key)


def _ids_and_mask(cfg, length=max(LENGTHS), seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, cfg.vocab_size, (len(LENGTHS), length)).astype(np.int32)
  mask = np.arange(length)[None, :] < np.asarray(LENGTHS)[:, None]
  ids[~mask] = 0  # the tokenizer's pad id
  return ids, mask


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
  """A random tiny transformers encoder whose norms are not 1 and whose position tables are
  large enough to matter (a misplaced one shows), its files in both layouts, its outputs."""
  cfg = umt5.model_config("tiny")
  torch.manual_seed(0)
  model = transformers.UMT5EncoderModel(_hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  d = tmp_path_factory.mktemp("umt5_release")
  # transformers writes one of the tied pair; the other file has both.
  weight_files.write_safetensors(str(d / "hf.safetensors"),
                                 {k: v for k, v in state.items() if k != TIED})
  weight_files.write_safetensors(str(d / "hf_tied.safetensors"), state)
  wan = {_wan_name(k): torch.from_numpy(v) for k, v in state.items() if _wan_name(k)}
  torch.save(wan, str(d / "wan.pth"))
  # The release's dtype (models_t5_umt5-xxl-enc-bf16.pth).
  torch.save({k: v.to(torch.bfloat16) for k, v in wan.items()}, str(d / "wan_bf16.pth"))
  ids, mask = _ids_and_mask(cfg)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
  ref = np.where(mask[..., None], ref, 0.0)  # WanPrompter: prompt_emb[:, len:] = 0
  return dict(cfg=cfg, model=model, state=state, dir=d, ids=ids, mask=mask, ref=ref)


def _load(cfg, params, **kw):
  model = umt5.UMT5Encoder(cfg, rngs=nnx.Rngs(1), **kw)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def _run(model, ids, mask):
  return np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name,scan", [("hf.safetensors", True), ("hf_tied.safetensors", True),
                                       ("wan.pth", True), ("wan.pth", False)])
def test_parity_vs_transformers(oracle, name, scan):
  cfg = umt5.model_config("tiny", scan_layers=scan)
  model = _load(cfg, convert.convert_params(str(oracle["dir"] / name), cfg))
  ours = _run(model, oracle["ids"], oracle["mask"])
  assert ours.shape == oracle["ref"].shape == (3, max(LENGTHS), cfg.dim)
  err = _rel_err(ours, oracle["ref"])
  print(f"parity {name} scan={scan}: max abs err {err:.2e} x max|oracle| "
        f"({np.abs(oracle['ref']).max():.3g})")
  assert err <= PARITY_TOL


def test_parity_fails_on_a_wrong_weight(oracle):
  """The parity check can fail: the FFN's GELU and linear branches swapped break it."""
  params = convert.convert_params(str(oracle["dir"] / "wan.pth"), oracle["cfg"])
  b = params["blocks"]
  b["wi_gate"], b["wi_lin"] = b["wi_lin"], b["wi_gate"]
  ours = _run(_load(oracle["cfg"], params), oracle["ids"], oracle["mask"])
  assert _rel_err(ours, oracle["ref"]) > 100 * PARITY_TOL


def test_buckets_match_transformers(oracle):
  """Every (query, key) pair up to 600 tokens falls in transformers' bucket (float32 edges
  included)."""
  attn = oracle["model"].encoder.block[0].layer[0].SelfAttention
  n = 600
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  theirs = attn._relative_position_bucket(rel).numpy()  # pylint: disable=protected-access
  cfg = oracle["cfg"]
  ours = umt5.relative_position_buckets(n, cfg.num_buckets, cfg.max_distance)
  np.testing.assert_array_equal(ours, theirs)
  # Every bucket is reached but num_buckets/2 (a key to the right at distance 0).
  assert set(np.unique(ours).tolist()) == set(range(cfg.num_buckets)) - {cfg.num_buckets // 2}


def test_bf16_close_to_the_oracle(oracle):
  """bf16 params and matmuls (as released) stay near the f32 oracle."""
  cfg = oracle["cfg"]
  params = convert.convert_params(str(oracle["dir"] / "wan.pth"), cfg, dtype="bfloat16")
  model = _load(cfg, params, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  ours = _run(model, oracle["ids"], oracle["mask"])
  assert ours.dtype == np.float32
  from_bf16 = convert.convert_params(str(oracle["dir"] / "wan_bf16.pth"), cfg, dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_bf16)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)  # torch's and our f32 -> bf16 rounding agree
  err = _rel_err(ours, oracle["ref"])
  print(f"bf16: max abs err {err:.2e} x max|oracle|")
  assert err < 5e-2


# ----------------------------------------------------------------------------- padding


def test_padding_does_not_change_a_prompt(oracle):
  """Each prompt of the padded batch equals the prompt encoded alone, unpadded, and padded to
  another length; positions past its length are exactly zero."""
  cfg = oracle["cfg"]
  model = _load(cfg, convert.convert_params(str(oracle["dir"] / "hf.safetensors"), cfg))
  ids, mask = oracle["ids"], oracle["mask"]
  batch = _run(model, ids, mask)
  longer_ids = np.pad(ids, ((0, 0), (0, 40)))
  longer = _run(model, longer_ids, np.pad(mask, ((0, 0), (0, 40))))
  for row, n in enumerate(LENGTHS):
    alone = _run(model, ids[row:row + 1, :n], np.ones((1, n), bool))[0]
    np.testing.assert_allclose(batch[row, :n], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    np.testing.assert_allclose(longer[row, :n], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    assert np.all(batch[row, n:] == 0.0) and np.all(longer[row, n:] == 0.0)
    assert np.all(np.abs(alone).max(-1) > 0)


def test_mask_matters(oracle):
  """Masking is real: the same ids with every key visible give other embeddings."""
  cfg = oracle["cfg"]
  model = _load(cfg, convert.convert_params(str(oracle["dir"] / "hf.safetensors"), cfg))
  ids, mask = oracle["ids"], oracle["mask"]
  full = _run(model, ids, np.ones_like(mask))
  masked = _run(model, ids, mask)
  n = LENGTHS[2]
  assert np.abs(full[2, :n] - masked[2, :n]).max() > 1e-2 * np.abs(masked[2, :n]).max()


# ----------------------------------------------------------------------------- full size


def test_full_size_params_match_transformers():
  """xxl: every key of transformers' UMT5EncoderModel (built on the meta device: nothing
  allocated), with its shape, has its place in our abstract model; the counts agree."""
  cfg = umt5.model_config("xxl")
  with torch.device("meta"):
    theirs = transformers.UMT5EncoderModel(_hf_config(cfg))
  shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  assert set(shapes) == convert.torch_keys(cfg, "transformers") | {TIED}
  ours = umt5.param_shapes(cfg)
  for dst, (keys, linear) in convert.layout(cfg, "transformers").items():
    for key in keys:
      shape = ours[dst][1:] if dst.startswith("blocks/") else ours[dst]
      assert (shape[::-1] if linear else shape) == shapes[key], key
  n_theirs = sum(p.numel() for p in theirs.parameters())  # the tied pair counted once
  n_ours = umt5.num_params(umt5.abstract_model(cfg))
  print(f"umT5-xxl encoder: {n_ours:,} params (transformers: {n_theirs:,})")
  assert n_ours == n_theirs == 5_680_910_336
  assert len(convert.torch_keys(cfg, "wan")) == len(shapes) - 1 == 2 + 10 * 24


# ----------------------------------------------------------------------------- refusals


def test_wrong_size_checkpoint_refused(oracle):
  bigger = umt5.model_config("tiny", num_layers=3)
  with pytest.raises(InputError, match=r"wan\.pth: field 'blocks\.2\.[a-z0-9_.]+': missing "
                     r"from the file \(the tiny config expects other weights") as e:
    convert.convert_params(str(oracle["dir"] / "wan.pth"), bigger)
  assert "\n" not in str(e.value)
  wider = umt5.model_config("tiny", ffn_dim=256)
  with pytest.raises(InputError, match=r"hf\.safetensors: field 'encoder\.block\.0\.layer\.1\."
                     r"DenseReluDense\.wi_0\.weight': shape \(128, 64\), the tiny encoder "
                     r"needs \(256, 64\)") as e:
    convert.convert_params(str(oracle["dir"] / "hf.safetensors"), wider)
  assert "\n" not in str(e.value)
  with pytest.raises(InputError, match=r"hf\.safetensors: field '\S+': shape \(\d+, 64\), the "
                     r"xxl encoder needs \(\d+, 4096\) \(the xxl config expects other weights: "
                     r"wrong --variant\?\)"):
    convert.convert_params(str(oracle["dir"] / "hf.safetensors"), umt5.model_config("xxl"))


def test_missing_and_unexpected_keys_refused(oracle, tmp_path):
  state = oracle["state"]
  key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  weight_files.write_safetensors(str(tmp_path / "missing.safetensors"),
                                 {k: v for k, v in state.items() if k != key})
  with pytest.raises(InputError, match=rf"missing\.safetensors: field '{re.escape(key)}': "
                     "missing") as e:
    convert.convert_params(str(tmp_path / "missing.safetensors"), oracle["cfg"])
  assert "\n" not in str(e.value)
  extra = dict(state, **{"encoder.block.0.layer.2.extra.weight": np.zeros((1,), np.float32)})
  weight_files.write_safetensors(str(tmp_path / "extra.safetensors"), extra)
  with pytest.raises(InputError, match=r"field 'encoder\.block\.0\.layer\.2\.extra\.weight': "
                     "unexpected"):
    convert.convert_params(str(tmp_path / "extra.safetensors"), oracle["cfg"])
  # A full encoder-decoder checkpoint: its decoder half and LM head are read past.
  seq2seq = dict(state, **{"decoder.block.0.layer.0.SelfAttention.q.weight":
                           np.ones((64, 64), np.float32), "lm_head.weight": np.ones((512, 64),
                                                                                    np.float32)})
  weight_files.write_safetensors(str(tmp_path / "seq2seq.safetensors"), seq2seq)
  got = convert.convert_params(str(tmp_path / "seq2seq.safetensors"), oracle["cfg"])
  want = convert.convert_params(str(oracle["dir"] / "hf.safetensors"), oracle["cfg"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  wan = {_wan_name(k): torch.from_numpy(v) for k, v in state.items() if _wan_name(k)}
  wan["decoder.norm.weight"] = torch.ones(64)  # no decoder in a Wan file: unexpected there
  torch.save(wan, str(tmp_path / "w_extra.pth"))
  with pytest.raises(InputError, match=r"w_extra\.pth: field 'decoder\.norm\.weight': "
                     "unexpected"):
    convert.convert_params(str(tmp_path / "w_extra.pth"), oracle["cfg"])
  del wan["decoder.norm.weight"]
  del wan["blocks.0.ffn.fc1.weight"]
  torch.save(wan, str(tmp_path / "w.pth"))
  with pytest.raises(InputError, match=r"w\.pth: field 'blocks\.0\.ffn\.fc1\.weight': missing"):
    convert.convert_params(str(tmp_path / "w.pth"), oracle["cfg"])
  torch.save({"something.weight": torch.zeros(2)}, str(tmp_path / "other.pth"))
  with pytest.raises(InputError, match=r"other\.pth: field 'keys': neither"):
    convert.convert_params(str(tmp_path / "other.pth"), oracle["cfg"])


def test_bad_inputs_refused(oracle):
  with pytest.raises(InputError, match=r"field 'variant'"):
    umt5.model_config("huge")
  with pytest.raises(InputError, match=r"field 'hidden': not a umT5 config field"):
    umt5.model_config("tiny", hidden=3)
  model = umt5.UMT5Encoder(oracle["cfg"], rngs=nnx.Rngs(0))
  with pytest.raises(InputError, match=r"field 'ids'"):
    model(jnp.zeros((4,), jnp.int32), jnp.ones((4,), bool))


# ----------------------------------------------------------------------------- exports


def _cli(*args):
  fv = flags.FlagValues()
  convert_text.define_flags(fv)
  fv(["convert_text", *args])
  return convert_text.run(fv)


def test_cli_export_round_trip(oracle, tmp_path):
  """convert_text writes an export that load_export gives back (f32: the same outputs; bf16,
  the default: close); an export whose config says another size is refused in one line."""
  out = tmp_path / "export"
  assert _cli(f"--weights={oracle['dir'] / 'wan.pth'}", "--variant=tiny", "--dtype=float32",
              f"--output={out}") == 0
  model, cfg = umt5.load_export(str(out))
  assert cfg.variant == "tiny"
  assert _rel_err(_run(model, oracle["ids"], oracle["mask"]), oracle["ref"]) <= PARITY_TOL
  with pytest.raises(InputError, match="already exists"):
    _cli(f"--weights={oracle['dir'] / 'wan.pth'}", "--variant=tiny", f"--output={out}")
  out16 = tmp_path / "export16"
  assert _cli(f"--weights={oracle['dir'] / 'hf.safetensors'}", "--variant=tiny",
              f"--output={out16}") == 0
  model16, _ = umt5.load_export(str(out16), dtype=jnp.bfloat16)
  assert nnx.state(model16, nnx.Param)["norm"]["scale"][...].dtype == jnp.bfloat16
  assert _rel_err(_run(model16, oracle["ids"], oracle["mask"]), oracle["ref"]) < 5e-2
  meta = json.loads((out / "config.json").read_text())
  meta["config"]["text_encoder"]["ffn_dim"] = 96
  (out / "config.json").write_text(json.dumps(meta))
  with pytest.raises(InputError, match=r"export: field 'params/blocks/wi_gate/kernel': saved "
                     r"shape \(2, 64, 128\), the config builds \(2, 64, 96\)") as e:
    umt5.load_export(str(out))
  assert "\n" not in str(e.value)
  del meta["config"]["text_encoder"]
  (out / "config.json").write_text(json.dumps(meta))
  with pytest.raises(InputError, match="field 'text_encoder': missing"):
    umt5.load_export(str(out))


# ----------------------------------------------------------------------------- sharding


def test_sharded_over_a_mesh_equals_one_device(oracle):
  """Params placed by the logical rules over fsdp x tensor (8 host devices: embed split 4
  ways, heads and MLP units 2 ways) give the one-device outputs."""
  from mirage_jax import sharding  # pylint: disable=g-import-not-at-top
  cfg = oracle["cfg"]
  model = _load(cfg, convert.convert_params(str(oracle["dir"] / "hf.safetensors"), cfg))
  want = _run(model, oracle["ids"], oracle["mask"])
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2}, jax.devices()[:8])
  graphdef, state = nnx.split(model)
  shardings = sharding.logical_to_sharding(nnx.get_partition_spec(state), mesh, None, state,
                                           params=True)
  assert shardings["blocks"]["q"]["kernel"].spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  state = jax.device_put(state, shardings)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda s, i, k: nnx.merge(graphdef, s)(i, k))(
        state, jnp.asarray(oracle["ids"]), jnp.asarray(oracle["mask"]))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
