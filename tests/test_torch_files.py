"""weight_files: our .pth reader and safetensors writer, and the safetensors reader, against torch and safetensors."""

from __future__ import annotations

import collections
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from mirage_jax import weight_files
from mirage_jax.errors import InputError

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _np(t: "torch.Tensor") -> np.ndarray:
  """A torch tensor as numpy, bf16 through its bits (numpy has no bf16 of its own)."""
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
  assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype,
                                                              ref.shape, ref.dtype)
  # Bit equality: compares NaN payloads and -0 too, and works for bf16.
  assert ours.tobytes() == ref.tobytes()


def _state_dict() -> dict:
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 10, generator=g)
  bf = torch.randn(5, 4, 3, generator=g).to(torch.bfloat16)
  return collections.OrderedDict(
      f32=base,
      transposed=base.t(),  # same storage, other strides
      sliced=base[1:5, 2::3],  # storage offset + strides
      row=base[3],  # offset into a shared storage
      bf16=bf,
      bf16_view=bf.permute(2, 0, 1)[:, 1:],
      f16=torch.randn(3, 7, generator=g).half(),
      i64=torch.arange(11),
      scalar=torch.tensor(2.5),
      empty=torch.zeros(0, 4),
      param=torch.nn.Parameter(torch.randn(4, generator=g)),
  )


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_matches_torch(tmp_path, legacy):
  """Zip files and the legacy (pre torch 1.6) stream, e.g. LPIPS' linear layers."""
  sd = _state_dict()
  path = str(tmp_path / "w.pth")
  torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
  with weight_files.open_weights(path) as w:
    assert isinstance(w, weight_files.PthFile)
    assert w.keys() == list(sd)
    for key, ref in sd.items():
      assert w.shape(key) == tuple(ref.shape)
      _assert_same(w.read(key), _np(ref))


def test_pth_module_state_dict_and_model_state(tmp_path):
  """A module's state_dict (pickled with ``_metadata``) and the ``model_state`` wrapping the
  reference's VAE loader unwraps."""
  module = torch.nn.Sequential(torch.nn.Conv3d(4, 6, 3), torch.nn.LayerNorm(6))
  sd = module.state_dict()
  torch.save(sd, tmp_path / "plain.pth")
  torch.save({"model_state": sd, "epoch": 3}, tmp_path / "wrapped.pth")
  for name in ("plain.pth", "wrapped.pth"):
    with weight_files.PthFile(str(tmp_path / name)) as w:
      assert sorted(w.keys()) == sorted(sd)
      for key in sd:
        _assert_same(w.read(key), _np(sd[key]))


def test_pth_other_containers_refused(tmp_path):
  torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested.pth")
  with pytest.raises(InputError) as e:
    weight_files.PthFile(str(tmp_path / "nested.pth"))
  assert e.value.where == str(tmp_path / "nested.pth") and e.value.field == "state_dict"
  torch.save({"w": torch.ones(2), "step": 5}, tmp_path / "int.pth")
  with pytest.raises(InputError, match="not a tensor") as e:
    weight_files.PthFile(str(tmp_path / "int.pth"))
  assert e.value.field == "step"


class _Payload:
  """Pickles as a call to os.system: what a hostile checkpoint would carry."""

  def __init__(self, target: str):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


class _Thing:
  pass


@pytest.mark.parametrize("kind", ["reduce", "object", "eval"])
def test_pth_pickled_code_refused_not_run(tmp_path, kind):
  target = tmp_path / "pwned"
  if kind == "reduce":
    evil = _Payload(str(target))
  elif kind == "object":
    evil = _Thing()
  else:
    class _Eval:
      def __reduce__(self):
        return (eval, (f"open({str(target)!r}, 'w').close()",))
    evil = _Eval()
  path = str(tmp_path / "evil.pth")
  torch.save(collections.OrderedDict(w=torch.ones(3), x=evil), path)
  if kind == "reduce":  # the oracle: torch's own unrestricted load does run it
    torch.load(path, weights_only=False)
    assert target.exists()
    target.unlink()
  with pytest.raises(InputError) as e:
    weight_files.PthFile(path)
  assert e.value.where == path
  expected = {"reduce": f"{os.system.__module__}.system", "object": "_Thing",
              "eval": ".eval"}[kind]  # protocol 2 names it __builtin__.eval
  assert expected in e.value.field, e.value.field
  assert "nothing was executed" in str(e.value)
  assert not target.exists()


def test_pth_garbage_refused(tmp_path):
  (tmp_path / "junk.pth").write_bytes(b"not a zip at all")
  with pytest.raises(InputError, match="not a torch zip"):
    weight_files.PthFile(str(tmp_path / "junk.pth"))


def test_pth_legacy_truncated_and_code_refused(tmp_path):
  path = tmp_path / "legacy.pth"
  torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  with pytest.raises(InputError, match="truncated") as e:
    weight_files.PthFile(str(path))
  assert e.value.where == str(path) and e.value.field.startswith("storage ")
  target = tmp_path / "pwned"
  torch.save(collections.OrderedDict(w=torch.ones(3), x=_Payload(str(target))), path,
             _use_new_zipfile_serialization=False)
  with pytest.raises(InputError, match="nothing was executed"):
    weight_files.PthFile(str(path))
  assert not target.exists()


def test_pth_truncated_refused(tmp_path):
  path = tmp_path / "w.pth"
  torch.save({"w": torch.randn(64, 64)}, path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(InputError) as e:
    weight_files.PthFile(str(path))
  assert e.value.where == str(path)


def _arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  return {
      "a.weight": rng.standard_normal((7, 5)).astype(np.float32),
      "b.bias": rng.standard_normal((3,)).astype(np.float16),
      "c": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
      "d": np.arange(9, dtype=np.int64).reshape(3, 3),
      "e": np.zeros((0, 2), np.float32),
      "f": np.array(1.5, np.float64),
  }


def test_our_writer_read_by_safetensors(tmp_path):
  arrays = _arrays()
  path = str(tmp_path / "ours.safetensors")
  weight_files.write_safetensors(path, arrays, metadata={"format": "pt"})
  plain = {k: v for k, v in arrays.items() if v.dtype != ml_dtypes.bfloat16}
  theirs = safetensors_numpy.load_file(path) if not _has_bf16(path) else None
  if theirs is None:  # safetensors.numpy cannot hold bf16: torch reads every tensor
    theirs = {k: _np(v) for k, v in safetensors_torch.load_file(path).items()}
  assert sorted(theirs) == sorted(arrays)
  for key, ref in arrays.items():
    _assert_same(theirs[key], ref)
  numpy_only = str(tmp_path / "plain.safetensors")
  weight_files.write_safetensors(numpy_only, plain)
  loaded = safetensors_numpy.load_file(numpy_only)
  for key, ref in plain.items():
    _assert_same(loaded[key], ref)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _has_bf16(path: str) -> bool:
  with weight_files.SafetensorsFile(path) as f:
    return any(f.dtype(k) == ml_dtypes.bfloat16 for k in f.keys())


def test_library_files_read_by_us(tmp_path):
  arrays = {k: v for k, v in _arrays().items() if v.dtype != ml_dtypes.bfloat16}
  safetensors_numpy.save_file(arrays, str(tmp_path / "np.safetensors"))
  g = torch.Generator().manual_seed(2)
  tensors = {"x": torch.randn(4, 6, generator=g).to(torch.bfloat16),
             "y": torch.randn(3, generator=g), "z": torch.randint(0, 9, (5,), generator=g)}
  safetensors_torch.save_file(tensors, str(tmp_path / "pt.safetensors"))
  with weight_files.SafetensorsFile(str(tmp_path / "np.safetensors")) as f:
    assert sorted(f.keys()) == sorted(arrays)
    for key, ref in arrays.items():
      _assert_same(f.read(key), ref)
  with weight_files.SafetensorsFile(str(tmp_path / "pt.safetensors")) as f:
    for key, ref in tensors.items():
      _assert_same(f.read(key), _np(ref))


def test_writer_streams_lazy_tensors_and_is_atomic(tmp_path):
  path = str(tmp_path / "lazy.safetensors")
  made = []

  def maker(i):
    def make():
      made.append(i)
      return np.full((2, 3), i, np.float32)
    return make

  lazy = {f"t{i}": weight_files.LazyArray((2, 3), np.float32, maker(i)) for i in range(3)}
  weight_files.write_safetensors(path, lazy)
  assert made == [0, 1, 2]
  loaded = safetensors_numpy.load_file(path)
  assert all(np.all(loaded[f"t{i}"] == i) for i in range(3))

  def boom():
    raise RuntimeError("source failed")

  bad = str(tmp_path / "bad.safetensors")
  with pytest.raises(RuntimeError):
    weight_files.write_safetensors(bad, {"a": np.ones(2, np.float32),
                                        "b": weight_files.LazyArray((2,), np.float32, boom)})
  assert not os.path.exists(bad)
  assert sorted(os.listdir(tmp_path)) == ["lazy.safetensors"]


def test_truncated_safetensors_refused(tmp_path):
  path = tmp_path / "t.safetensors"
  safetensors_numpy.save_file({"first": np.ones((4, 4), np.float32),
                               "second": np.ones((64, 64), np.float32)}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  with pytest.raises(InputError, match="truncated") as e:
    weight_files.SafetensorsFile(str(path))
  assert e.value.where == str(path)
  # the tensor whose bytes run past the end is named
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  last = max((k for k in header if k != "__metadata__"),
             key=lambda k: header[k]["data_offsets"][1])
  assert e.value.field == last


@pytest.mark.parametrize("body", [b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
                                  b"\xff\xff\xff\xff\x00\x00\x00\x00{}",
                                  b"\x02\x00",
                                  b"\x08\x00\x00\x00\x00\x00\x00\x00[1,2,3] "])
def test_malformed_header_refused(tmp_path, body):
  path = tmp_path / "m.safetensors"
  path.write_bytes(body)
  with pytest.raises(InputError) as e:
    weight_files.SafetensorsFile(str(path))
  assert e.value.where == str(path) and e.value.field == "header"


def test_header_entry_checks(tmp_path):
  def write(header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(p)

  with pytest.raises(InputError, match="needs 16") as e:
    weight_files.SafetensorsFile(write(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 16))
  assert e.value.field == "w"
  with pytest.raises(InputError, match="unknown dtype") as e:
    weight_files.SafetensorsFile(write(
        {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
  assert e.value.field == "w"


def _sharded(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
  rng = np.random.default_rng(3)
  arrays = {f"blocks.{i}.w": rng.standard_normal((3, 2)).astype(np.float32) for i in range(4)}
  names = {k: f"model-0000{1 + i // 2}-of-00002.safetensors" for i, k in enumerate(arrays)}
  for shard in set(names.values()):
    weight_files.write_safetensors(str(tmp_path / shard),
                                  {k: v for k, v in arrays.items() if names[k] == shard})
  index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {}, "weight_map": names}))
  return str(index), arrays


def test_sharded_reads_and_missing_shard(tmp_path):
  index, arrays = _sharded(tmp_path)
  for w in (weight_files.open_weights(index), weight_files.open_weights(str(tmp_path))):
    with w:
      assert sorted(w.keys()) == sorted(arrays)
      for key, ref in arrays.items():
        _assert_same(w.read(key), ref)
      assert w.file_of("blocks.3.w").endswith("model-00002-of-00002.safetensors")
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(InputError, match="missing shard") as e:
    weight_files.open_weights(index)
  assert e.value.where == str(tmp_path / "model-00002-of-00002.safetensors")
  assert e.value.field in ("blocks.2.w", "blocks.3.w")


def test_index_key_not_in_its_shard(tmp_path):
  index, _ = _sharded(tmp_path)
  data = json.loads(open(index).read())
  data["weight_map"]["blocks.9.w"] = "model-00001-of-00002.safetensors"
  open(index, "w").write(json.dumps(data))
  with pytest.raises(InputError, match="not in the shard") as e:
    weight_files.open_weights(index)
  assert e.value.field == "blocks.9.w"


def test_folder_of_parts_duplicate_key(tmp_path):
  weight_files.write_safetensors(str(tmp_path / "a.safetensors"), {"w": np.ones(2, np.float32)})
  weight_files.write_safetensors(str(tmp_path / "b.safetensors"), {"w": np.ones(2, np.float32)})
  with pytest.raises(InputError, match="also in") as e:
    weight_files.open_weights(str(tmp_path))
  assert e.value.field == "w"


def test_shard_key_not_in_index(tmp_path):
  index, arrays = _sharded(tmp_path)
  shard = tmp_path / "model-00001-of-00002.safetensors"
  weight_files.write_safetensors(str(shard), {**{k: arrays[k] for k in ("blocks.0.w", "blocks.1.w")},
                                             "stray": np.ones(2, np.float32)})
  with pytest.raises(InputError, match="not in") as e:
    weight_files.open_weights(index)
  assert e.value.where == str(shard) and e.value.field == "stray"
