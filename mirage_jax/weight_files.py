"""The released weight files, read and written without torch: safetensors and torch ``.pth``.

Three readers share one interface (:class:`WeightFile`): ``keys()``, ``shape(key)``,
``dtype(key)``, ``file_of(key)`` (the file that holds it, for messages) and ``read(key)``,
which returns one tensor as an owned numpy array. Headers are read and checked when a file
is opened (a truncated file or a malformed header is an :class:`InputError` before any tensor
is read); tensors are read one at a time, so reading a model costs the memory of one tensor,
not of the file.

* :class:`SafetensorsFile`: one ``.safetensors`` file, read by the ``safetensors`` library.
* :class:`ShardedSafetensors`: ``*.safetensors.index.json`` with a ``weight_map`` key -> shard.
* :class:`PthFile`: a ``torch.save`` zip (``<name>/data.pkl`` + ``<name>/data/<n>``), or the
  legacy (pre torch 1.6) stream: header pickles, the state dict's pickle, the storage keys,
  then each storage's element count and bytes (e.g. LPIPS' linear layers). Its
  pickle goes through a restricted unpickler that resolves only the globals a plain tensor
  state dict uses, each to a function of ours; anything else (an object, a class, a
  ``__reduce__`` payload) is refused by name before it can run.

:func:`open_weights` picks the reader for a path; :func:`write_safetensors` writes a file
tensor by tensor (header first), atomically. The writer and the ``.pth`` reader are ours: the
library's writer (``serialize_file``) needs every tensor in memory at once, and it has no
``.pth`` reader (torch's ``torch.load`` is what we avoid).
"""

from __future__ import annotations

import collections
import json
import math
import mmap
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes  # also registers the numpy dtype name "bfloat16" the library asks for
import numpy as np
import safetensors

from mirage_jax.errors import InputError

# safetensors dtype names <-> numpy.
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# What the library's numpy side reads (it has no float8: it asks numpy for np.float8_*).
_ST_READ = {k: v for k, v in _ST_DTYPES.items() if not k.startswith("F8_")}

# torch's typed storage classes (the pickle names the storage's class, which carries the
# element type) -> numpy. ``UntypedStorage`` is raw bytes.
_TORCH_STORAGES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}


def _read_range(fileobj, start: int, length: int) -> np.ndarray:
  """``length`` bytes at ``start`` of an open file, as an owned uint8 array.

  A short-lived mmap of just that range: the pages leave the process with the unmap, so
  reading tensor after tensor does not grow the resident set by the file's size.
  """
  if length == 0:
    return np.empty((0,), np.uint8)
  base = start - start % mmap.ALLOCATIONGRANULARITY
  with mmap.mmap(fileobj.fileno(), length + (start - base), access=mmap.ACCESS_READ,
                 offset=base) as m:
    view = np.frombuffer(m, np.uint8, count=length, offset=start - base)
    out = view.copy()
    del view  # the mmap refuses to close while a view exports its buffer
  return out


class WeightFile:
  """Tensors by key from a weights file (or a set of them): the readers' common interface."""

  path: str

  def keys(self) -> list[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def dtype(self, key: str) -> np.dtype:
    raise NotImplementedError

  def file_of(self, key: str) -> str:
    """The file that holds ``key`` (a shard of a sharded checkpoint), for messages."""
    del key
    return self.path

  def read(self, key: str) -> np.ndarray:
    """The tensor ``key`` in its stored dtype and shape (an owned, contiguous array)."""
    raise NotImplementedError

  def nbytes(self, key: str) -> int:
    return int(math.prod(self.shape(key))) * self.dtype(key).itemsize

  def __contains__(self, key: str) -> bool:
    return key in set(self.keys())

  def __len__(self) -> int:
    return len(self.keys())

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------- safetensors


class SafetensorsFile(WeightFile):
  """One ``.safetensors`` file, read by the ``safetensors`` library.

  ``safe_open`` checks the header when the file is opened (every tensor's dtype, shape and
  byte range: a truncated or malformed file is refused before any tensor is read) and
  ``get_tensor`` reads one tensor with ``pread`` (not an mmap that would keep the file's
  pages resident), so reading a model costs the memory of one tensor.

  Args:
    path: the file.
  Raises:
    InputError: naming the file (and the key, where the header names the one at fault)
      for a missing, truncated or malformed file.
  """

  def __init__(self, path: str):
    self.path = str(path)
    try:
      self._f = safetensors.safe_open(self.path, framework="np", backend="pread")
    except OSError as e:
      raise InputError(self.path, "file", f"cannot open ({e.strerror or e})") from e
    except safetensors.SafetensorError as e:
      raise _refusal(self.path, e) from e
    self.metadata = self._f.metadata() or {}
    self._entries: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for key in self._f.offset_keys():  # the order the header lists them
      view = self._f.get_slice(key)
      dtype = _ST_READ.get(view.get_dtype())
      if dtype is None:
        raise InputError(self.path, key, f"dtype {view.get_dtype()} is not read (read: "
                         f"{', '.join(_ST_READ)})")
      self._entries[key] = tuple(view.get_shape()), dtype

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entry(key)[0]

  def dtype(self, key: str) -> np.dtype:
    return self._entry(key)[1]

  def _entry(self, key: str):
    try:
      return self._entries[key]
    except KeyError:
      raise InputError(self.path, key, "no such tensor in the file") from None

  def read(self, key: str) -> np.ndarray:
    self._entry(key)
    try:
      return self._f.get_tensor(key)
    except (OSError, safetensors.SafetensorError) as e:  # the file shrank since it was opened
      raise InputError(self.path, key, f"cannot read ({e})") from e

  def close(self) -> None:
    self._f.__exit__(None, None, None)


def _refusal(path: str, error: Exception) -> InputError:
  """The library's refusal of ``path`` as an :class:`InputError`.

  The library says what is wrong but not with which tensor; where the header parses, the
  first entry at fault is named (a truncated file names the tensor that runs past its end).
  """
  why = f"not a valid safetensors file ({error})"
  try:
    with open(path, "rb") as f:
      data_size = os.fstat(f.fileno()).st_size - 8
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n)) if n <= data_size else None
  except (OSError, struct.error, ValueError):
    header = None
  if not isinstance(header, dict):
    return InputError(path, "header", why)
  data_size -= n
  for key, entry in header.items():
    try:
      dtype = _ST_DTYPES.get(entry["dtype"])
      begin, end = entry["data_offsets"]
      need = None if dtype is None else math.prod(entry["shape"]) * dtype.itemsize
    except (KeyError, TypeError, ValueError):
      continue
    if dtype is None:
      return InputError(path, key, f"unknown dtype {entry['dtype']!r} (known: "
                        f"{', '.join(_ST_DTYPES)})")
    if end - begin != need:
      return InputError(path, key, f"data_offsets {[begin, end]} hold {end - begin} bytes, "
                        f"shape {tuple(entry['shape'])} {entry['dtype']} needs {need}")
    if end > data_size:
      return InputError(path, key, f"truncated: the header puts this tensor at data bytes "
                        f"[{begin}, {end}), the file holds {data_size} data bytes")
  return InputError(path, "header", why)


class ShardedSafetensors(WeightFile):
  """A sharded checkpoint: ``<name>.safetensors.index.json`` with ``{"weight_map": {key:
  shard file}}``, shards beside it.

  Every shard is opened (its header checked) and every key of the index must be in the
  shard it is mapped to.

  Raises:
    InputError: a missing shard (naming the shard and a key it should hold), a malformed
      index, or a key the shard lacks.
  """

  def __init__(self, index_path: str):
    self.path = str(index_path)
    try:
      with open(self.path) as f:
        index = json.load(f)
    except OSError as e:
      raise InputError(self.path, "file", f"cannot open ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise InputError(self.path, "weight_map", f"malformed JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                   for v in weight_map.values()):
      raise InputError(self.path, "weight_map", "missing or not a {key: shard file} object")
    directory = os.path.dirname(os.path.abspath(self.path))
    self._map: dict[str, str] = {}
    self._shards: dict[str, SafetensorsFile] = {}
    try:
      by_shard: dict[str, list[str]] = collections.defaultdict(list)
      for key, shard in weight_map.items():
        by_shard[shard].append(key)
      for shard, keys in sorted(by_shard.items()):
        shard_path = os.path.join(directory, shard)
        if os.path.basename(shard) != shard:
          raise InputError(self.path, keys[0], f"shard {shard!r} is not a file name beside "
                           "the index")
        if not os.path.exists(shard_path):
          raise InputError(shard_path, keys[0], f"missing shard: {self.path} maps "
                           f"{len(keys)} tensors to it")
        self._shards[shard] = SafetensorsFile(shard_path)
        for key in keys:
          if key not in self._shards[shard]:
            raise InputError(shard_path, key, f"not in the shard {self.path} maps it to")
          self._map[key] = shard
        # A loader that reads whole shards would take it too: it cannot pass unnoticed.
        for key in self._shards[shard].keys():
          if key not in self._map or self._map[key] != shard:
            raise InputError(shard_path, key, f"in the shard, not in {self.path}'s weight_map")
    except BaseException:
      self.close()
      raise

  def keys(self) -> list[str]:
    return list(self._map)

  def __contains__(self, key: str) -> bool:
    return key in self._map

  def _shard(self, key: str) -> SafetensorsFile:
    if key not in self._map:
      raise InputError(self.path, key, "no such tensor in the index")
    return self._shards[self._map[key]]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shard(key).shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self._shard(key).dtype(key)

  def file_of(self, key: str) -> str:
    return self._shard(key).path

  def read(self, key: str) -> np.ndarray:
    return self._shard(key).read(key)

  def close(self) -> None:
    for shard in self._shards.values():
      shard.close()


class MergedWeights(WeightFile):
  """Several weight files seen as one (e.g. unsharded ``*.safetensors`` parts in a folder).

  Raises:
    InputError: a key present in two of them (naming the second file and the key).
  """

  def __init__(self, parts: Iterable[WeightFile], path: str):
    self.path = str(path)
    self._parts = list(parts)
    self._owner: dict[str, WeightFile] = {}
    for part in self._parts:
      for key in part.keys():
        if key in self._owner:
          raise InputError(part.file_of(key), key, "also in "
                           f"{self._owner[key].file_of(key)}: which one is meant?")
        self._owner[key] = part

  def keys(self) -> list[str]:
    return list(self._owner)

  def __contains__(self, key: str) -> bool:
    return key in self._owner

  def _part(self, key: str) -> WeightFile:
    if key not in self._owner:
      raise InputError(self.path, key, "no such tensor")
    return self._owner[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._part(key).shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self._part(key).dtype(key)

  def file_of(self, key: str) -> str:
    return self._part(key).file_of(key)

  def read(self, key: str) -> np.ndarray:
    return self._part(key).read(key)

  def close(self) -> None:
    for part in self._parts:
      part.close()


def _header_json(items: list[tuple[str, tuple[int, ...], np.dtype]],
                 metadata: Mapping[str, str] | None) -> tuple[bytes, list[tuple[int, int]]]:
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offsets, at = [], 0
  for key, shape, dtype in items:
    n = math.prod(shape) * dtype.itemsize
    header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
    offsets.append((at, at + n))
    at += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
  return raw, offsets


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None,
                      progress: Callable[[str, int], None] | None = None) -> None:
  """Writes ``tensors`` as one ``.safetensors`` file, one tensor at a time, atomically.

  Args:
    path: the file (written as ``.<name>.<pid>.tmp`` beside it, renamed when complete).
    tensors: ``{key: array}``; an array may be any object with ``shape`` and ``dtype`` that
      ``np.asarray`` turns into the data (e.g. a lazy tensor of a reader, or
      :class:`LazyArray`), materialised only when its turn comes.
    metadata: optional ``__metadata__`` strings.
    progress: called with (key, bytes) after each tensor is written.
  Raises:
    ValueError: a dtype safetensors has no name for, or data of another shape than declared.
  """
  items = []
  for key, value in tensors.items():
    dtype = np.dtype(value.dtype)
    if dtype not in _ST_NAMES:
      raise ValueError(f"{key}: safetensors has no dtype for {dtype}")
    items.append((str(key), tuple(int(d) for d in value.shape), dtype))
  header, _ = _header_json(items, metadata)
  path = os.path.abspath(path)
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(header)))
      f.write(header)
      for key, shape, dtype in items:
        data = np.asarray(tensors[key])
        if not data.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
          data = data.copy(order="C")
        if data.shape != shape or data.dtype != dtype:
          raise ValueError(f"{key}: declared {shape} {dtype}, got {data.shape} {data.dtype}")
        f.write(memoryview(data.reshape(-1).view(np.uint8)))
        if progress is not None:
          progress(key, data.nbytes)
        del data
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class LazyArray:
  """``shape`` + ``dtype`` now, the data when ``np.asarray`` asks (:func:`write_safetensors`)."""

  def __init__(self, shape: tuple[int, ...], dtype: Any, make: Callable[[], np.ndarray]):
    self.shape, self.dtype, self._make = tuple(shape), np.dtype(dtype), make

  def __array__(self, dtype=None, copy=None):
    del copy
    x = np.asarray(self._make())
    return x if dtype is None else x.astype(dtype)


# ----------------------------------------------------------------------------- torch .pth


class _StorageType:
  """Stands for a ``torch.<X>Storage`` class named by the pickle: just its element type."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"BUILD on the storage type {self.name}")


class _Storage:
  """A storage record of the zip (``data/<key>``), ``numel`` elements of ``dtype``."""

  __slots__ = ("key", "dtype", "numel")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel

  def __setstate__(self, state):
    raise pickle.UnpicklingError("BUILD on a storage")


class _PthTensor:
  """What the pickle describes for one tensor: a strided view of a storage."""

  __slots__ = ("storage", "offset", "shape", "stride")

  def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def __setstate__(self, state):
    raise pickle.UnpicklingError("BUILD on a tensor")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  strides, n = [], 1
  for d in reversed(shape):
    strides.append(n)
    n *= d
  return tuple(reversed(strides))


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in x):
    raise pickle.UnpicklingError(f"{what} is not a tuple of ints: {str(x)[:100]}")
  return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """Our stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor over a {type(storage).__name__}, not a storage")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise pickle.UnpicklingError(f"bad storage offset {storage_offset!r}")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride) or any(d < 0 for d in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"bad size/stride {size}/{stride}")
  return _PthTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is its tensor here."""
  del requires_grad, backward_hooks
  if not isinstance(data, _PthTensor):
    raise pickle.UnpicklingError(f"parameter over a {type(data).__name__}, not a tensor")
  return data


# The only globals a plain tensor state dict names, each resolved to something of ours.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dt) for name, dt in _TORCH_STORAGES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a tensor state dict; any other global is refused before it is called."""

  def __init__(self, file, where: str):
    super().__init__(file)
    self._where = where
    self.refused: str | None = None
    self.storages: dict[str, _Storage] = {}  # key -> its first record

  def find_class(self, module: str, name: str):
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      self.refused = f"{module}.{name}"
      raise pickle.UnpicklingError(f"global {module}.{name} refused")
    return allowed

  def persistent_load(self, pid):
    # zip: ("storage", type, key, location, numel); legacy: the same + view metadata, which
    # torch >= 0.4 always writes as None (storage views are older than any file we read).
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0 or (len(pid) == 6 and pid[5] is not None)):
      raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:200]}")
    storage = _Storage(pid[2], pid[1].dtype, pid[4])
    self.storages.setdefault(storage.key, storage)
    return storage


# torch's legacy (pre 1.6) stream: these two pickles open it (torch.serialization).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class PthFile(WeightFile):
  """A ``torch.save`` file of a tensor state dict, read without torch and without running
  pickled code: the zip format (torch >= 1.6) or the legacy stream before it.

  The dict may sit under ``"model_state"`` (the reference's VAE loader unwraps that key;
  other containers are refused). Tensors are read lazily, one at a time, honouring each
  view's storage offset, size and stride (views and shared storages come out as torch
  would give them).

  Raises:
    InputError: naming the file and the offending global, key or record: neither a torch
      zip nor a legacy torch file, a pickle that names anything but tensors, a value that
      is not a tensor, a view outside its storage, a truncated member or stream.
  """

  def __init__(self, path: str):
    self.path = str(path)
    self._zip, self._f = None, None
    # Legacy files: storage key -> (offset of its bytes in the file, byte count).
    self._spans: dict[str, tuple[int, int]] = {}
    try:
      self._f = open(self.path, "rb")
    except OSError as e:
      raise InputError(self.path, "file", f"cannot open ({e.strerror or e})") from e
    try:
      try:
        self._zip = zipfile.ZipFile(self.path)
      except zipfile.BadZipFile as e:
        self._f.seek(0)
        if self._f.read(2) != b"\x80\x02":  # the legacy stream opens with a protocol-2 pickle
          raise InputError(self.path, "file", f"not a torch zip file ({e}) nor a legacy "
                           "torch file") from e
        self._f.seek(0)
        self._tensors = self._read_legacy()
      else:
        self._prefix = self._find_prefix()
        with self._zip.open(self._prefix + "data.pkl") as f:
          self._tensors = self._unpickle(f, "data.pkl")[0]
      self._members: dict[str, zipfile.ZipInfo] = {}
      for key, t in self._tensors.items():
        self._check_tensor(key, t)
    except BaseException:
      self.close()
      raise

  def _find_prefix(self) -> str:
    pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise InputError(self.path, "data.pkl", f"not a torch.save zip (found {len(pkls)} "
                       "'<name>/data.pkl' records)")
    prefix = pkls[0][:-len("data.pkl")]
    order = (self._zip.read(prefix + "byteorder").decode().strip()
             if prefix + "byteorder" in self._zip.namelist() else "little")
    if order not in ("little", "big"):
      raise InputError(self.path, "byteorder", f"unknown byte order {order!r}")
    self._byteorder = "<" if order == "little" else ">"
    return prefix

  def _load(self, f, what: str) -> tuple[Any, _RestrictedUnpickler]:
    """One pickle from ``f`` through the restricted unpickler; ``what`` names it in errors."""
    unpickler = _RestrictedUnpickler(f, self.path)
    try:
      return unpickler.load(), unpickler
    except Exception as e:  # pylint: disable=broad-except  # any malformed pickle
      if unpickler.refused:
        raise InputError(self.path, unpickler.refused, "the pickle names this global; only "
                         "plain tensor state dicts are read (nothing was executed)") from e
      raise InputError(self.path, what, f"not a tensor state dict ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]})") from e

  def _unpickle(self, f, what: str) -> tuple[dict[str, _PthTensor], dict[str, _Storage]]:
    """The state dict's pickle: key -> tensor record, and the storages it names."""
    obj, unpickler = self._load(f, what)
    if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
      obj = obj["model_state"]
    if not isinstance(obj, dict):
      raise InputError(self.path, what, f"holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
      if not isinstance(key, str):
        raise InputError(self.path, str(key), f"a {type(key).__name__} key (state dict keys "
                         "are strings)")
      if not isinstance(value, _PthTensor):
        raise InputError(self.path, key, f"a {type(value).__name__}, not a tensor (nested "
                         "containers other than 'model_state' are not read)")
    return dict(obj), unpickler.storages

  def _read_legacy(self) -> dict[str, _PthTensor]:
    """The legacy stream: magic number, protocol version, system info, the state dict, the
    sorted storage keys, then per key an int64 element count and the storage's bytes."""
    f = self._f
    if self._load(f, "magic number")[0] != _LEGACY_MAGIC:
      raise InputError(self.path, "magic number", "not a torch file")
    version = self._load(f, "protocol_version")[0]
    if version != _LEGACY_PROTOCOL:
      raise InputError(self.path, "protocol_version", f"{version!r}, expected "
                       f"{_LEGACY_PROTOCOL}")
    info = self._load(f, "sys_info")[0]
    if not isinstance(info, dict) or not isinstance(info.get("little_endian"), bool):
      raise InputError(self.path, "sys_info", f"no little_endian flag in {str(info)[:100]}")
    self._byteorder = "<" if info["little_endian"] else ">"
    tensors, storages = self._unpickle(f, "state dict")
    keys = self._load(f, "storage keys")[0]
    if not isinstance(keys, list) or sorted(storages) != sorted(keys):
      raise InputError(self.path, "storage keys", f"{str(keys)[:100]} do not match the "
                       f"storages the state dict names ({sorted(storages)[:5]})")
    offset, size = f.tell(), os.fstat(f.fileno()).st_size
    for key in keys:
      f.seek(offset)
      head = f.read(8)
      if len(head) < 8:
        raise InputError(self.path, f"storage {key}", "the file ends before it (truncated?)")
      numel = int.from_bytes(head, "little" if self._byteorder == "<" else "big", signed=True)
      nbytes = numel * storages[key].dtype.itemsize
      if numel < 0 or offset + 8 + nbytes > size:
        raise InputError(self.path, f"storage {key}", f"{numel} elements at byte {offset + 8} "
                         f"run past the end of the {size}-byte file (truncated?)")
      self._spans[key] = (offset + 8, nbytes)
      offset += 8 + nbytes
    return tensors

  def _member(self, key: str, storage: _Storage) -> zipfile.ZipInfo:
    name = f"{self._prefix}data/{storage.key}"
    try:
      return self._zip.getinfo(name)
    except KeyError:
      raise InputError(self.path, key, f"its storage record {name} is missing") from None

  def _storage_bytes(self, key: str, storage: _Storage) -> tuple[str, int]:
    """(the storage's name for messages, the bytes the file holds for it)."""
    if self._zip is None:
      return f"storage {storage.key}", self._spans[storage.key][1]
    info = self._member(key, storage)
    return info.filename, info.file_size

  def _check_tensor(self, key: str, t: _PthTensor) -> None:
    name, nbytes = self._storage_bytes(key, t.storage)
    itemsize = t.storage.dtype.itemsize
    if nbytes < t.storage.numel * itemsize:
      raise InputError(self.path, key, f"{name} holds {nbytes} bytes, {t.storage.numel} "
                       f"elements need {t.storage.numel * itemsize}")
    if math.prod(t.shape) > 0:
      last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
      if last >= t.storage.numel:
        raise InputError(self.path, key, f"view (offset {t.offset}, size {t.shape}, stride "
                         f"{t.stride}) reaches element {last} of a {t.storage.numel}-element "
                         "storage")

  def keys(self) -> list[str]:
    return list(self._tensors)

  def __contains__(self, key: str) -> bool:
    return key in self._tensors

  def _tensor(self, key: str) -> _PthTensor:
    try:
      return self._tensors[key]
    except KeyError:
      raise InputError(self.path, key, "no such tensor in the file") from None

  def shape(self, key: str) -> tuple[int, ...]:
    return self._tensor(key).shape

  def dtype(self, key: str) -> np.dtype:
    return self._tensor(key).storage.dtype

  def _data_offset(self, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start in the file (after its local header)."""
    self._f.seek(info.header_offset)
    local = self._f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
      raise InputError(self.path, info.filename, "bad zip local header (truncated file?)")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len

  def _read_bytes(self, key: str, storage: _Storage, start: int, length: int) -> np.ndarray:
    """``length`` bytes from ``start`` of the storage's data, as uint8."""
    if self._zip is None:
      return _read_range(self._f, self._spans[storage.key][0] + start, length)
    info = self._member(key, storage)
    if info.compress_type == zipfile.ZIP_STORED:
      return _read_range(self._f, self._data_offset(info) + start, length)
    with self._zip.open(info) as f:  # torch never compresses; a re-zipped file still reads
      f.seek(start)
      return np.frombuffer(bytearray(f.read(length)), np.uint8)

  def read(self, key: str) -> np.ndarray:
    t = self._tensor(key)
    dtype = t.storage.dtype
    itemsize = dtype.itemsize
    if math.prod(t.shape) == 0:
      return np.empty(t.shape, t.storage.dtype)
    # Only the elements the view spans are read.
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    start, length = t.offset * itemsize, (last + 1 - t.offset) * itemsize
    try:
      raw = self._read_bytes(key, t.storage, start, length)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise InputError(self.path, key, f"cannot read its storage ({e})") from e
    if self._byteorder == ">" and itemsize > 1:
      raw = raw.view(f"u{itemsize}").byteswap()
    flat = raw.view(dtype)
    if t.stride == _contiguous_strides(t.shape):
      return flat.reshape(t.shape)
    view = np.lib.stride_tricks.as_strided(
        flat, shape=t.shape, strides=tuple(s * itemsize for s in t.stride), writeable=False)
    return np.ascontiguousarray(view)

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
    if self._f is not None:
      self._f.close()


# ----------------------------------------------------------------------------- dispatch


def open_weights(path: str) -> WeightFile:
  """The reader for ``path``: ``*.safetensors``, ``*.safetensors.index.json``, ``*.pth`` /
  ``*.pt`` / ``*.bin`` (torch zip or legacy), or a folder of ``*.safetensors`` (its index JSON if it
  has one, else every ``.safetensors`` file in it).

  Raises:
    InputError: a path that does not exist or is none of these.
  """
  path = str(path)
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(index) > 1:
      raise InputError(path, "index", f"several index files: {', '.join(index)}")
    if index:
      return ShardedSafetensors(os.path.join(path, index[0]))
    parts = [n for n in names if n.endswith(".safetensors")]
    if not parts:
      raise InputError(path, "weights", "no .safetensors file (or index) in the folder")
    return MergedWeights([SafetensorsFile(os.path.join(path, n)) for n in parts], path)
  if not os.path.exists(path):
    raise InputError(path, "file", "does not exist")
  if path.endswith(".safetensors.index.json"):
    return ShardedSafetensors(path)
  if path.endswith(".safetensors"):
    return SafetensorsFile(path)
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return PthFile(path)
  raise InputError(path, "file", "unknown weights format (expected .safetensors, "
                   ".safetensors.index.json or a torch .pth)")

