"""Depth Anything V2 in NNX vs transformers' DepthAnythingForDepthEstimation (the oracle):
network parity through the converter (transformers safetensors, old and new attention names,
and the original repository's .pth), full-size parameter sets, the released pre- and
post-processing, the export round trip, and one-line refusals."""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from mirage_jax import convert_depth, weight_files
from mirage_jax.depth import convert
from mirage_jax.depth import depth_anything as da
from mirage_jax.errors import InputError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from transformers.models.depth_anything import modeling_depth_anything as hf_da

# Relative to max|oracle|: the bar of the brief; measured values are in BENCHMARKS.md.
PARITY_TOL = 1e-4
H_IN, W_IN = 70, 84  # a 5 x 6 patch grid: the position embeddings (5 x 5) get resized


def _hf_config(cfg):
  """transformers' config for our model config (its out_indices count the stem as stage 0)."""
  backbone = transformers.Dinov2Config(
      hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
      image_size=cfg.pos_grid * da.PATCH_SIZE, patch_size=da.PATCH_SIZE,
      out_indices=[i + 1 for i in cfg.out_indices], reshape_hidden_states=False)
  return transformers.DepthAnythingConfig(
      backbone_config=backbone, reassemble_hidden_size=cfg.hidden_size,
      neck_hidden_sizes=list(cfg.neck_hidden_sizes), fusion_hidden_size=cfg.fusion_hidden_size,
      head_hidden_size=cfg.head_hidden_size, depth_estimation_type=cfg.kind,
      max_depth=int(cfg.max_depth))  # an int field there (20, 80; 1 for relative)


def _tiny(kind):
  return da.model_config("tiny", kind, attention="xla")


def _oracle(cfg, seed=0):
  """A random transformers model of cfg: its init, perturbed so that LayerScale, norms and
  biases are not at their trivial values (a wrong mapping of any of them shows)."""
  torch.manual_seed(seed)
  model = hf_da.DepthAnythingForDepthEstimation(_hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.05 * torch.randn_like(p))
      if "lambda1" in name:
        p.mul_(torch.rand_like(p) + 0.5)
    # Spread the output: at init the metric head sits near sigmoid(0) * max_depth everywhere,
    # where an error relative to max|oracle| would hide a wrong map.
    # The bias centres the logits at the test input's median: the relative head's ReLU keeps
    # half the pixels, the metric sigmoid spans most of (0, max_depth).
    model.head.conv3.weight.mul_(30.0)
    seen = []
    hook = model.head.conv3.register_forward_hook(lambda m, i, o: seen.append(o))
    model(pixel_values=torch.from_numpy(_pixels()))
    hook.remove()
    model.head.conv3.bias.sub_(seen[0].median())
  return model


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _released_names(state):
  """transformers >= 5 names -> the names in the released safetensors."""
  out = {}
  for k, v in state.items():
    for new, old in (("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense")):
      k = k.replace(new + ".", old + ".")
    out[k] = v
  return out


def _original_names(state, num_fusions=4):
  """transformers names -> the original repository's (written independently of the
  converter: the rules of depth_anything_v2/dpt.py and dinov2.py)."""
  out = {}
  rules = [
      (r"backbone\.embeddings\.cls_token", "pretrained.cls_token"),
      (r"backbone\.embeddings\.mask_token", "pretrained.mask_token"),
      (r"backbone\.embeddings\.position_embeddings", "pretrained.pos_embed"),
      (r"backbone\.embeddings\.patch_embeddings\.projection\.", "pretrained.patch_embed.proj."),
      (r"backbone\.layernorm\.", "pretrained.norm."),
      (r"backbone\.encoder\.layer\.(\d+)\.attention\.o_proj\.", r"pretrained.blocks.\1.attn.proj."),
      (r"backbone\.encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1",
       r"pretrained.blocks.\1.ls\2.gamma"),
      (r"backbone\.encoder\.layer\.(\d+)\.", r"pretrained.blocks.\1."),
      (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.", r"depth_head.projects.\1."),
      (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.", r"depth_head.resize_layers.\1."),
      (r"head\.conv1\.", "depth_head.scratch.output_conv1."),
      (r"head\.conv2\.", "depth_head.scratch.output_conv2.0."),
      (r"head\.conv3\.", "depth_head.scratch.output_conv2.2."),
  ]
  qkv = {}
  for k, v in state.items():
    m = re.match(r"backbone\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(\w+)", k)
    if m:
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
      continue
    m = re.match(r"neck\.convs\.(\d)\.weight", k)
    if m:
      out[f"depth_head.scratch.layer{int(m.group(1)) + 1}_rn.weight"] = v
      continue
    m = re.match(r"neck\.fusion_stage\.layers\.(\d)\.(.*)", k)
    if m:
      ref = f"depth_head.scratch.refinenet{num_fusions - int(m.group(1))}"
      rest = (m.group(2).replace("projection", "out_conv")
              .replace("residual_layer", "resConfUnit").replace("convolution", "conv"))
      out[f"{ref}.{rest}"] = v
      continue
    for pattern, repl in rules:
      if re.match(pattern, k):
        out[re.sub(pattern, repl, k)] = v
        break
    else:
      raise AssertionError(f"test mapping misses {k}")
  for (i, leaf), parts in qkv.items():
    out[f"pretrained.blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
        [parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def _load(cfg, params):
  model = da.abstract_model(cfg)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def _pixels(n=2, seed=1):
  return np.random.default_rng(seed).standard_normal((n, 3, H_IN, W_IN)).astype(np.float32)


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=["relative", "metric"])
def oracle(request, tmp_path_factory):
  cfg = _tiny(request.param)
  model = _oracle(cfg)
  state = _state(model)
  d = tmp_path_factory.mktemp(f"release_{request.param}")
  files = {
      "transformers_v5.safetensors": state,
      "released_hf.safetensors": _released_names(state),
  }
  for name, tensors in files.items():
    weight_files.write_safetensors(str(d / name), tensors)
  torch.save({k: torch.from_numpy(v) for k, v in _original_names(state).items()},
             str(d / "original.pth"))
  x = _pixels()
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x)).predicted_depth.numpy()
  return dict(cfg=cfg, model=model, dir=d, x=x, ref=ref, kind=request.param)


@pytest.mark.parametrize("name", ["transformers_v5.safetensors", "released_hf.safetensors",
                                  "original.pth"])
def test_parity_vs_transformers(oracle, name):
  params = convert.convert_params(str(oracle["dir"] / name), oracle["cfg"])
  model = _load(oracle["cfg"], params)
  ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(oracle["x"].transpose(0, 2, 3, 1)))
  assert ours.shape == oracle["ref"].shape == (2, H_IN, W_IN)
  err = _rel_err(ours, oracle["ref"])
  print(f"parity {oracle['kind']} {name}: max abs err {err:.2e} x max|oracle| "
        f"({np.abs(oracle['ref']).max():.3g})")
  assert err <= PARITY_TOL
  if oracle["kind"] == "metric":
    assert float(jnp.max(ours)) < oracle["cfg"].max_depth and float(jnp.min(ours)) > 0
  else:
    assert float(jnp.min(ours)) >= 0


def test_parity_fails_on_a_wrong_weight(oracle):
  """The parity check can fail: one swapped LayerScale breaks it."""
  params = convert.convert_params(str(oracle["dir"] / "original.pth"), oracle["cfg"])
  params["blocks"][1]["ls1"] = params["blocks"][1]["ls2"]
  ours = _load(oracle["cfg"], params)(jnp.asarray(oracle["x"].transpose(0, 2, 3, 1)))
  assert _rel_err(ours, oracle["ref"]) > 10 * PARITY_TOL


@pytest.mark.parametrize("variant", ["small", "base", "large"])
def test_full_size_params_match_transformers(variant):
  """Every released key, with its shape, has its place in our model, and the counts agree
  (ours has no DINOv2 mask_token: masked-image pretraining only). No weights allocated."""
  cfg = da.model_config(variant, "relative")
  with torch.device("meta"):
    theirs = hf_da.DepthAnythingForDepthEstimation(_hf_config(cfg))
  shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  assert set(shapes) == convert.torch_keys(cfg)
  model = da.abstract_model(cfg)
  ours = da.param_shapes(cfg)
  for key, (dst, _, kind) in convert.layout(cfg).items():
    assert convert.torch_shape(kind, ours[dst]) == shapes[key], key
  n_theirs = sum(math.prod(s) for s in shapes.values())
  assert da.num_params(model) + cfg.hidden_size == n_theirs
  print(f"{variant}: {da.num_params(model):,} params (+ mask_token = transformers' {n_theirs:,})")
  # The original fuses q, k, v (weight and bias): 4 keys fewer per block.
  assert len(convert.torch_keys(cfg, "original")) == len(shapes) - 4 * cfg.num_layers


@pytest.mark.parametrize("hw,size", [((96, 128), 70), ((200, 150), 98), ((40, 60), 70),
                                     ((480, 640), 518), ((1080, 1920), 518)])
def test_input_size_rule_matches_the_processor(hw, size):
  proc = _processor(size)
  img = np.zeros(hw + (3,), np.uint8)
  ref = proc(images=img, return_tensors="np")["pixel_values"].shape[2:]
  assert da.input_hw(*hw, size) == tuple(ref)


def _processor(size):
  """The released preprocessor_config.json of Depth-Anything-V2-*-hf (DPT image processor)."""
  from transformers import DPTImageProcessor  # pylint: disable=g-import-not-at-top
  return DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=True,
                           ensure_multiple_of=14, resample=3, do_pad=False,
                           image_mean=list(da.IMAGENET_MEAN), image_std=list(da.IMAGENET_STD))


def test_preprocess_matches_torch_antialiased_bicubic():
  """Float pixels: the processor's resize (torchvision -> torch's antialiased bicubic), then
  rescale and ImageNet normalisation, to float32 rounding."""
  rng = np.random.default_rng(0)
  for (h, w), size in (((96, 128), 70), ((200, 150), 98), ((30, 500), 70)):
    img = rng.random((1, h, w, 3)).astype(np.float32)
    hw = da.input_hw(h, w, size)
    ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(0, 3, 1, 2), size=hw,
                                          mode="bicubic", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v)[:, None, None] for v in (da.IMAGENET_MEAN, da.IMAGENET_STD))
    ref = ((ref.clamp(0, 1) - mean) / std).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(da.preprocess(jnp.asarray(img * 2 - 1), hw))
    assert np.abs(ours - ref).max() < 2e-5


def test_preprocess_vs_the_image_processor_on_uint8():
  """The processor on a uint8 frame (its PIL backend without torchvision): PIL resizes in 8 bits,
  one rounding per pass; on a smooth frame that is about one grey level (/ 0.225 normalised)."""
  h, w = 120, 160
  yy, xx = np.mgrid[0:h, 0:w]
  img = (127.5 + 127.5 * np.sin(xx[..., None] / 7.0 + yy[..., None] / 11.0 + np.arange(3))
         ).round().astype(np.uint8)
  ref = _processor(70)(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = np.asarray(da.preprocess(jnp.asarray(img[None] / 127.5 - 1.0), ref.shape[:2]))[0]
  err = float(np.abs(ours - ref).max())
  print(f"preprocess vs DPTImageProcessor (uint8 smooth frame): max abs err {err:.4f}")
  assert err < 2.5 / 255 / min(da.IMAGENET_STD)


def test_estimate_matches_the_released_pipeline(oracle):
  """estimate (jitted) = resize + normalise + network + post_process_depth_estimation."""
  cfg, model = oracle["cfg"], oracle["model"]
  params = convert.convert_params(str(oracle["dir"] / "released_hf.safetensors"), cfg)
  ours_model = _load(cfg, params)
  h, w = 50, 66
  frames = np.random.default_rng(3).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
  out = nnx.jit(lambda m, x: da.estimate(m, x))(ours_model, jnp.asarray(frames))
  hw = da.input_hw(h, w, cfg.input_size)
  x = torch.nn.functional.interpolate(torch.from_numpy((frames + 1) / 2).permute(0, 3, 1, 2),
                                      size=hw, mode="bicubic", antialias=True)
  mean, std = (torch.tensor(v)[:, None, None] for v in (da.IMAGENET_MEAN, da.IMAGENET_STD))
  from transformers import DPTImageProcessor  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    outputs = model(pixel_values=(x.clamp(0, 1) - mean) / std)
  post = DPTImageProcessor().post_process_depth_estimation(outputs, target_sizes=[(h, w)] * 2)
  ref = np.stack([p["predicted_depth"].numpy() for p in post])
  assert out.shape == (2, h, w)
  assert _rel_err(out, ref) <= PARITY_TOL


# ----------------------------------------------------------------------------- refusals


def test_wrong_variant_refused(oracle):
  with pytest.raises(InputError, match=r"original\.pth: field 'pretrained\..*small") as e:
    convert.convert_params(str(oracle["dir"] / "original.pth"),
                           da.model_config("small", oracle["kind"]))
  assert "\n" not in str(e.value)


def test_missing_and_unexpected_keys_refused(oracle, tmp_path):
  state = _released_names(_state(oracle["model"]))
  key = "backbone.encoder.layer.2.layer_scale1.lambda1"
  weight_files.write_safetensors(str(tmp_path / "missing.safetensors"),
                                 {k: v for k, v in state.items() if k != key})
  with pytest.raises(InputError, match=rf"missing\.safetensors: field '{re.escape(key)}': "
                     "missing") as e:
    convert.convert_params(str(tmp_path / "missing.safetensors"), oracle["cfg"])
  assert "\n" not in str(e.value)
  weight_files.write_safetensors(str(tmp_path / "extra.safetensors"),
                                 dict(state, **{"head.conv4.weight": np.zeros((1,), np.float32)}))
  with pytest.raises(InputError, match=r"field 'head\.conv4\.weight': unexpected"):
    convert.convert_params(str(tmp_path / "extra.safetensors"), oracle["cfg"])
  orig = _original_names(_state(oracle["model"]))
  del orig["depth_head.scratch.refinenet2.resConfUnit1.conv2.bias"]
  torch.save({k: torch.from_numpy(v) for k, v in orig.items()}, str(tmp_path / "o.pth"))
  with pytest.raises(InputError, match=r"o\.pth: field 'depth_head\.scratch\.refinenet2\."
                     r"resConfUnit1\.conv2\.bias': missing"):
    convert.convert_params(str(tmp_path / "o.pth"), oracle["cfg"])


def test_bad_sizes_refused():
  cfg = _tiny("relative")
  model = da.DepthAnythingV2(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(InputError, match=r"field 'input_hw': \(50, 70\)"):
    da.estimate(model, jnp.zeros((1, 40, 60, 3)), input_hw=(50, 70))
  with pytest.raises(InputError, match=r"pixel_values: field 'shape'"):
    model(jnp.zeros((1, 50, 70, 3)))
  with pytest.raises(InputError, match=r"field 'variant'"):
    da.model_config("huge")
  with pytest.raises(InputError, match=r"field 'input_size'"):
    da.model_config("tiny", input_size=100)
  with pytest.raises(InputError, match=r"field 'max_depth'"):
    da.model_config("small", "metric", max_depth=0.0)


# ----------------------------------------------------------------------------- exports


def _cli(*args):
  fv = flags.FlagValues()
  convert_depth.define_flags(fv)
  fv(["convert_depth", *args])
  return convert_depth.run(fv)


def test_cli_export_round_trip(oracle, tmp_path):
  """convert_depth --variant=tiny writes an export that load_export gives back, same outputs;
  an export whose config says another size is refused in one line naming the field."""
  kind = oracle["kind"]
  out = tmp_path / "export"
  depth_flags = [f"--max_depth={oracle['cfg'].max_depth}"] if kind == "metric" else []
  assert _cli(f"--weights={oracle['dir'] / 'original.pth'}", "--variant=tiny", f"--kind={kind}",
              *depth_flags, f"--output={out}") == 0
  model, cfg = da.load_export(str(out))
  assert cfg.variant == "tiny" and cfg.kind == kind
  ours = model(jnp.asarray(oracle["x"].transpose(0, 2, 3, 1)))
  assert _rel_err(ours, oracle["ref"]) <= PARITY_TOL
  with pytest.raises(InputError, match="already exists"):
    _cli(f"--weights={oracle['dir'] / 'original.pth'}", "--variant=tiny", f"--kind={kind}",
         f"--output={out}")
  meta = json.loads((out / "config.json").read_text())
  meta["config"]["depth_model"]["fusion_hidden_size"] = 16
  (out / "config.json").write_text(json.dumps(meta))
  with pytest.raises(InputError, match=r"export: field 'params/fusions/0/out/bias': saved shape "
                     r"\(32,\), the config builds \(16,\)") as e:
    da.load_export(str(out))
  assert "\n" not in str(e.value)
  del meta["config"]["depth_model"]
  (out / "config.json").write_text(json.dumps(meta))
  with pytest.raises(InputError, match="field 'depth_model': missing"):
    da.load_export(str(out))
  with pytest.raises(InputError, match=r"field 'pretrained\..*small"):
    _cli(f"--weights={oracle['dir'] / 'original.pth'}", "--variant=small", f"--kind={kind}",
         f"--output={tmp_path / 'e2'}")
  assert not os.path.exists(tmp_path / "e2")
