"""convert_wan: released Wan2.2 files (tiny, random, original naming) -> exports -> back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from absl import flags
from flax import nnx

from mirage_jax import checkpoint, convert_wan
from mirage_jax.families.wan import convert as wan_convert
from mirage_jax import weight_files
from mirage_jax.errors import InputError, run_cli
from mirage_jax.families.wan import original_layout
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import vae as wan_vae
from tests.conftest import xla_flags

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0


def _dit_cfg(vace=True, rank=RANK):
  cfg = wan_dit.wan_dit_config("tiny")
  cfg.vace, cfg.lora_rank, cfg.lora_alpha = vace, rank, ALPHA
  return cfg


def _write_release(d: Path) -> dict:
  """Random tiny weights in the released layout: the DiT in 2 shards + index, the VAE as a
  torch.save'd .pth; Mirage's vace/lora.safetensors beside (not in the release folder)."""
  rng = np.random.default_rng(0)
  layout = wan_dit.original_layout(_dit_cfg())
  orig = {k: rng.standard_normal(t.original_shape).astype(np.float32)
          for t in layout.values() for k in t.keys}
  groups = {g: {k: v for k, v in orig.items() if wan_dit.key_group(k) == g}
            for g in ("dit", "vace", "lora")}
  wan = d / "Wan2.2-TI2V-5B"
  wan.mkdir()
  keys = sorted(groups["dit"])
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
    weight_files.write_safetensors(str(wan / name), {k: groups["dit"][k] for k in part})
    weight_map.update({k: name for k in part})
  (wan / wan_convert.DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  vae_layout = wan_vae.original_layout(wan_vae.wan_vae_config("tiny"))
  vae = {k: rng.standard_normal(t.original_shape).astype(np.float32)
         for t in vae_layout.values() for k in t.keys}
  torch.save({k: torch.from_numpy(v) for k, v in vae.items()}, str(wan / wan_convert.VAE_FILE))
  weight_files.write_safetensors(str(d / "vace.safetensors"), groups["vace"])
  weight_files.write_safetensors(str(d / "lora.safetensors"), groups["lora"])
  return dict(dir=d, wan=wan, groups=groups, vae=vae, dit_orig=orig)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return _write_release(tmp_path_factory.mktemp("release"))


def _cli(*args: str) -> int:
  """The command in this process, as ``python -m mirage_jax.convert_wan`` runs it."""
  fv = flags.FlagValues()
  convert_wan.define_flags(fv)
  fv(["convert_wan", *args])
  try:
    run_cli(lambda: convert_wan.run(fv))
  except SystemExit as e:
    return int(e.code or 0)
  return 0


def _base_args(release, out: Path, *extra: str) -> list[str]:
  return [f"--wan_dir={release['wan']}", f"--vace={release['dir'] / 'vace.safetensors'}",
          f"--lora={release['dir'] / 'lora.safetensors'}", "--variant=tiny",
          f"--lora_rank={RANK}", f"--lora_alpha={ALPHA}", f"--output={out}", *extra]


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(prefix + (str(k),), v)
    else:
      out[prefix] = tuple(node.shape)
  walk((), tree)
  return out


def _model_shapes(build) -> dict[tuple[str, ...], tuple[int, ...]]:
  state = nnx.state(nnx.eval_shape(build), nnx.Param)
  return {tuple(str(k) for k in p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted") / "export"
  assert _cli(*_base_args(release, out)) == 0
  return out


def test_convert_end_to_end(release, converted):
  dit, dit_config, step = checkpoint.load_export(str(converted / "dit"))
  vae, vae_config, _ = checkpoint.load_export(str(converted / "vae"))
  assert step == 0 and dit_config.stage == "denoiser" and vae_config.stage == "autoencoder"
  assert dit_config.denoiser.autoencoder_checkpoint == str(converted / "vae")
  cfg = dit_config.denoiser.model
  assert cfg.vace and cfg.lora_rank == RANK and cfg.lora_alpha == ALPHA
  meta = json.loads((converted / "dit" / "config.json").read_text())
  assert meta["conversion"]["lora"] == "separate" and meta["dtype"] == "float32"

  # The export's params are exactly the model's (names and shapes) ...
  assert _flat_shapes(dit) == _model_shapes(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  assert _flat_shapes(vae) == _model_shapes(
      lambda: wan_vae.WanVAE(vae_config.autoencoder, rngs=nnx.Rngs(0)))
  # ... and every one is the original tensors through the layout, bit for bit.
  for layout, get, params in (
      (wan_dit.original_layout(cfg), release["dit_orig"].__getitem__, dit),
      (wan_vae.original_layout(vae_config.autoencoder), release["vae"].__getitem__, vae)):
    want = original_layout.load_params(layout, get)
    assert len(want) == len(_flat_shapes(params))
    for path, value in want.items():
      got = _leaf(params, path)
      assert got.dtype == np.float32 and got.tobytes() == value.tobytes(), path


def test_load_with_target_shardings(converted):
  """Restored straight into a sharding (each device reads its slice), equal to a plain load."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))

  def spec(a):
    dims = [i for i, n in enumerate(a.shape) if n % 8 == 0]
    return PartitionSpec(*([None] * dims[0] + ["x"])) if dims else PartitionSpec()

  plain, _, _ = checkpoint.load_export(str(converted / "dit"))
  shardings = jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), plain)
  sharded, _, _ = checkpoint.load_export(str(converted / "dit"), shardings)
  split = 0
  for a, b, sh in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded),
                      jax.tree.leaves(shardings)):
    assert b.sharding == sh and np.array_equal(np.asarray(a), np.asarray(b))
    split += sh.spec != PartitionSpec()
  assert split > 0


def test_round_trip_to_reference(release, converted, tmp_path):
  out = tmp_path / "reference"
  assert _cli("--to_reference", f"--checkpoint={converted / 'dit'}", f"--output={out}") == 0
  assert sorted(os.listdir(out)) == ["lora.safetensors", "vace.safetensors"]
  for group in ("vace", "lora"):
    with weight_files.SafetensorsFile(str(out / f"{group}.safetensors")) as back:
      want = release["groups"][group]
      assert sorted(back.keys()) == sorted(want)
      for key, value in want.items():
        got = back.read(key)
        assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), key
  # The reference reads them with safetensors (its loaders' own library).
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  lora = load_file(str(out / "lora.safetensors"))
  assert all(k.startswith("pipe.dit.blocks.") for k in lora)
  assert _cli("--to_reference", f"--checkpoint={converted / 'dit'}", f"--output={out}") == 2


def test_to_reference_refuses_other_exports(converted, tmp_path):
  with pytest.raises(InputError) as e:
    wan_convert.to_reference(str(converted / "vae"), str(tmp_path / "ref"))
  assert e.value.where.endswith("config.json") and "not a Wan DiT export" in str(e.value)
  assert not (tmp_path / "ref").exists()


def test_experiment_config_from_the_command_line():
  """``--config=experiments/wan22_ti2v_5b.py:<stage>[,tiny]`` as the training CLIs parse it."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  sizes = {}
  for arg in ("denoiser,tiny", "autoencoder", ""):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(["x", f"--config={ROOT / 'experiments' / 'wan22_ti2v_5b.py'}" + (f":{arg}" if arg else "")])
    c = fv.config
    sizes[arg] = (c.stage, c.denoiser.model.dim, c.denoiser.model.num_layers,
                  c.autoencoder.encoder_dim)
    assert c.sampler.num_steps == 20 and c.sampler.shift == 5.0
    assert (c.optimizer.learning_rate, c.optimizer.weight_decay,
            c.optimizer.grad_clip_norm) == (1e-5, 0.01, 1.0)
  assert sizes == {"denoiser,tiny": ("denoiser", 48, 4, 16),
                   "autoencoder": ("autoencoder", 3072, 30, 160),
                   "": ("denoiser", 3072, 30, 160)}


def test_merge_lora(release, tmp_path):
  out = tmp_path / "merged"
  assert _cli(*_base_args(release, out, "--merge_lora")) == 0
  params, config, _ = checkpoint.load_export(str(out / "dit"))
  cfg = config.denoiser.model
  assert cfg.lora_rank == 0
  assert json.loads((out / "dit" / "config.json").read_text())["conversion"]["lora"] == "merged"
  assert _flat_shapes(params) == _model_shapes(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  # Oracle in the original naming: W + (alpha / r) B @ A, then the layout.
  orig = dict(release["dit_orig"])
  lora = release["groups"]["lora"]
  merged_keys = 0
  for key in list(orig):
    if wan_dit.key_group(key) != "dit" or not key.endswith(".weight"):
      continue
    a = lora.get(f"pipe.dit.{key[:-len('.weight')]}.lora_A.weight")
    if a is not None:
      b = lora[f"pipe.dit.{key[:-len('.weight')]}.lora_B.weight"]
      orig[key] = orig[key] + (ALPHA / RANK) * (b.astype(np.float64) @ a).astype(np.float32)
      merged_keys += 1
  assert merged_keys == len(lora) // 2 > 0
  want = original_layout.load_params(wan_dit.original_layout(cfg), orig.__getitem__)
  scale = max(float(np.abs(v).max()) for v in want.values())
  for path, value in want.items():
    np.testing.assert_allclose(_leaf(params, path), value, rtol=0, atol=1e-5 * scale,
                               err_msg=str(path))


def test_bfloat16_without_vace_or_lora(release, tmp_path):
  out = tmp_path / "bf16"
  assert _cli(f"--wan_dir={release['wan']}", "--variant=tiny", "--dtype=bfloat16",
              "--nocompress", "--save_batch_mb=0.1", f"--output={out}") == 0
  params, config, _ = checkpoint.load_export(str(out / "dit"))
  cfg = config.denoiser.model
  assert not cfg.vace and cfg.lora_rank == 0
  assert _flat_shapes(params) == _model_shapes(lambda: wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
  want = original_layout.load_params(wan_dit.original_layout(cfg), release["dit_orig"].__getitem__)
  for path, value in want.items():
    got = _leaf(params, path)
    assert got.dtype == ml_dtypes.bfloat16
    assert got.tobytes() == value.astype(ml_dtypes.bfloat16).tobytes(), path


# ----------------------------------------------------------------------------- bad inputs


def _copy_release(release, d: Path) -> dict:
  wan = d / "wan"
  shutil.copytree(release["wan"], wan)
  for name in ("vace.safetensors", "lora.safetensors"):
    shutil.copy(release["dir"] / name, d / name)
  return dict(release, dir=d, wan=wan)


def _shard_of(r, key: str) -> Path:
  index = json.loads((r["wan"] / wan_convert.DIT_INDEX).read_text())
  return r["wan"] / index["weight_map"][key]


def _rewrite(path: Path, edit) -> None:
  with weight_files.SafetensorsFile(str(path)) as f:
    tensors = {k: f.read(k) for k in f.keys()}
  edit(tensors)
  weight_files.write_safetensors(str(path), tensors)


def _unexpected_dit_key(r):
  key = "blocks.0.ffn.0.weight"
  shard = _shard_of(r, key)
  _rewrite(shard, lambda t: t.update({"blocks.4.ffn.0.weight": t[key]}))
  index = r["wan"] / wan_convert.DIT_INDEX
  data = json.loads(index.read_text())
  data["weight_map"]["blocks.4.ffn.0.weight"] = shard.name
  index.write_text(json.dumps(data))
  return shard, "blocks.4.ffn.0.weight"


def _missing_dit_key(r):
  key = "head.head.weight"
  _rewrite(_shard_of(r, key), lambda t: t.pop(key))
  index = r["wan"] / wan_convert.DIT_INDEX
  data = json.loads(index.read_text())
  del data["weight_map"][key]
  index.write_text(json.dumps(data))
  return index, key


def _missing_shard(r):
  key = "blocks.0.ffn.0.weight"
  shard = _shard_of(r, key)
  index = json.loads((r["wan"] / wan_convert.DIT_INDEX).read_text())
  os.remove(shard)
  return shard, {k for k, v in index["weight_map"].items() if v == shard.name}


def _wrong_shape(r):
  key = "blocks.1.self_attn.q.weight"
  shard = _shard_of(r, key)
  _rewrite(shard, lambda t: t.update({key: t[key][:, :-2].copy()}))
  return shard, key


def _lora_other_rank(r):
  path = r["dir"] / "lora.safetensors"
  rng = np.random.default_rng(5)
  _rewrite(path, lambda t: t.update({
      k: rng.standard_normal((RANK * 2, v.shape[1]) if ".lora_A." in k
                             else (v.shape[0], RANK * 2)).astype(np.float32)
      for k, v in list(t.items())}))
  return path, set(r["groups"]["lora"])


def _lora_layers_model_lacks(r):
  path = r["dir"] / "lora.safetensors"
  key = "pipe.dit.blocks.0.self_attn.q.lora_A.weight"
  extra = "pipe.dit.blocks.9.self_attn.q.lora_A.weight"
  _rewrite(path, lambda t: t.update({extra: t[key]}))
  return path, extra


def _vace_other_model(r):
  path = r["dir"] / "vace.safetensors"
  _rewrite(path, lambda t: t.update({"vace_blocks.5.after_proj.weight":
                                     t["vace_blocks.0.after_proj.weight"]}))
  return path, "vace_blocks.5.after_proj.weight"


class _Payload:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def _pth_with_object(r):
  path = r["wan"] / wan_convert.VAE_FILE
  sd = {k: torch.from_numpy(v) for k, v in r["vae"].items()}
  sd["evil"] = _Payload(r["dir"] / "pwned")
  torch.save(sd, str(path))
  return path, f"{os.system.__module__}.system"


def _vae_missing_key(r):
  path = r["wan"] / wan_convert.VAE_FILE
  sd = {k: torch.from_numpy(v) for k, v in r["vae"].items() if k != "decoder.conv1.weight"}
  torch.save(sd, str(path))
  return path, "decoder.conv1.weight"


def _truncated_shard(r):
  shard = _shard_of(r, "blocks.0.ffn.0.weight")
  with weight_files.SafetensorsFile(str(shard)) as f:
    keys = set(f.keys())
  data = shard.read_bytes()
  shard.write_bytes(data[:-64])
  return shard, keys


CASES = {
    "unexpected_dit_key": _unexpected_dit_key,
    "missing_dit_key": _missing_dit_key,
    "missing_shard": _missing_shard,
    "wrong_shape": _wrong_shape,
    "lora_other_rank": _lora_other_rank,
    "lora_layers_model_lacks": _lora_layers_model_lacks,
    "vace_other_model": _vace_other_model,
    "pth_with_object": _pth_with_object,
    "vae_missing_key": _vae_missing_key,
    "truncated_shard": _truncated_shard,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inputs(release, tmp_path, capsys, case):
  r = _copy_release(release, tmp_path)
  bad_file, bad_key = CASES[case](r)
  out = tmp_path / "out" / "export"
  (tmp_path / "out").mkdir()
  capsys.readouterr()
  assert _cli(*_base_args(r, out)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert str(bad_file) in err[0], err[0]
  # the field is the key (the file's own name for the tensor, or the refused global)
  field = err[0].split("field '")[1].split("'")[0]
  assert field == bad_key if isinstance(bad_key, str) else field in bad_key, err[0]
  if case == "lora_other_rank":
    assert f"rank {2 * RANK}" in err[0]
  assert not out.exists()
  assert os.listdir(tmp_path / "out") == []
  assert not (tmp_path / "pwned").exists()


def test_existing_output_refused(release, tmp_path, capsys):
  out = tmp_path / "export"
  out.mkdir()
  (out / "keep").write_text("mine")
  assert _cli(*_base_args(release, out)) == 2
  assert "already exists" in capsys.readouterr().err
  assert os.listdir(out) == ["keep"]


def test_lora_needs_a_rank_and_merge_needs_lora(release, tmp_path, capsys):
  out = tmp_path / "export"
  args = [a for a in _base_args(release, out) if not a.startswith("--lora_rank")]
  assert _cli(*args) == 2  # the tiny variant has no LoRA rank of its own
  assert "--lora_rank" in capsys.readouterr().err
  assert _cli(f"--wan_dir={release['wan']}", "--variant=tiny", "--merge_lora",
              f"--output={out}") == 2
  assert "merge_lora" in capsys.readouterr().err
  assert not out.exists()


def test_command_line(release, tmp_path):
  """The program itself: success, then a bad input as one line and status 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags())
  out = tmp_path / "export"
  run = lambda *a: subprocess.run([sys.executable, "-m", "mirage_jax.convert_wan", *a],
                                  cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=600)
  done = run(*_base_args(release, out))
  assert done.returncode == 0, done.stderr[-2000:]
  assert (out / "dit" / "config.json").exists() and (out / "vae" / "config.json").exists()
  bad = run(*_base_args(release, tmp_path / "other", "--variant=ti2v_5b"))
  assert bad.returncode == 2
  lines = [l for l in bad.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Wan2.2_VAE.pth" in lines[0] and "field '" in lines[0], bad.stderr
  assert not (tmp_path / "other").exists()
